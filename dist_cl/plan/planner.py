"""The selection policy: which global batches each epoch trains on (docs/DESIGN.md §3).

``EpochPlanner`` owns every rule of it: warm-up, the seed rule, how the bank is completed before a
selection, tau, computing ahead (``selection.overlap``) and mid-epoch re-selection. Every plan it makes,
re-selections included, is a pure function of its ``PlanRequest`` (strategy, seed, bank snapshot, tau),
so it is the same whichever thread or world size computes it, and a run killed mid-epoch resumes with
the same next plan. The path to a plan has three hops, each adding one thing:
``EpochPlanner.plan`` (the policy: which request, when) -> ``compute_plan`` (the figures) ->
``select_shared`` (one plan on every rank, refilled to an epoch for osgd) -> ``select_batches``.
"""

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial

import numpy as np
import torch
import torch.distributed as dist

from dist_cl.config import Config, ConfigError, SelectionConfig
from dist_cl.evaluate.embed import embed_indices
from dist_cl.learn.losses import batch_options
from dist_cl.learn.models import current_tau
from dist_cl.plan.bank import EmbeddingBank
from dist_cl.plan.figures import SelectionFigures
from dist_cl.plan.sampler import BatchPlan
from dist_cl.plan.teacher import load_teacher
from dist_cl.runtime.distributed import DistInfo, broadcast_buffers, check_same_on_all_ranks, distributed_map
from dist_cl.runtime.seeding import Stream, derive_seed
from dist_cl.selection import STRATEGIES, batches_per_selection, lift, select_batches
from dist_cl.selection.diagnostics import label_purity, pair_repeat
from dist_cl.selection.errors import SelectionError

log = logging.getLogger("dist_cl")


@dataclass(frozen=True)
class PlanRequest:
    """What ``select_batches`` reads to make a plan: a pure function of it, on any thread or world size."""

    strategy: str
    seed: int
    batch_size: int
    options: dict
    """``selection.options`` where the plan is of the configured strategy, else none."""
    u: np.ndarray | None = None
    """The bank (a copy where training goes on writing it meanwhile); None for strategies that ignore it."""
    v: np.ndarray | None = None
    num_samples: int = 0
    """N, for a strategy that ignores the bank (one that reads it counts the bank's rows)."""
    scoring: dict = field(default_factory=dict)
    """What osgd scores its batches with and the lift compares under, for a strategy that reads the bank:
    ``tau``, ``loss`` (``loss.name``) and ``loss_options`` (``dist_cl.learn.losses.batch_options``)."""
    rows: int = 0
    """0: one selection. Else the plan's length: a strategy that keeps a subset of batches per selection
    (osgd) is selected again from the same bank (seeds of stream REFILL) and the plan cut there."""


def select_shared(request: PlanRequest, map_fn=distributed_map, device: torch.device | None = None) -> np.ndarray:
    """``request``'s batches, the same on every rank (a collective where the strategy reads the bank),
    selected again until ``request.rows`` where it asks for more than one selection.

    A strategy that deals its work over the ranks itself (sc_global) runs on all of them, through
    ``map_fn``; any other that reads the bank (sc, osgd) runs on one rank, and the others receive its plan:
    computed on every rank, BLAS differences between nodes would end the job with RankDivergenceError.
    Seeded strategies that ignore the bank are computed everywhere, which costs nothing. ``device``: where
    a strategy that computes on one runs (the rank's).
    """
    spec = STRATEGIES[request.strategy]

    def select(seed: int) -> np.ndarray:
        if request.u is None:
            return select_batches(request.strategy, None, None, request.batch_size, seed=seed,
                                  num_samples=request.num_samples, **request.options)
        chosen = partial(select_batches, request.strategy, request.u, request.v, request.batch_size, seed=seed,
                         device=device, **request.scoring, **request.options)
        if spec.reads_embeddings and not spec.takes_map_fn:
            [batches] = map_fn(lambda _: chosen(), [None])
            return batches
        return chosen(map_fn=map_fn)

    batches = select(request.seed)
    while len(batches) < request.rows:
        batches = np.concatenate([batches, select(derive_seed(request.seed, Stream.REFILL, len(batches)))])
    return batches[: request.rows or None]


