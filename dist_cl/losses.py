"""Contrastive losses over a global batch whose rows are spread across ranks.

Embeddings are L2-normalised; a logit is s_ij = <u_i, v_j> / tau. Each rank holds its local rows and
gathers every rank's rows with autograd, so the loss of a step is the loss of the whole global batch.
"""

import torch
import torch.nn.functional as F
from torch import nn

from dist_cl.distributed import gather_with_grad


def batch_infonce(u: torch.Tensor, v: torch.Tensor, tau: float) -> torch.Tensor:
    """Symmetric InfoNCE L(S) of each batch in ``u, v`` of shape (..., B, d) -> (...).

    L(S) = 1/B sum_i [-log softmax_j(s_ij)_i - log softmax_j(s_ji)_i] (the paper's loss; docs/DESIGN.md §1).
    """
    s = u @ v.transpose(-1, -2) / tau
    diag = s.diagonal(dim1=-2, dim2=-1)
    return (s.logsumexp(-1) - diag + s.logsumexp(-2) - diag).mean(-1)


def batch_ntxent(u: torch.Tensor, v: torch.Tensor, tau: float) -> torch.Tensor:
    """SimCLR NT-Xent of each batch in ``u, v`` of shape (..., B, d) -> (...), at ``NTXentLoss``'s scale.

    Each of the 2B views against the other 2B - 1: the mean over the 2B anchors of -log softmax at the
    anchor's other view, as ``NTXentLoss`` computes it over a gathered global batch.
    """
    b = u.shape[-2]
    z = torch.cat([u, v], dim=-2)
    s = z @ z.transpose(-1, -2) / tau
    s = s.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=s.device), float("-inf"))
    other_view = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(s.device)
    positives = s.gather(-1, other_view.expand(*s.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    return (s.logsumexp(-1) - positives).mean(-1)


BATCH_LOSSES = {"infonce": batch_infonce, "ntxent": batch_ntxent}
"""Each training loss (``loss.name``) per batch, as batch selection scores it: OSGD keeps the batches of
highest training loss, and the lift compares plans under it (docs/DESIGN.md §4)."""


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


class GlobalBatchLoss(nn.Module):
    """A loss over the gathered global batch, computed in float32 whatever the autocast around it.

    autocast runs matmuls in bf16/fp16 even on float32 inputs: at tau = 0.1 the logits of hard negatives,
    the ones loss-aware batches are made of, would be rounded by up to ~0.03. The features the model
    made under autocast are cast up to float32 (float64 stays float64) and the logits are computed with
    autocast off.
    """

    def __init__(self, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.rank = rank
        self.world_size = world_size

    def forward(self, u: torch.Tensor, v: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
        with torch.autocast(u.device.type, enabled=False):
            tau = _at_least_float32(tau) if isinstance(tau, torch.Tensor) else tau
            return self.loss(_at_least_float32(u), _at_least_float32(v), tau)

    def loss(self, u: torch.Tensor, v: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
        raise NotImplementedError


class InfoNCELoss(GlobalBatchLoss):
    """Symmetric InfoNCE (CLIP-style: B-1 negatives per direction) over the gathered global batch.

    Every rank computes its local rows against the global columns; the mean over ranks of the local
    losses is the global L(S), and DDP's gradient averaging makes the step that of the global loss.
    """

    def loss(self, u: torch.Tensor, v: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
        u_all, v_all = gather_with_grad(u), gather_with_grad(v)
        labels = torch.arange(u.shape[0], device=u.device) + self.rank * u.shape[0]
        loss_uv = F.cross_entropy(u @ v_all.T / tau, labels)
        loss_vu = F.cross_entropy(v @ u_all.T / tau, labels)
        return loss_uv + loss_vu


class NTXentLoss(GlobalBatchLoss):
    """SimCLR NT-Xent: each of the 2B views against the other 2B-1 (one positive, 2B-2 negatives).

    At the official scale (the mean over the 2B anchors, as the paper's code and SimCLR report it), which is
    half of ``InfoNCELoss``'s (a sum of two directions): the paper's learning rates for its NT-Xent runs
    (configs/cifar100_32px.yaml) then mean what they meant there under SGD-style optimizers, where a loss
    twice as large is a learning rate twice as large.
    """

    def loss(self, u: torch.Tensor, v: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
        b = u.shape[0]
        u_all, v_all = gather_with_grad(u), gather_with_grad(v)
        n = u_all.shape[0]
        keys = torch.cat([u_all, v_all])
        local = torch.arange(b, device=u.device) + self.rank * b
        logits = torch.cat([u, v]) @ keys.T / tau
        self_mask = torch.cat([local, local + n])
        logits[torch.arange(2 * b, device=u.device), self_mask] = float("-inf")
        labels = torch.cat([local + n, local])
        return F.cross_entropy(logits, labels)


LOSSES = {"infonce": InfoNCELoss, "ntxent": NTXentLoss}


def build_loss(name: str, rank: int, world_size: int) -> nn.Module:
    return LOSSES[name](rank=rank, world_size=world_size)
