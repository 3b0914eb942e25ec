"""Under torchrun: fill the bank from each rank's slices of a random plan (as training does), sync it,
select with sc_global (and with its false-negative window), and save (bank, plan, this rank's slices, the
window's plan) per rank as OUT_DIR/rank<r>.pt (``record``, by collectives.py)."""

from pathlib import Path

import numpy as np
import torch

from dist_cl.plan.bank import EmbeddingBank
from dist_cl.plan.sampler import BatchPlan, PlanSampler
from dist_cl.runtime.distributed import DistInfo, distributed_map
from dist_cl.selection import select_batches

N, D, B, CELL = 960, 16, 24, 96


def embeddings() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(10, D))
    u = centres[np.arange(N) % 10] + 0.3 * rng.normal(size=(N, D))
    v = u + 0.1 * rng.normal(size=(N, D))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return u.astype(np.float32), v.astype(np.float32)


def record(out: Path, info: DistInfo) -> None:
    u, v = embeddings()
    bank = EmbeddingBank(N, D)
    warmup = PlanSampler(BatchPlan(select_batches("random", u, v, B, seed=1), 0, "random"), info.rank, info.world_size)
    for step, local in enumerate(warmup):
        local = torch.tensor(local)
        bank.update(local, torch.from_numpy(u[local]), torch.from_numpy(v[local]), step)
    bank.sync()
    # small cells, so the per-cell work is dealt over the ranks
    batches = select_batches("sc_global", bank.u.numpy(), bank.v.numpy(), B, seed=3, tau=0.2, cell_size=CELL,
                             map_fn=distributed_map)
    plan = BatchPlan(batches, 1, "sc_global")
    slices = list(PlanSampler(plan, info.rank, info.world_size))
    window = select_batches("sc_global", bank.u.numpy(), bank.v.numpy(), B, seed=3, tau=0.2, cell_size=CELL,
                            false_negative_window=3, map_fn=distributed_map)
    torch.save({"bank": bank.state_dict(), "plan": plan.batches, "slices": slices, "window_plan": window},
               out / f"rank{info.rank}.pt")
