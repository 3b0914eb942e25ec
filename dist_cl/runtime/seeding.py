"""Every seed in a run, derived from the run seed: one function, so a stream is named by its parts.

A plan, a sample's augmentation or a random reference batch is a pure function of (run seed, epoch,
index, ...), which is what lets a run resumed at any step, on any number of ranks, end bit-identical.
The per-rank RNG state that is not derived this way (DDP workers' dropout, say) is captured in every
checkpoint by ``RankRNG``.
"""

import random

import numpy as np
import torch
import torch.distributed as dist


def derive_seed(*parts: int) -> int:
    """A 32-bit seed from integer parts, e.g. (run seed, epoch) for an epoch's plan."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class RankRNG:
    """The torch, numpy, python (and CUDA) global RNGs of every rank: a checkpoint component.

    ``state_dict`` is a collective (each rank's state is gathered, so rank 0 can save them all);
    ``load_state_dict`` restores this rank's own, and only when the world size is unchanged: on another
    world size the per-rank streams restart from the seed (plans, bank and cursor do not need them).
    """

    collective = True

    def __init__(self, seed: int, rank: int, world_size: int, device: torch.device):
        self.rank, self.world_size, self.device = rank, world_size, device
        torch.manual_seed(derive_seed(seed, rank))
        np.random.seed(derive_seed(seed, rank) % 2**32)
        random.seed(derive_seed(seed, rank))

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
