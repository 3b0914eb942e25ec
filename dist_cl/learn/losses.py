"""Contrastive losses over a global batch whose rows are spread across ranks.

Embeddings are L2-normalised; a logit is s_ij = <u_i, v_j> / tau. Each rank holds its local rows and
gathers every rank's rows with autograd, so the loss of a step is the loss of the whole global batch.
Every loss is the mean of its per-anchor terms over this rank's rows: DDP's gradient average over the
ranks then makes the step that of the global batch's loss.

The losses of the paper's code (krafton-ai/mini-batch-cl, ``sogclr/builder.py``: ``dynamic_contrastive_loss``
and ``hcl_loss``; ``sogclr/simclr_utils.py``: NT-Xent) are at their official scale; docs/DESIGN.md §1 says
which scale each is at and why.

Image–text pairs (u = image, v = caption; ``model.text_tower``) train with ``InfoNCELoss`` or ``SigLIPLoss``,
whose every logit pairs an image with a caption. NT-Xent, SogCLR and HCL contrast each anchor with the other
2B-2 views, u-u and v-v pairs among them: for two views of one image those are negatives like any other, for
image–text they would add image–image and text–text terms that neither CLIP nor SigLIP has, so the config
refuses them with a text tower (dist_cl.config.validation).
"""

import torch
import torch.nn.functional as F
from torch import nn

