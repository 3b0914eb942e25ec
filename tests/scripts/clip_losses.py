"""Under torchrun: dist_cl's InfoNCE and SigLIP losses beside open_clip's ClipLoss and SigLipLoss on each rank's
slice of one float64 global batch, with the gradients every rank's features get; saved by rank 0.

``record`` (by collectives.py) writes OUT_DIR/losses.pt: for each of dist_infonce, open_clip_clip,
dist_siglip, open_clip_siglip, the per-rank losses and the gradients of the summed losses w.r.t. u and v (rows
of all ranks, in global order).
"""

from pathlib import Path

import open_clip
import torch

from dist_cl.learn.losses import build_loss
from dist_cl.runtime.distributed import DistInfo, gather_rows

TAU, BIAS = 0.3, -2.0


def make_features(n: int = 8, d: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch, the same on every rank and in tests/test_clip.py."""
    g = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    v = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return u, v


def losses(info: DistInfo) -> dict:
    scale = torch.tensor(1 / TAU, dtype=torch.float64)
    tau_bias = torch.tensor([TAU, BIAS], dtype=torch.float64)
    clip = open_clip.loss.ClipLoss(local_loss=True, gather_with_grad=True, rank=info.rank,
                                   world_size=info.world_size)
    siglip = open_clip.loss.SigLipLoss(rank=info.rank, world_size=info.world_size)
    return {
        "dist_infonce": lambda u, v: build_loss("infonce", info.rank, info.world_size)(u, v, TAU),
        "open_clip_clip": lambda u, v: clip(u, v, scale),
        "dist_siglip": lambda u, v: build_loss("siglip", info.rank, info.world_size)(u, v, tau_bias),
        "open_clip_siglip": lambda u, v: siglip(u, v, scale, torch.tensor(BIAS, dtype=torch.float64)),
    }


def record(out: Path, info: DistInfo) -> None:
    u_all, v_all = make_features()
    b = u_all.shape[0] // info.world_size
    rows = slice(info.rank * b, (info.rank + 1) * b)
    results = {}
    for name, loss_fn in losses(info).items():
        u, v = u_all[rows].clone().requires_grad_(), v_all[rows].clone().requires_grad_()
        loss = loss_fn(u, v)
        loss.backward()
        results[name] = {"loss": gather_rows(loss.detach().reshape(1)), "grad_u": gather_rows(u.grad),
                         "grad_v": gather_rows(v.grad)}
    if info.rank == 0:
        torch.save(results, out / "losses.pt")
