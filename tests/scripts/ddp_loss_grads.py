"""Under torchrun: DDP-averaged gradients of a gathered contrastive loss, saved by rank 0.

``record`` (by collectives.py) writes OUT_DIR/<loss>.pt for each of LOSSES. The global batch is fixed by seed;
each rank feeds its slice.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from dist_cl.learn.losses import build_loss
from dist_cl.runtime.distributed import DistInfo

LOSSES = ("infonce", "ntxent")
"""The losses that gather the global batch."""


def make_problem():
    g = torch.Generator().manual_seed(0)
    x_a = torch.randn(8, 5, generator=g, dtype=torch.float64)
    x_b = torch.randn(8, 5, generator=g, dtype=torch.float64)
    model = torch.nn.Linear(5, 4).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(4, 5, generator=g, dtype=torch.float64))
        model.bias.copy_(torch.randn(4, generator=g, dtype=torch.float64))
    return x_a, x_b, model


def save_grads(loss_name: str, out: Path, info: DistInfo) -> None:
    x_a, x_b, model = make_problem()
    ddp = DistributedDataParallel(model)
    rows = slice(info.rank * 8 // info.world_size, (info.rank + 1) * 8 // info.world_size)
    loss_fn = build_loss(loss_name, info.rank, info.world_size)
    u = F.normalize(ddp(x_a[rows]), dim=-1)
    v = F.normalize(ddp(x_b[rows]), dim=-1)
    loss = loss_fn(u, v, 0.5)
    loss.backward()
    losses = [None] * info.world_size
    torch.distributed.all_gather_object(losses, loss.item())
    if info.rank == 0:
        torch.save({"weight": model.weight.grad, "bias": model.bias.grad, "loss": sum(losses) / len(losses)},
                   out / f"{loss_name}.pt")


def record(out: Path, info: DistInfo) -> None:
    for loss_name in LOSSES:
        save_grads(loss_name, out, info)
