"""Embedding bank: the latest detached (u, v) of every sample by index, identical on all ranks after sync.

Training steps write their local rows for free: they stay on the training device, where the step made
them, so a step never waits for a copy to the host. ``sync`` all-gathers only the rows written since the
last sync (each rank has written the same number: its slice of the same global batches) on that device,
then copies them to the host bank once; one epoch costs one gather of N rows in total, not W copies of
the whole bank. The bank itself lives on the host, where the strategies read it.

A run whose plans read no bank (``dist_cl.plan.planner.bank_use``) keeps one of no rows.
"""

import torch

from dist_cl.runtime.distributed import gather_rows, world_size


class EmbeddingBank:
    def __init__(self, num_samples: int, dim: int, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        """Where pending rows wait for the next sync, and where it gathers them."""
        self.u = torch.zeros(num_samples, dim)
        self.v = torch.zeros(num_samples, dim)
        self.written_at = torch.full((num_samples,), -1, dtype=torch.int64)
        """Global step of each row's last write; -1 where never written."""
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = []

    def update(self, indices: torch.Tensor, u: torch.Tensor, v: torch.Tensor, step: int) -> None:
        """Record this rank's rows; they reach the other ranks at the next ``sync``."""
        self._pending.append((indices.to(self.device, non_blocking=True), u.detach().float(), v.detach().float(),
                              step))

    def _write(self, indices: torch.Tensor, u: torch.Tensor, v: torch.Tensor, steps: torch.Tensor) -> None:
        # Rows are applied in step order, so the newest write wins whichever rank made it.
        order = torch.argsort(steps, stable=True)
        self.u[indices[order]] = u[order]
        self.v[indices[order]] = v[order]
        self.written_at[indices[order]] = steps[order]

    def sync(self) -> None:
        """Exchange pending rows so every rank holds the same bank. A collective: call on all ranks."""
        if not len(self.u):  # a bank of no rows, the same on every rank: nothing to exchange
            return
        dim = self.u.shape[1]
        rows = {"device": self.device}
        if self._pending:
            idx = torch.cat([p[0] for p in self._pending])
            u = torch.cat([p[1] for p in self._pending])
            v = torch.cat([p[2] for p in self._pending])
            steps = torch.cat([torch.full((len(p[0]),), p[3], dtype=torch.int64, **rows) for p in self._pending])
        else:
            idx, u, v, steps = (torch.zeros(0, dtype=torch.int64, **rows), torch.zeros(0, dim, **rows),
                                torch.zeros(0, dim, **rows), torch.zeros(0, dtype=torch.int64, **rows))
        self._pending.clear()
        if world_size() > 1:
            counts = gather_rows(torch.tensor([len(idx)], **rows))
            if (counts != counts[0]).any():
                raise RuntimeError(f"ranks wrote unequal numbers of bank rows {counts.tolist()}; plans diverged")
            meta = gather_rows(torch.stack([idx, steps], 1))
            idx, steps = meta[:, 0], meta[:, 1]
            u, v = gather_rows(torch.cat([u, v], 1)).split(dim, dim=1)
        self._write(idx.cpu(), u.cpu(), v.cpu(), steps.cpu())

    def missing(self) -> torch.Tensor:
        """Indices never written (e.g. the remainder dropped from every batch so far)."""
        return torch.nonzero(self.written_at < 0).flatten()

    def fill(self, indices: torch.Tensor, u: torch.Tensor, v: torch.Tensor, step: int) -> None:
        """Write rows that every rank computed identically (a sharded refresh), without a sync."""
        self._write(indices, u.float(), v.float(), torch.full((len(indices),), step, dtype=torch.int64))

    def staleness(self, step: int) -> float:
        """Mean age in optimizer steps of the rows written so far."""
        written = self.written_at >= 0
        return float((step - self.written_at[written]).double().mean()) if written.any() else 0.0

    def state_dict(self) -> dict:
        if self._pending:
            raise RuntimeError("sync() the bank before saving it: rows of other ranks are still pending")
        return {"u": self.u.clone(), "v": self.v.clone(), "written_at": self.written_at.clone()}

    def load_state_dict(self, state: dict) -> None:
        if not len(self.u):  # a run that reads no bank; checkpoints written before it kept none still hold one
            return
        self.u.copy_(state["u"])
        self.v.copy_(state["v"])
        self.written_at.copy_(state["written_at"])
        self._pending.clear()
