"""Epoch plans from a snapshot of the bank: computed when the epoch starts, or ahead, while the previous
epoch trains (``selection.overlap``).

A plan is a pure function of its ``PlanRequest`` (strategy, seed, bank snapshot, tau), so it is the same
whichever thread or world size computes it, and a run killed mid-epoch resumes with the same next plan.
"""

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.distributed as dist

from dist_cl.distributed import distributed_map
from dist_cl.sampler import BatchPlan
from dist_cl.selection import STRATEGIES, lift, select_batches


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
    u: np.ndarray | None = None
    """The bank (a copy where training goes on writing it meanwhile); None for strategies that ignore it."""
    v: np.ndarray | None = None
    staleness: float = 0.0
    """Mean age in steps of the snapshot's rows at the plan's first step."""
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


def compute_plan(request: PlanRequest, map_fn=distributed_map, device: torch.device | None = None
                 ) -> tuple[BatchPlan, dict]:
    """The plan and the figures that describe it (TensorBoard ``selection/*``); ``device``: where a
    strategy that computes on one runs (the rank's)."""
    started = time.perf_counter()
    figures = {}
    if request.u is not None:
        batches = select_everywhere(request.strategy, request.u, request.v, request.batch_size, seed=request.seed,
                                    tau=request.tau, map_fn=map_fn, device=device, **request.options)
        figures["selection/lift"] = lift(request.u, request.v, batches, tau=request.tau, seed=request.seed,
                                         dtype=torch.float32)
        figures["selection/bank_staleness"] = request.staleness
    else:
        batches = select_batches(request.strategy, None, None, request.batch_size, seed=request.seed,
                                 num_samples=request.num_samples, **request.options)
    figures["selection/prepare_seconds"] = request.prepare_seconds
    figures["selection/seconds"] = request.prepare_seconds + time.perf_counter() - started
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


def resolved(plan: BatchPlan, figures: dict) -> Future:
    """A finished future holding ``(plan, figures)``, e.g. a next plan read from a checkpoint."""
    future = Future()
    future.set_result((plan, figures))
    return future
