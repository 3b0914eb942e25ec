"""The selection policy: which global batches each epoch trains on (docs/DESIGN.md §3).

``EpochPlanner`` owns every rule of it: warm-up, the seed rule, how the bank is completed before a
selection, tau, computing ahead (``selection.overlap``) and mid-epoch re-selection. Every plan it makes,
re-selections included, goes request -> plan: a pure function of its ``PlanRequest`` (strategy, seed,
bank snapshot, tau), so it is the same whichever thread or world size computes it, and a run killed
mid-epoch resumes with the same next plan.
"""

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import torch
import torch.distributed as dist

from dist_cl.config import ConfigError, SelectionConfig
from dist_cl.evaluate.embed import embed_indices
from dist_cl.plan.bank import EmbeddingBank
from dist_cl.plan.figures import SelectionFigures
from dist_cl.plan.sampler import BatchPlan
from dist_cl.runtime.distributed import DistInfo, broadcast_buffers, check_same_on_all_ranks, distributed_map
from dist_cl.runtime.seeding import derive_seed
from dist_cl.selection import STRATEGIES, batches_per_selection, lift, select_batches
from dist_cl.selection.diagnostics import label_purity, pair_repeat
from dist_cl.selection.errors import SelectionError


@dataclass(frozen=True)
class PlanRequest:
    epoch: int
    """The epoch the plan is for."""
    strategy: str
    seed: int
    batch_size: int
    num_samples: int
    options: dict
    tau: float = 0.1
    loss: str = "infonce"
    """The training loss (``loss.name``): what osgd scores its batches with, and the lift compares under."""
    loss_options: dict | None = None
    """Its settings beyond tau (``dist_cl.learn.losses.batch_options``)."""
    u: np.ndarray | None = None
    """The bank (a copy where training goes on writing it meanwhile); None for strategies that ignore it."""
    v: np.ndarray | None = None
    staleness: float = 0.0
    """Mean age in steps of the snapshot's rows at the plan's first step."""
    rows: int = 0
    """0: one selection. Else the plan's length: a strategy that keeps a subset of batches per selection
    (osgd) is selected again from the same bank, with seeds derived from ``seed`` and the rows so far,
    and the plan cut there."""
    prepare_seconds: float = 0.0
    """Time the training loop spent completing and copying the bank for this request."""


def select_everywhere(strategy: str, u, v, batch_size: int, *, map_fn=distributed_map, device=None,
                      **kwargs) -> np.ndarray:
    """``select_batches`` with the same plan on every rank (a collective, through ``map_fn``).

    A strategy that deals its work over the ranks itself (sc_global) runs on all of them; any other that
    reads the bank (sc, osgd) runs on one rank, and the others receive its plan: computed on every rank,
    BLAS differences between nodes would end the job with RankDivergenceError. Seeded strategies that
    ignore the bank are computed everywhere, which costs nothing.
    """
    spec = STRATEGIES[strategy]
    if spec.reads_embeddings and not spec.takes_map_fn:
        [batches] = map_fn(lambda _: select_batches(strategy, u, v, batch_size, device=device, **kwargs), [None])
        return batches
    return select_batches(strategy, u, v, batch_size, map_fn=map_fn, device=device, **kwargs)


def select_plan(request: PlanRequest, map_fn=distributed_map, device: torch.device | None = None) -> np.ndarray:
    """The batches of ``request`` alone (a collective where the strategy reads the bank)."""
    if request.u is None:
        return select_batches(request.strategy, None, None, request.batch_size, seed=request.seed,
                              num_samples=request.num_samples, **request.options)
    select = partial(select_everywhere, request.strategy, request.u, request.v, request.batch_size,
                     tau=request.tau, loss=request.loss, loss_options=request.loss_options, map_fn=map_fn,
                     device=device, **request.options)
    batches = select(seed=request.seed)
    while len(batches) < request.rows:
        batches = np.concatenate([batches, select(seed=derive_seed(request.seed, len(batches)))])
    return batches[: request.rows or None]


