"""Consecutive steps of a loss over fixed float64 global batches, each rank feeding its slice of each: the loss
of the global batch, its gradients w.r.t. every row of u and v, and (SogCLR) the u table this rank holds.

``record`` (under torchrun, by collectives.py): every rank saves the steps of each case as
OUT_DIR/<case>-rank<r>.pt.
``steps`` runs the same in one process (world size 1, no process group).
"""

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_cl.learn.losses import build_loss
from dist_cl.runtime.distributed import DistInfo, gather_rows

N, D, TAU = 10, 4, 0.5
BATCHES = [[0, 1, 2, 3], [2, 5, 3, 7], [7, 0, 9, 2]]
"""Global batches of SogCLR's steps: step 1 revisits 2 and 3 and meets 5 and 7 for the first time."""
CASES = {
    "sogclr": ("sogclr", {"num_samples": N, "gamma": 0.6}),
    "hcl": ("hcl", {"tau_plus": 0.1, "beta": 1.0}),
    "hcl_clamped": ("hcl", {"tau_plus": 0.8, "beta": 0.5}),
}
"""case: (loss name, its options). hcl_clamped: a tau_plus so large that the clamp of Ng is active for some
anchors of these batches."""


def embeddings(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s unit rows (u, v) of its global batch; v is u plus noise, so positives vary in strength."""
    g = torch.Generator().manual_seed(step)
    u = F.normalize(torch.randn(len(BATCHES[step]), D, generator=g, dtype=torch.float64), dim=-1)
    v = F.normalize(u + torch.randn(u.shape, generator=g, dtype=torch.float64), dim=-1)
    return u, v


def steps(case: str, rank: int = 0, world_size: int = 1) -> list[dict]:
    """Every step of ``case`` (a CASES key) on this rank: the global loss, the gradients of the global loss
    w.r.t. all rows of u and v (DDP averages the ranks' gradients, so each rank back-propagates its loss / W),
    and the u table (SogCLR) after the step."""
    name, options = CASES[case]
    loss_fn = build_loss(name, rank, world_size, **options)
    out = []
    for step, batch in enumerate(BATCHES):
        rows = slice(rank * len(batch) // world_size, (rank + 1) * len(batch) // world_size)
        u, v = (x[rows].clone().requires_grad_() for x in embeddings(step))
        loss = loss_fn(u, v, TAU, torch.tensor(batch)[rows]) / world_size
        loss.backward()
        total = loss.detach().clone()
        if world_size > 1:
            dist.all_reduce(total)
        out.append({"loss": total.item(), "grad_u": gather_rows(u.grad), "grad_v": gather_rows(v.grad),
                    "u_table": loss_fn.u_table.clone() if hasattr(loss_fn, "u_table") else None})
    return out


def record(out: Path, info: DistInfo) -> None:
    for case in CASES:
        torch.save(steps(case, info.rank, info.world_size), out / f"{case}-rank{info.rank}.pt")
