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

    def state_dict(self) -> dict:
        return {"batches": self.batches.copy(), "epoch": self.epoch, "strategy": self.strategy}

    @classmethod
    def from_state_dict(cls, state: dict) -> "BatchPlan":
        return cls(np.asarray(state["batches"], dtype=np.int64), state["epoch"], state["strategy"])


class PlanSampler(Sampler[list[int]]):
    """Yields this rank's slice ``[r*B/W:(r+1)*B/W]`` of each global batch from ``cursor`` on.

    ``cursor`` counts the global batches already trained; the trainer advances it after every step,
    so ``state_dict()`` taken between steps resumes exactly at the next batch.
    """

    def __init__(self, plan: BatchPlan, rank: int, world_size: int, cursor: int = 0):
        global_batch_size = plan.batches.shape[1]
        if global_batch_size % world_size:
            raise ValueError(
                f"global batch size {global_batch_size} is not divisible by world_size={world_size}"
            )
        self.plan = plan
        self.rank = rank
        self.world_size = world_size
        self.local_batch_size = global_batch_size // world_size
        self.cursor = cursor

    def local_slice(self, batch: np.ndarray) -> np.ndarray:
        lo = self.rank * self.local_batch_size
        return batch[lo : lo + self.local_batch_size]

    def __iter__(self):
        for batch in self.plan.batches[self.cursor :]:
            yield self.local_slice(batch).tolist()

    def __len__(self) -> int:
        return len(self.plan) - self.cursor

    def state_dict(self) -> dict:
        return {"plan": self.plan.state_dict(), "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.plan = BatchPlan.from_state_dict(state["plan"])
        self.cursor = int(state["cursor"])
