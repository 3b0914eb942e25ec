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


def compute_plan(request: PlanRequest, map_fn=distributed_map) -> tuple[BatchPlan, dict]:
    """The plan and the figures that describe it (TensorBoard ``selection/*``)."""
    started = time.perf_counter()
    figures = {}
    if request.u is not None:
        batches = select_batches(request.strategy, request.u, request.v, request.batch_size, seed=request.seed,
                                 tau=request.tau, map_fn=map_fn, **request.options)
        figures["selection/lift"] = lift(request.u, request.v, batches, tau=request.tau, seed=request.seed,
                                         dtype=torch.float32)
        figures["selection/bank_staleness"] = request.staleness
    else:
        empty = np.zeros((request.num_samples, 1), dtype=np.float32)
        batches = select_batches(request.strategy, empty, empty, request.batch_size, seed=request.seed,
                                 **request.options)
    figures["selection/prepare_seconds"] = request.prepare_seconds
    figures["selection/seconds"] = request.prepare_seconds + time.perf_counter() - started
    return BatchPlan(batches, request.epoch, request.strategy), figures


class BackgroundPlanner:
    """Computes one plan at a time on a worker thread while the main thread trains.

    Its collectives (sc_global's cells dealt over ranks) run on a process group of their own, so they
    never interleave with DDP's on the default group. A collective: construct it on every rank.
    """

    def __init__(self):
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dist_cl-plan")

    def submit(self, request: PlanRequest) -> Future:
        return self.executor.submit(compute_plan, request, partial(distributed_map, group=self.group))

    def close(self) -> None:
        self.executor.shutdown(wait=True)


def resolved(plan: BatchPlan, figures: dict) -> Future:
    """A finished future holding ``(plan, figures)``, e.g. a next plan read from a checkpoint."""
    future = Future()
    future.set_result((plan, figures))
    return future
