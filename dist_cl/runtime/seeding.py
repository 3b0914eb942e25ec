"""Every seed in a run, derived from the run seed: one function, each stream named by a tag.

A plan, a sample's augmentation or a random reference batch is a pure function of (run seed, stream,
epoch, index, ...), which is what lets a run resumed at any step, on any number of ranks, end
bit-identical. The tag keeps the streams apart: without it, the reference batch of (epoch, step k) and
the augmentation of (epoch, sample k) would draw from one seed.

=========  ======================  ============================================================
Stream     parts after the tag     what the seed drives
=========  ======================  ============================================================
RANK       rank                    the rank's global torch, numpy and python RNGs (``seed_rank``):
                                   what no stream below covers, e.g. dropout
PLAN       epoch                   an epoch's plan (dist_cl.plan.planner.plan_seed); a plan made
                                   once per run (``fixed``) takes the run seed itself
RESELECT   epoch, cursor           the re-selection of an epoch's rest at global batch ``cursor``
REFILL     rows so far             derived from a plan's seed: each further selection that fills
                                   an osgd epoch (dist_cl.plan.planner)
AUGMENT    epoch, index[, variant] a sample's two augmented views (dist_cl.data.pairs.sample_rng);
                                   ``variant`` (severity, corruption) for its corrupted versions
REFERENCE  epoch, step             the random global batch that selection/realised_lift compares
                                   with (dist_cl.plan.realised_lift)
=========  ======================  ============================================================

Within a strategy, a plan's seed is split further by dist_cl.selection's ``ORDER_STREAM`` and
``GROUP_STREAM``. A stream's parts have a fixed count: ``SeedSequence`` reads ``[a, b]`` and
``[a, b, 0]`` as one entropy, so a stream must not end one of its seeds with a part another omits.

The per-rank RNG state that is not derived this way is captured in every checkpoint by ``RankRNG``,
which seeds nothing: ``seed_rank`` does, at one explicit point of the trainer's start-up, so the order
in which checkpoint components are built cannot move it.
"""

import enum
import random

import numpy as np
import torch
import torch.distributed as dist


class Stream(enum.IntEnum):
    """The tag of each derived seed (the table above)."""

    RANK = 1
    PLAN = 2
    RESELECT = 3
    REFILL = 4
    AUGMENT = 5
    REFERENCE = 6


def derive_seed(seed: int, stream: Stream, *parts: int) -> int:
    """A 32-bit seed of ``stream`` from ``seed`` and the stream's integer parts, e.g. (epoch,) for a plan."""
    return int(np.random.SeedSequence([int(seed), int(stream), *(int(p) for p in parts)]).generate_state(1)[0])


def seed_rank(seed: int, rank: int) -> None:
    """Seed this rank's global torch, numpy and python RNGs from the run seed (stream RANK)."""
    rank_seed = derive_seed(seed, Stream.RANK, rank)
    torch.manual_seed(rank_seed)
    np.random.seed(rank_seed)
    random.seed(rank_seed)


class RankRNG:
    """The torch, numpy, python (and CUDA) global RNGs of every rank: a checkpoint component.

    It captures and restores state only; ``seed_rank`` seeds. ``state_dict`` is a collective (each
    rank's state is gathered, so rank 0 can save them all); ``load_state_dict`` restores this rank's
    own, and only when the world size is unchanged: on another world size the per-rank streams restart
    from the seed (plans, bank and cursor do not need them).
    """

    collective = True

    def __init__(self, rank: int, world_size: int, device: torch.device):
        self.rank, self.world_size, self.device = rank, world_size, device

    def state_dict(self) -> list[dict]:
        state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        states = [None] * self.world_size
        dist.all_gather_object(states, state)
        return states

    def load_state_dict(self, states: list[dict]) -> None:
        if len(states) != self.world_size:
            return
        state = states[self.rank]
        torch.set_rng_state(state["torch"])
        np.random.set_state(state["numpy"])
        random.setstate(state["python"])
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)
