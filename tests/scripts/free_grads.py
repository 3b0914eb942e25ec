"""Under torchrun: gradients of the free-embedding model (no DDP: it averages its own sparse gradients).

Usage: free_grads.py OUT_DIR. The global batch is fixed; each rank feeds its slice and saves its gradients.
"""

import sys

import torch

from dist_cl.learn.losses import build_loss
from dist_cl.learn.models import FreeEmbeddings
from dist_cl.runtime.distributed import close_distributed, exit_process, init_distributed

N, D, TAU = 12, 5, 0.3
BATCH = torch.tensor([7, 2, 11, 0, 5, 9, 3, 10])


def make_model() -> FreeEmbeddings:
    return FreeEmbeddings(N, D, TAU, learnable_tau=True, seed=4).double()


def main():
    out = sys.argv[1]
    info = init_distributed(60)
    model = make_model()
    local = BATCH.chunk(info.world_size)[info.rank]
    u, v, tau = model(local, local)
    build_loss("infonce", info.rank, info.world_size)(u, v, tau).backward()
    torch.save({"u": model.u.grad, "v": model.v.grad, "log_tau": model.temperature.log_tau.grad},
               f"{out}/rank{info.rank}.pt")
    close_distributed()


if __name__ == "__main__":
    main()
    exit_process(0)