from dist_cl.config import LossConfig
from dist_cl.runtime.distributed import gather_rows, gather_with_grad


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
    partner, _ = _pair_masks(b, b, 0, s.device)
    positives = s.gather(-1, partner.expand(*s.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    return (s.logsumexp(-1) - positives).mean(-1)


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


class GlobalBatchLoss(nn.Module):
    """A loss over the gathered global batch, computed in float32 whatever the autocast around it.

    autocast runs matmuls in bf16/fp16 even on float32 inputs: at tau = 0.1 the logits of hard negatives,
    the ones loss-aware batches are made of, would be rounded by up to ~0.03. The features the model
    made under autocast are cast up to float32 (float64 stays float64) and the logits are computed with
    autocast off.
    """

    scores_itself = True
    """The loss of a batch depends on that batch alone, so it is its own scoring loss (``score``)."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.rank = rank
        self.world_size = world_size

    def forward(self, u: torch.Tensor, v: torch.Tensor, tau: torch.Tensor | float,
                index: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of this rank's rows ``u, v`` against the global batch; ``index``: their sample indices, read
        by a loss with per-sample state (SogCLR) and ignored by the others."""
        with torch.autocast(u.device.type, enabled=False):
            tau = _at_least_float32(tau) if isinstance(tau, torch.Tensor) else tau
            return self.loss(_at_least_float32(u), _at_least_float32(v), tau, index)

    def loss(self, u: torch.Tensor, v: torch.Tensor, tau: torch.Tensor | float,
             index: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def score(self, u: torch.Tensor, v: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
        """How hard a batch is, for ranking and realised lift (a collective): the loss itself for a loss defined
        per batch. Never reads or writes per-sample state."""
        return self(u, v, tau)


class InfoNCELoss(GlobalBatchLoss):
    """Symmetric InfoNCE (CLIP-style: B-1 negatives per direction) over the gathered global batch.

    Every rank computes its local rows against the global columns; the mean over ranks of the local
    losses is the global L(S), and DDP's gradient averaging makes the step that of the global loss.

    It is twice ``open_clip.loss.ClipLoss`` at logit_scale = 1/tau (ClipLoss averages the two directions,
    the paper's L(S) sums them); on each rank, twice ClipLoss(local_loss=True, gather_with_grad=True), whose
    rows are this rank's against the gathered columns too (local_loss=False gives every rank the whole global
    batch's loss). tests/test_clip.py checks both, with gradients, on 1 and 2 ranks.
    """

    def loss(self, u, v, tau, index=None) -> torch.Tensor:
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

    def loss(self, u, v, tau, index=None) -> torch.Tensor:
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


class SigLIPLoss(GlobalBatchLoss):
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023) over the gathered global batch of N pairs:

        loss = -1/N sum_ij log sigmoid(z_ij (<u_i, v_j> / tau + b)),   z_ij = 1 if i = j else -1

    with b the model's learnt logit bias: the third argument is (tau, b) (``ImageTextModel``). Each rank sums
    its rows u_i against all N captions and divides by its b rows, exactly ``open_clip.loss.SigLipLoss`` on that
    rank (which passes the captions round the ranks instead of gathering them); the mean over ranks, what DDP's
    gradient average trains, is SigLipLoss of the whole global batch in one process.
    """

    def loss(self, u, v, tau, index=None) -> torch.Tensor:
        tau, bias = tau.unbind()
        v_all = gather_with_grad(v)
        logits = u @ v_all.T / tau + bias
        labels = -torch.ones_like(logits)
        labels[torch.arange(u.shape[0], device=u.device), torch.arange(u.shape[0], device=u.device)
               + self.rank * u.shape[0]] = 1.0
        return -F.logsigmoid(labels * logits).sum() / u.shape[0]


def _pair_masks(b: int, n: int, rank: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(partner columns, negatives mask) of this rank's 2b anchors [u; v] against the 2n keys [u_all; v_all]:
    anchor u_i's partner is v_i and v_i's is u_i; its negatives are the other 2n - 2 keys (not itself)."""
    local = torch.arange(b, device=device) + rank * b
    rows = torch.arange(2 * b, device=device)
    partner = torch.cat([local + n, local])
    negatives = torch.ones(2 * b, 2 * n, dtype=torch.bool, device=device)
    negatives[rows, torch.cat([local, local + n])] = False
    negatives[rows, partner] = False
    return partner, negatives


class SogCLRLoss(GlobalBatchLoss):
    """SogCLR's dynamic contrastive loss (official ``dynamic_contrastive_loss``, sogclr/builder.py L70-L134),
    over the gathered global batch, with its per-sample moving average u of the negative term.

    Anchor u_i (view a) has the 2B-2 negatives {v_j, u_j : j != i} (builder.py L91-L104; the paper's code masks
    u_i's self-similarity with -1e9, here it is masked out), and likewise anchor v_i. With
    g_i = mean over those negatives of exp(s_ij / tau):

        u_a,i = (1 - gamma) u[i] + gamma g_a,i     u_b,i likewise                   (L110-L111)
        u[i] <- (u_a,i + u_b,i) / 2, on every rank                                  (L113-L120)
        loss = 1/B sum_i [ -c_ii + 1/(2B-2) sum_j w_ij c_ij ]_a + [ ... ]_b         (L122-L132)

    where c_ij = <u_i, v_j> is a cosine (the paper's code does not divide these logits by tau) and
    w_ij = exp(c_ij / tau) / u_a,i is detached (L122-L123). gamma is 1 where u[i] is still 0: a sample's first
    visit initialises its u (L106-L108; that code tests the whole batch, here each sample: docs/DESIGN.md §6).

    Scale: the official one, the sum over the two views, in cosines: its gradient is tau times that of
    SogCLR's objective -s_ii + log mean_j e^{s_ij} (docs/DESIGN.md §1). tau gets no gradient (it only enters
    the detached weights), so it cannot be learnt. A batch's loss depends on the u history, so it is scored
    (``score``) with the stateless symmetric InfoNCE at the same tau.

    The u table (``u_table``, float64 so it holds the computation's float32 or float64 values exactly) is a
    buffer indexed by sample: every rank writes the rows of the whole global batch (indices and values are
    gathered), so all ranks hold the same table, and it is saved in checkpoints with the loss.
    """

    scores_itself = False

    def __init__(self, rank: int = 0, world_size: int = 1, *, num_samples: int, gamma: float):
        super().__init__(rank, world_size)
        self.gamma = gamma
        self.register_buffer("u_table", torch.zeros(num_samples, dtype=torch.float64))
        self.scorer = InfoNCELoss(rank, world_size)

    def loss(self, u, v, tau, index) -> torch.Tensor:
        if index is None:
            raise ValueError("SogCLRLoss needs the sample indices of its rows (index=)")
        b = u.shape[0]
        u_all, v_all = gather_with_grad(u), gather_with_grad(v)
        n = u_all.shape[0]
        partner, negatives = _pair_masks(b, n, self.rank, u.device)
        cosines = torch.cat([u, v]) @ torch.cat([u_all, v_all]).T  # rows: anchors [u; v]
        with torch.no_grad():
            exp_neg = (cosines / tau).masked_fill(~negatives, float("-inf")).exp()
            index = index.to(self.u_table.device)
            old = self.u_table[index].to(exp_neg.dtype).repeat(2)  # one u per sample, read by both views
            gamma = torch.full_like(old, self.gamma).masked_fill_(old == 0, 1.0)
            new = (1 - gamma) * old + gamma * exp_neg.sum(1) / (2 * (n - 1))
            weights = exp_neg / new[:, None]
            rows, values = gather_rows(index), gather_rows(new.view(2, b).mean(0))
            self.u_table[rows] = values.to(self.u_table.dtype)
        positive = cosines[torch.arange(2 * b, device=u.device), partner]
        per_anchor = -positive + (weights * cosines).sum(1) / (2 * (n - 1))
        return per_anchor.view(2, b).sum(0).mean()

    def score(self, u, v, tau) -> torch.Tensor:
        return self.scorer(u, v, tau)


class HCLLoss(GlobalBatchLoss):
    """Robinson et al.'s hard-negative contrastive loss, estimator "hard" (official ``hcl_loss``,
    sogclr/builder.py L136-L180), over the gathered global batch: each of the 2B views against its partner and
    the other 2B-2 views (N = 2B-2 negatives), with p = exp(s) of the positive pair and n_j = exp(s_ij) of the
    negatives:

        Ng = (-tau_plus N p + sum_j n_j^(1+beta) / mean_j n_j^beta) / (1 - tau_plus)   (L166-L169)
        Ng <- max(Ng, N e^{-1/tau})                                                    (L171)
        loss = mean over the 2B anchors of -log(p / (p + Ng))                         (L178)

    (the paper's code writes n_j^beta as ``(beta * neg.log()).exp()``). Scale: the official one, the mean over
    the 2B anchors, like ``NTXentLoss``, which it equals at tau_plus = 0, beta = 0.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, *, tau_plus: float, beta: float):
        super().__init__(rank, world_size)
        self.tau_plus, self.beta = tau_plus, beta

    def loss(self, u, v, tau, index=None) -> torch.Tensor:
        b = u.shape[0]
        u_all, v_all = gather_with_grad(u), gather_with_grad(v)
        n = u_all.shape[0]
        partner, negatives = _pair_masks(b, n, self.rank, u.device)
        logits = torch.cat([u, v]) @ torch.cat([u_all, v_all]).T / tau
        rows = torch.arange(2 * b, device=u.device)
        return _hcl(logits[rows, partner], logits[negatives].view(2 * b, 2 * n - 2), tau, self.tau_plus,
                    self.beta).mean()


def _hcl(pos_logits: torch.Tensor, neg_logits: torch.Tensor, tau, tau_plus: float, beta: float) -> torch.Tensor:
    """HCL's -log(p / (p + Ng)) of each anchor from its positive logit (...) and its N negative logits (..., N)
    (official ``hcl_loss``, sogclr/builder.py L161-L178)."""
    m = neg_logits.shape[-1]
    pos = pos_logits.exp()
    neg, imp = neg_logits.exp(), (beta * neg_logits).exp()
    reweight_neg = (imp * neg).sum(-1) / imp.mean(-1)
    ng = (-tau_plus * m * pos + reweight_neg) / (1 - tau_plus)
    floor = m * torch.exp(-1 / torch.as_tensor(tau, dtype=neg_logits.dtype, device=neg_logits.device))
    ng = torch.clamp(ng, min=floor)
    return -torch.log(pos / (pos + ng))


def batch_hcl(u: torch.Tensor, v: torch.Tensor, tau: float, *, tau_plus: float, beta: float) -> torch.Tensor:
    """HCL of each batch in ``u, v`` of shape (..., B, d) -> (...), at ``HCLLoss``'s scale."""
    b = u.shape[-2]
    partner, negatives = _pair_masks(b, b, 0, u.device)
    z = torch.cat([u, v], dim=-2)
    s = z @ z.transpose(-1, -2) / tau
    positives = s.gather(-1, partner.expand(*s.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    return _hcl(positives, s[..., negatives].unflatten(-1, (2 * b, 2 * b - 2)), tau, tau_plus, beta).mean(-1)


LOSSES = {"infonce": InfoNCELoss, "ntxent": NTXentLoss, "sogclr": SogCLRLoss, "hcl": HCLLoss, "siglip": SigLIPLoss}

BATCH_LOSSES = {"infonce": batch_infonce, "ntxent": batch_ntxent, "sogclr": batch_infonce, "hcl": batch_hcl}
"""Each training loss (``loss.name``) per batch, as batch selection scores it: OSGD keeps the batches of
highest training loss, and the lift compares plans under it (docs/DESIGN.md §4). SogCLR's loss of a batch
depends on its u history, which a bank snapshot does not hold: it is scored with the stateless symmetric
InfoNCE at the same tau, as ``SogCLRLoss.score`` scores it. SigLIP's depends on its learnt logit bias, which
the bank does not hold either, and which ranks batches (unlike a scale, it is not a common factor): the config
refuses siglip with a strategy that scores batches (dist_cl.config.validation). Options beyond tau:
``batch_options``."""


def batch_options(loss: LossConfig) -> dict:
    """The settings beyond tau that ``BATCH_LOSSES[loss.name]`` and ``HCLLoss`` take: HCL's tau_plus and beta."""
    return {"tau_plus": loss.hcl_tau_plus, "beta": loss.hcl_beta} if loss.name == "hcl" else {}


def build_loss(name: str, rank: int, world_size: int, **options) -> GlobalBatchLoss:
    """``loss.name``'s loss; ``options``: its own settings (sogclr: num_samples, gamma; hcl: tau_plus, beta)."""
    return LOSSES[name](rank=rank, world_size=world_size, **options)
