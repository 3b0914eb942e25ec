"""Under torchrun: DDP-averaged gradients of a gathered contrastive loss, saved by rank 0.

Usage: ddp_loss_grads.py OUT_DIR LOSS_NAME... (one launch for every loss: OUT_DIR/LOSS_NAME.pt each). The
global batch is fixed by seed; each rank feeds its slice.
"""

import sys

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from dist_cl.learn.losses import build_loss
from dist_cl.runtime.distributed import DistInfo, close_distributed, exit_process, init_distributed


def make_problem():
    g = torch.Generator().manual_seed(0)
    x_a = torch.randn(8, 5, generator=g, dtype=torch.float64)
    x_b = torch.randn(8, 5, generator=g, dtype=torch.float64)
    model = torch.nn.Linear(5, 4).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(4, 5, generator=g, dtype=torch.float64))
        model.bias.copy_(torch.randn(4, generator=g, dtype=torch.float64))
    return x_a, x_b, model


def save_grads(loss_name: str, out: str, info: DistInfo) -> None:
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
                   f"{out}/{loss_name}.pt")


def main():
    out, loss_names = sys.argv[1], sys.argv[2:]
    info = init_distributed(60)
    for loss_name in loss_names:
        save_grads(loss_name, out, info)
    close_distributed()


if __name__ == "__main__":
    main()
    exit_process(0)
