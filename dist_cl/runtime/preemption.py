"""Preemption: a scheduler's stop signal becomes a checkpoint at a step every rank agrees on, then an exit
code that asks to be requeued (docs/DESIGN.md §7)."""

import signal
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

REQUEUE_EXIT_CODE = 75
"""The exit code of a preempted run: EX_TEMPFAIL of sysexits.h ("a temporary failure; retry later").
Every rank finished the same step and its checkpoint is written; run the same command again to resume."""


class Preempted(Exception):
    """A stop signal arrived; every rank finished its step and the checkpoint of that step is written."""


class StopRequest:
    """SIGTERM (what SLURM and Kubernetes send before killing a job, and torchrun forwards) or SIGUSR1
    (SLURM's --signal, forwarded by torchrun --signals-to-handle) asks the run to stop. The handler only
    records it; the step in flight finishes, and every rank stops after the same step, whichever ranks the
    signal reached and when: each step reduces ``requested`` with its finite flags (``TrainStep``), and
    ``agreed`` is the same reduction on its own, for the end of an epoch."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signal: int | None = None

    def request(self, signum: int, frame) -> None:
        self.signal = signum

    @property
    def requested(self) -> bool:
        """Whether this rank was asked to stop (this rank's alone; see ``agreed``)."""
        return self.signal is not None

    @contextmanager
    def handling(self) -> Iterator[None]:
        """The stop signals set this request for the body; their previous handlers are restored after it."""
        previous = {s: signal.signal(s, self.request) for s in self.SIGNALS}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def agreed(self) -> bool:
        """Whether any rank was asked to stop (a collective: every rank gets the same answer)."""
        asked = torch.tensor([self.requested], dtype=torch.int32)
        dist.all_reduce(asked, op=dist.ReduceOp.MAX)
        return bool(asked.item())