def compute_plan(request: PlanRequest, map_fn=distributed_map, device: torch.device | None = None
                 ) -> tuple[BatchPlan, SelectionFigures]:
    """The plan and the figures that describe it; ``device``: where a strategy that computes on one runs
    (the rank's)."""
    started = time.perf_counter()
    figures = SelectionFigures()
    batches = select_plan(request, map_fn, device)
    if request.strategy == "random":
        figures.lift = 1.0  # its definition: a random plan against a random partition
    if request.u is not None:
        figures.lift = lift(request.u, request.v, batches, tau=request.tau, seed=request.seed, dtype=torch.float32,
                            loss=request.loss, loss_options=request.loss_options)
        figures.bank_staleness = request.staleness
    figures.prepare_seconds = request.prepare_seconds
    figures.seconds = request.prepare_seconds + time.perf_counter() - started
    return BatchPlan(batches, request.epoch, request.strategy), figures


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

    def submit(self, request: PlanRequest) -> Future:
        return self.executor.submit(compute_plan, request, partial(distributed_map, group=self.group), self.device)

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
    """The seed rule: a per-epoch strategy gets (run seed, epoch), a re-selection of the rest of an epoch
    at global batch ``cursor`` gets (run seed, epoch, cursor), and a once-per-run plan the run seed."""
    if not STRATEGIES[strategy].per_epoch:
        return run_seed
    return derive_seed(run_seed, epoch) if cursor is None else derive_seed(run_seed, epoch, cursor)


