"""Under torchrun: gradients of the free-embedding model (no DDP: it averages its own sparse gradients).

``record`` (by collectives.py): the global batch is fixed; each rank feeds its slice and saves its gradients
as OUT_DIR/rank<r>.pt.
"""

from pathlib import Path

import torch

from dist_cl.learn.losses import build_loss
from dist_cl.learn.models import FreeEmbeddings
from dist_cl.runtime.distributed import DistInfo

N, D, TAU = 12, 5, 0.3
BATCH = torch.tensor([7, 2, 11, 0, 5, 9, 3, 10])


def make_model() -> FreeEmbeddings:
    return FreeEmbeddings(N, D, TAU, learnable_tau=True, seed=4).double()


def record(out: Path, info: DistInfo) -> None:
    model = make_model()
    local = BATCH.chunk(info.world_size)[info.rank]
    u, v, tau = model(local, local)
    build_loss("infonce", info.rank, info.world_size)(u, v, tau).backward()
    torch.save({"u": model.u.grad, "v": model.v.grad, "log_tau": model.temperature.log_tau.grad},
               out / f"rank{info.rank}.pt")