def compute_plan(request: PlanRequest, epoch: int, prepared: SelectionFigures | None = None,
                 map_fn=distributed_map, device: torch.device | None = None) -> tuple[BatchPlan, SelectionFigures]:
    """``epoch``'s plan made from ``request``, and the figures that describe it: ``prepared``'s (what was
    known when the request was made: the bank's staleness, the time spent preparing it) with the plan's
    lift and selection time added."""
    started = time.perf_counter()
    figures = replace(prepared) if prepared is not None else SelectionFigures()
    batches = select_shared(request, map_fn, device)
    if request.strategy == "random":
        figures.lift = 1.0  # its definition: a random plan against a random partition
    if request.u is not None:
        figures.lift = lift(request.u, request.v, batches, seed=request.seed, dtype=torch.float32, **request.scoring)
    figures.seconds = (figures.prepare_seconds or 0.0) + time.perf_counter() - started
    return BatchPlan(batches, epoch, request.strategy), figures


def use_device(device: torch.device) -> None:
    """Make ``device`` the calling thread's current CUDA device (a per-thread setting that starts at
    cuda:0), so nothing the thread allocates without naming a device lands on another rank's GPU."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


class BackgroundPlanner:
    """Computes one plan at a time on a worker thread while the main thread trains.

    Its collectives (sc_global's cells dealt over ranks, a plan sent from one rank) run on a gloo group of
    their own, so they never interleave with DDP's on the default group; they carry CPU objects only.
    The thread works on its rank's ``device``: set as its current device, and passed to the strategy.
    A collective: construct it on every rank.
    """

    def __init__(self, device: torch.device):
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self.device = device
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dist_cl-plan", initializer=use_device,
                                           initargs=(device,))

    def submit(self, request: PlanRequest, epoch: int, prepared: SelectionFigures | None = None) -> Future:
        """``compute_plan(request, epoch, prepared)`` on the worker thread; the future holds (plan, figures)."""
        return self.executor.submit(compute_plan, request, epoch, prepared, partial(distributed_map, group=self.group),
                                    self.device)

    def close(self) -> None:
        self.executor.shutdown(wait=True)


def resolved(plan: BatchPlan, figures: SelectionFigures) -> Future:
    """A finished future holding ``(plan, figures)``, e.g. a next plan read from a checkpoint."""
    future = Future()
    future.set_result((plan, figures))
    return future


def left_out_warning(num_samples: int, batch_size: int, strategy: str) -> str | None:
    """What a partition leaves out of each epoch when N is not a multiple of B; None where nothing is."""
    left_out = num_samples % batch_size
    if not left_out or not STRATEGIES[strategy].partition:
        return None
    which = "the same ones every epoch" if not STRATEGIES[strategy].per_epoch else "different ones each epoch"
    return (f"{left_out} of the {num_samples} training samples ({left_out / num_samples:.1%}) are left out of "
            f"every epoch ({which}): N is not a multiple of train.global_batch_size={batch_size}")


def random_epochs(selection: SelectionConfig) -> int:
    """The leading epochs trained on random batches: none for a strategy that reads no embeddings, the
    warm-up for one that does, and one more under overlap, whose plan of epoch W is chosen in epoch W - 1,
    from a bank still in warm-up (``plan_strategy``)."""
    if not STRATEGIES[selection.strategy].reads_embeddings:
        return 0
    return selection.warmup_epochs + int(selection.overlap and selection.warmup_epochs > 0)


def warmup_warning(selection: SelectionConfig, epochs: int) -> str | None:
    """A loss-aware strategy whose warm-up covers the whole run never selects; None where it does."""
    random = random_epochs(selection)  # 0 for a strategy that reads no embeddings; train.epochs is >= 1
    if random < epochs:
        return None
    overlap = " (one more than the warm-up under selection.overlap)" if random > selection.warmup_epochs else ""
    return (f"selection.warmup_epochs={selection.warmup_epochs} covers all train.epochs={epochs}{overlap}: every "
            f"epoch trains on random batches and {selection.strategy} never selects; lower selection.warmup_epochs")


def bank_use(selection: SelectionConfig) -> tuple[bool, bool]:
    """(some plan of the run reads the bank, training steps write it). Only a loss-aware strategy without a
    teacher reads the bank, and one under selection.embeddings=refresh overwrites every row before it reads
    them. A run whose plans read no bank keeps none: no step holds its rows, no checkpoint saves them."""
    reads = STRATEGIES[selection.strategy].reads_embeddings and not selection.teacher
    return reads, reads and selection.embeddings == "training"


def plan_strategy(selection: SelectionConfig, bank_epoch: int) -> str:
    """The strategy of a plan selected from the bank as it is in epoch ``bank_epoch``: random during
    warm-up (the bank is not filled yet, or the embeddings not yet worth selecting on), then the
    configured one. Under overlap the plan of epoch e + 1 reads epoch e's bank, so warm-up counts the
    bank's epochs, not the plan's."""
    if STRATEGIES[selection.strategy].reads_embeddings and bank_epoch < selection.warmup_epochs:
        return "random"
    return selection.strategy


def fills_epoch(strategy: str) -> bool:
    """True for a loss-aware strategy that keeps a subset of the batches per selection (osgd): like the
    official code, it is selected again every ``batches_per_selection`` steps, each time from the bank as it
    is then, until an epoch's worth of N // B steps."""
    return STRATEGIES[strategy].reads_embeddings and not STRATEGIES[strategy].partition


def plan_seed(run_seed: int, epoch: int, strategy: str, cursor: int | None = None) -> int:
    """The seed rule (dist_cl.runtime.seeding): a per-epoch strategy's plan is of stream PLAN (epoch), a
    re-selection of the rest of an epoch at global batch ``cursor`` of stream RESELECT (epoch, cursor), and
    a once-per-run plan takes the run seed."""
    if not STRATEGIES[strategy].per_epoch:
        return run_seed
    if cursor is None:
        return derive_seed(run_seed, Stream.PLAN, epoch)
    return derive_seed(run_seed, Stream.RESELECT, epoch, cursor)


def check_plannable(selection: SelectionConfig, num_samples: int, batch_size: int) -> None:
    """Selection settings that only N makes wrong fail at start, not after the warm-up epochs."""
    if selection.strategy == "full" and batch_size != num_samples:
        raise ConfigError(f"selection.strategy=full trains on all N = {num_samples} samples as one batch, "
                          f"but train.global_batch_size={batch_size}: set train.global_batch_size={num_samples}")
    try:  # osgd's k > N // B
        batches_per_selection(selection.strategy, num_samples, batch_size, selection.options)
    except SelectionError as err:
        raise ConfigError(f"selection.strategy={selection.strategy} with selection.options={selection.options} "
                          f"on N = {num_samples} samples at a global batch of {batch_size}: {err}") from err


def plan_notes(cfg: Config, num_samples: int) -> list[tuple[int, str]]:
    """What the run's plans will leave out or never do, each with the level to log it at start.

    A WARNING where something is missed for the whole run (the same samples every epoch, a strategy that
    never selects); an INFO for the few samples a per-epoch partition leaves out, a new draw each epoch, as
    a shuffled loader's drop_last leaves out: a setting to know of, not a problem to fix.
    """
    left_out = left_out_warning(num_samples, cfg.train.global_batch_size, cfg.selection.strategy)
    left_out_level = logging.INFO if STRATEGIES[cfg.selection.strategy].per_epoch else logging.WARNING
    messages = ((left_out_level, left_out), (logging.WARNING, warmup_warning(cfg.selection, cfg.train.epochs)))
    return [(level, message) for level, message in messages if message]


class EpochPlanner:
    """Which global batches each epoch trains on: the trainer asks it for an epoch's plan (``plan``) and, at
    each step, for the rest of it selected again where due (``reselect``); nothing else.

    A collective: construct it and call its methods on every rank. Its state in a checkpoint is the plan
    computed ahead, waited for: a resumed run must train on it, not recompute it from a bank that
    training has moved on.
    """

    collective = True
    """``state_dict`` waits for the plan computed ahead on every rank (its computation is a collective), so
    the ranks wait there, not in the checkpoint's barrier."""

    def __init__(self, cfg: Config, dataset, model, bank: EmbeddingBank, info: DistInfo):
        check_plannable(cfg.selection, len(dataset), cfg.train.global_batch_size)
        self.selection, self.run_seed, self.epochs = cfg.selection, cfg.seed, cfg.train.epochs
        self.batch_size, self.num_workers = cfg.train.global_batch_size, cfg.data.num_workers
        self.loss = {"loss": cfg.loss.name, "loss_options": batch_options(cfg.loss)}
        self.dataset, self.model, self.bank, self.info = dataset, model, bank, info
        self.teacher = load_teacher(cfg.selection.teacher, dataset) if cfg.selection.teacher else None
        """Fixed (u, v) that loss-aware plans read instead of the bank (selection.teacher), or None."""
        self.background = BackgroundPlanner(info.device) if cfg.selection.overlap else None
        self.ahead: Future | None = None
        """The next epoch's (plan, figures), computed ahead under selection.overlap."""
        for level, message in plan_notes(cfg, len(dataset)) if info.is_main else []:
            log.log(level, message)

    def request(self, epoch: int, step: int, first_step: int, train_epoch: int, copy_bank: bool = False
                ) -> tuple[PlanRequest, SelectionFigures]:
        """What ``epoch``'s plan is computed from, the bank as it is at ``step`` (a collective), and the
        figures known so far.

        With selection.teacher, a loss-aware plan reads the teacher's fixed embeddings, not the bank.
        The plan starts at global step ``first_step``; ``train_epoch`` is the epoch training is in, whose
        augmentations a refresh embeds. ``copy_bank`` for a plan computed while training goes on writing the
        bank (N x d twice: 1 GB at N = 1M, d = 128, so not when computed at once).
        """
        started = time.perf_counter()
        name = plan_strategy(self.selection, train_epoch)
        request = PlanRequest(strategy=name, seed=plan_seed(self.run_seed, epoch, name), batch_size=self.batch_size,
                              options=self.selection.options if name == self.selection.strategy else {},
                              num_samples=len(self.dataset),
                              rows=len(self.dataset) // self.batch_size if fills_epoch(name) else 0)
        prepared = SelectionFigures()
        if STRATEGIES[name].reads_embeddings:
            u, v = self.teacher if self.teacher is not None else self.bank_snapshot(train_epoch, step, copy_bank)
            request = replace(request, u=u, v=v, scoring={"tau": current_tau(self.model), **self.loss})
            if self.teacher is None:
                prepared.bank_staleness = self.bank.staleness(first_step)
        prepared.prepare_seconds = time.perf_counter() - started
        return request, prepared

    def bank_snapshot(self, epoch: int, step: int, copy: bool) -> tuple[np.ndarray, np.ndarray]:
        """The bank's (u, v), completed (``complete_bank``); copies where training goes on writing it."""
        self.complete_bank(epoch, step)
        u, v = self.bank.u.numpy(), self.bank.v.numpy()
        return (u.copy(), v.copy()) if copy else (u, v)

    def complete_bank(self, epoch: int, step: int) -> None:
        """Make the bank complete: every row (selection.embeddings=refresh) or only rows never written by
        training (=training), embedded with ``epoch``'s augmentations."""
        self.bank.sync()
        refresh = self.selection.embeddings == "refresh"
        indices = torch.arange(len(self.dataset)) if refresh else self.bank.missing()
        if len(indices) == 0:
            return
        self.dataset.set_epoch(epoch)
        broadcast_buffers(self.model)
        u, v = embed_indices(self.model, self.dataset, indices.numpy(), rank=self.info.rank,
                             world_size=self.info.world_size, device=self.info.device, augmented=True,
                             num_workers=self.num_workers)
        self.bank.fill(indices, u, v, step)

    def plan(self, epoch: int, step: int, last: BatchPlan | None = None) -> tuple[BatchPlan, SelectionFigures]:
        """``epoch``'s global batches, identical on every rank, and the figures that describe them: the plan
        computed ahead, or one made now from the bank at ``step``. ``last``: the plan the previous epoch
        trained, if any (selection/pair_repeat). Under selection.overlap, the next epoch's plan starts being
        computed, from the bank as it is now."""
        started = time.perf_counter()
        if self.ahead is not None:
            plan, figures = self.ahead.result()
            # the bank snapshot was taken on the training thread, the rest overlapped the previous epoch
            figures = replace(figures, wait_seconds=figures.prepare_seconds + time.perf_counter() - started)
            self.ahead = None
        else:
            request, prepared = self.request(epoch, step, step, epoch)
            plan, figures = compute_plan(request, epoch, prepared, device=self.info.device)
            figures.wait_seconds = time.perf_counter() - started
        if plan.epoch != epoch:
            raise RuntimeError(f"the plan computed ahead is for epoch {plan.epoch}, not {epoch}")
        check_same_on_all_ranks("batch plan", plan.digest())
        self.diagnose(plan, last, figures)
        if self.background is not None and epoch + 1 < self.epochs:
            request, prepared = self.request(epoch + 1, step, step + len(plan), epoch, copy_bank=True)
            self.ahead = self.background.submit(request, epoch + 1, prepared)
        return plan, figures

    def diagnose(self, plan: BatchPlan, last: BatchPlan | None, figures: SelectionFigures) -> None:
        """Label purity where there are labels; pair repeat where ``plan`` and the ``last`` epoch's are both
        partitions."""
        if self.dataset.labels is not None:
            figures.label_purity = label_purity(plan.batches, self.dataset.labels)
        if last is not None and STRATEGIES[plan.strategy].partition and STRATEGIES[last.strategy].partition:
            figures.pair_repeat = pair_repeat(plan.batches, last.batches, len(self.dataset))

    def reselection_due(self, plan: BatchPlan, cursor: int) -> bool:
        """Time to select the rest of a loss-aware epoch plan again: every selection.every_steps steps for a
        partition, after each selection's batches for a strategy that ``fills_epoch``."""
        if plan.strategy != self.selection.strategy or not 0 < cursor < len(plan):
            return False
        if fills_epoch(plan.strategy):
            every = batches_per_selection(plan.strategy, len(self.dataset), self.batch_size, self.selection.options)
        else:
            every = self.selection.every_steps
        return bool(every) and cursor % every == 0

    def reselect(self, plan: BatchPlan, cursor: int, step: int, figures: SelectionFigures) -> BatchPlan | None:
        """Where ``reselection_due``, a new plan for ``plan``'s epoch: its first ``cursor`` batches, then the
        rest selected again from the bank as it is at ``step`` (a collective): the samples of the rest
        re-partitioned (each sample is still trained once), or, for a strategy that ``fills_epoch``, new
        selections over all samples. The time it takes, all waited for, is added to the epoch's ``figures``.
        None where no re-selection is due."""
        if not self.reselection_due(plan, cursor):
            return None
        started = time.perf_counter()
        request, _ = self.request(plan.epoch, step, step, plan.epoch)
        request = replace(request, seed=plan_seed(self.run_seed, plan.epoch, plan.strategy, cursor))
        # the rest's figures are not reported (the epoch's are the first plan's), so only its batches are made
        if fills_epoch(plan.strategy):
            rest = select_shared(replace(request, rows=len(plan) - cursor), device=self.info.device)
        else:
            samples = np.sort(plan.batches[cursor:].ravel())
            rest = samples[select_shared(replace(request, u=request.u[samples], v=request.v[samples]),
                                         device=self.info.device)]
        new = BatchPlan(np.concatenate([plan.batches[:cursor], rest]), plan.epoch, plan.strategy)
        check_same_on_all_ranks("batch plan", new.digest())
        seconds = time.perf_counter() - started
        figures.seconds = (figures.seconds or 0.0) + seconds
        figures.wait_seconds = (figures.wait_seconds or 0.0) + seconds
        return new

    def state_dict(self) -> dict | None:
        if self.ahead is None:
            return None
        plan, figures = self.ahead.result()
        return {"plan": plan.state_dict(), "figures": figures.scalars()}

    def load_state_dict(self, state: dict | None) -> None:
        self.ahead = None if state is None else resolved(BatchPlan.from_state_dict(state["plan"]),
                                                         SelectionFigures.from_scalars(state["figures"]))

    def close(self) -> None:
        if self.background is not None:
            self.background.close()