class EpochPlanner:
    """Which global batches each epoch trains on; the trainer asks it for the epoch's plan, and nothing else.

    A collective: construct it and call its methods on every rank. Its state in a checkpoint is the plan
    computed ahead, waited for: a resumed run must train on it, not recompute it from a bank that
    training has moved on.
    """

    def __init__(self, selection: SelectionConfig, run_seed: int, batch_size: int, dataset, model,
                 bank: EmbeddingBank, info: DistInfo, num_workers: int = 0, loss: str = "infonce",
                 loss_options: dict | None = None):
        self.selection, self.run_seed, self.batch_size, self.loss = selection, run_seed, batch_size, loss
        self.loss_options = loss_options
        self.dataset, self.model, self.bank, self.info, self.num_workers = dataset, model, bank, info, num_workers
        if selection.strategy == "full" and batch_size != len(dataset):
            raise ConfigError(f"selection.strategy=full trains on all N = {len(dataset)} samples as one batch, "
                              f"but train.global_batch_size={batch_size}: set train.global_batch_size={len(dataset)}")
        try:  # options that only N makes wrong (osgd's k > N // B) fail now, not after the warm-up epochs
            batches_per_selection(selection.strategy, len(dataset), batch_size, selection.options)
        except SelectionError as err:
            raise ConfigError(f"selection.strategy={selection.strategy} with selection.options="
                              f"{selection.options} on N = {len(dataset)} samples at a global batch of "
                              f"{batch_size}: {err}") from err
        self.background = BackgroundPlanner(info.device) if selection.overlap else None
        self.ahead: Future | None = None
        """The next epoch's (plan, figures), computed ahead under selection.overlap."""
        self.previous: BatchPlan | None = None
        """The last epoch's plan, for selection/pair_repeat (not checkpointed: a diagnostic)."""

    def request(self, epoch: int, step: int, first_step: int, train_epoch: int, copy_bank: bool = False
                ) -> PlanRequest:
        """What ``epoch``'s plan is computed from: the bank as it is at ``step`` (a collective).

        The plan starts at global step ``first_step``; ``train_epoch`` is the epoch training is in, whose
        augmentations a refresh embeds. ``copy_bank`` for a plan computed while training goes on writing the
        bank (N x d twice: 1 GB at N = 1M, d = 128, so not when computed at once).
        """
        started = time.perf_counter()
        name = plan_strategy(self.selection, train_epoch)
        request = PlanRequest(epoch=epoch, strategy=name, seed=plan_seed(self.run_seed, epoch, name),
                              batch_size=self.batch_size, num_samples=len(self.dataset),
                              options=self.selection.options if name == self.selection.strategy else {},
                              rows=len(self.dataset) // self.batch_size if fills_epoch(name) else 0)
        if STRATEGIES[name].reads_embeddings:
            self.complete_bank(train_epoch, step)
            u, v = self.bank.u.numpy(), self.bank.v.numpy()
            request = replace(request, u=u.copy() if copy_bank else u, v=v.copy() if copy_bank else v,
                              tau=float(self.model.temperature()), loss=self.loss, loss_options=self.loss_options,
                              staleness=self.bank.staleness(first_step))
        return replace(request, prepare_seconds=time.perf_counter() - started)

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

    def plan(self, epoch: int, step: int) -> tuple[BatchPlan, SelectionFigures]:
        """``epoch``'s global batches, identical on every rank, and the figures that describe them: the
        plan computed ahead, or one made now from the bank at ``step``."""
        started = time.perf_counter()
        if self.ahead is not None:
            plan, figures = self.ahead.result()
            # the bank snapshot was taken on the training thread, the rest overlapped the previous epoch
            figures = replace(figures, wait_seconds=figures.prepare_seconds + time.perf_counter() - started)
            self.ahead = None
        else:
            plan, figures = compute_plan(self.request(epoch, step, step, epoch), device=self.info.device)
            figures.wait_seconds = time.perf_counter() - started
        if plan.epoch != epoch:
            raise RuntimeError(f"the plan computed ahead is for epoch {plan.epoch}, not {epoch}")
        check_same_on_all_ranks("batch plan", plan.digest())
        self.diagnose(plan, figures)
        return plan, figures

    def diagnose(self, plan: BatchPlan, figures: SelectionFigures) -> None:
        """Label purity where there are labels; pair repeat where this plan and the last epoch's are both
        partitions."""
        if self.dataset.labels is not None:
            figures.label_purity = label_purity(plan.batches, self.dataset.labels)
        last = self.previous
        if last is not None and STRATEGIES[plan.strategy].partition and STRATEGIES[last.strategy].partition:
            figures.pair_repeat = pair_repeat(plan.batches, last.batches, len(self.dataset))

    def plan_ahead(self, epoch: int, step: int, first_step: int, epochs: int) -> None:
        """Under selection.overlap, start computing epoch ``epoch + 1``'s plan (if the run has one) from the
        bank as it is at ``step``; it starts at global step ``first_step``."""
        if self.background is not None and epoch + 1 < epochs:
            self.ahead = self.background.submit(self.request(epoch + 1, step, first_step, epoch, copy_bank=True))

    def finish(self, plan: BatchPlan) -> None:
        """``plan``'s epoch is trained."""
        self.previous = plan

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

    def reselect(self, plan: BatchPlan, cursor: int, step: int, figures: SelectionFigures) -> BatchPlan:
        """A new plan for ``plan``'s epoch: its first ``cursor`` batches, then the rest selected again from
        the bank as it is at ``step`` (a collective): the samples of the rest re-partitioned (each sample is
        still trained once), or, for a strategy that ``fills_epoch``, new selections over all samples.
        The time it takes, all waited for, is added to the epoch's ``figures``."""
        started = time.perf_counter()
        request = self.request(plan.epoch, step, step, plan.epoch)
        request = replace(request, seed=plan_seed(self.run_seed, plan.epoch, plan.strategy, cursor))
        # the rest's figures are not reported (the epoch's are the first plan's), so only its batches are made
        if fills_epoch(plan.strategy):
            rest = select_plan(replace(request, rows=len(plan) - cursor), device=self.info.device)
        else:
            samples = np.sort(plan.batches[cursor:].ravel())
            request = replace(request, num_samples=len(samples), u=request.u[samples], v=request.v[samples])
            rest = samples[select_plan(request, device=self.info.device)]
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

    def wait(self) -> None:
        """Wait for the plan computed ahead (before a checkpoint barrier: every rank waits here, not there)."""
        if self.ahead is not None:
            self.ahead.result()

    def close(self) -> None:
        if self.background is not None:
            self.background.close()
