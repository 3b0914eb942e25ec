"""A batch plan and the per-rank sampler that walks it: rank r takes slice r of every global batch."""

import hashlib
from dataclasses import dataclass

import numpy as np
from torch.utils.data import Sampler


@dataclass
class BatchPlan:
    """Global batches of sample indices for one epoch, and how they were made."""

    batches: np.ndarray
    """int64 (n_batches, global_batch_size)."""
    epoch: int
    strategy: str

    def digest(self) -> str:
        """Content hash; equal on every rank or the ranks have diverged."""
        return hashlib.sha256(np.ascontiguousarray(self.batches, dtype=np.int64).tobytes()).hexdigest()

    def __len__(self) -> int:
        return len(self.batches)

    def describe(self, cursor: int) -> str:
        """Global batch ``cursor``, for error messages."""
        batch = self.batches[cursor]
        shown = ", ".join(map(str, batch[:16])) + (", ..." if len(batch) > 16 else "")
        return f"(epoch {self.epoch}, global batch {cursor}, indices [{shown}])"

    def state_dict(self) -> dict:
        return {"batches": self.batches.copy(), "epoch": self.epoch, "strategy": self.strategy}

    @classmethod
    def from_state_dict(cls, state: dict) -> "BatchPlan":
        return cls(np.asarray(state["batches"], dtype=np.int64), state["epoch"], state["strategy"])


class PlanSampler(Sampler[list[int]]):
    """Yields this rank's slice ``[r*B/W:(r+1)*B/W]`` of each global batch of its plan from ``cursor`` on.

    ``cursor`` counts the global batches already trained: the loop calls ``advance()`` after every step
    (a DataLoader draws ahead of training, so iterating cannot be what moves it), and ``state_dict()``
    taken between steps resumes exactly at the next batch. Between epochs it holds no plan.
    """

    def __init__(self, plan: BatchPlan | None, rank: int, world_size: int, cursor: int = 0):
        self.rank = rank
        self.world_size = world_size
        self.plan: BatchPlan | None = None
        self.cursor = 0
        if plan is not None:
            self.start(plan, cursor)

    def start(self, plan: BatchPlan, cursor: int = 0) -> None:
        """Walk ``plan`` from global batch ``cursor``."""
        if plan.batches.shape[1] % self.world_size:
            raise ValueError(
                f"global batch size {plan.batches.shape[1]} is not divisible by world_size={self.world_size}"
            )
        self.plan, self.cursor = plan, cursor

    def advance(self) -> None:
        """One more global batch trained."""
        self.cursor += 1

    @property
    def done(self) -> bool:
        return self.cursor >= len(self.plan)

    def local_slice(self, batch: np.ndarray) -> np.ndarray:
        local = len(batch) // self.world_size
        return batch[self.rank * local : (self.rank + 1) * local]

    def __iter__(self):
        for batch in self.plan.batches[self.cursor :]:
            yield self.local_slice(batch).tolist()

    def __len__(self) -> int:
        return len(self.plan) - self.cursor

    def state_dict(self) -> dict | None:
        return None if self.plan is None else {"plan": self.plan.state_dict(), "cursor": self.cursor}

    def load_state_dict(self, state: dict | None) -> None:
        if state is None:
            self.plan, self.cursor = None, 0
        else:
            self.start(BatchPlan.from_state_dict(state["plan"]), int(state["cursor"]))
