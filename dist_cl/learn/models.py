"""Encoders that map the two views of a pair to L2-normalised embeddings u, v, plus the temperature.

A timm backbone (``pretrained=False``) with a projection MLP, shared by both views (SimCLR) or one per
side (``two_towers``); an image tower with open_clip's text tower for image–caption pairs (``ImageTextModel``);
and the free-embedding model of the paper's synthetic setting.
"""

import difflib
import logging
import math

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dist_cl.config import Config, ConfigError
from dist_cl.config.datasets import DATASETS
from dist_cl.runtime.distributed import gather_rows, world_size

log = logging.getLogger("dist_cl")


class Temperature(nn.Module):
    """tau, fixed or learned in log space (as CLIP learns its logit scale)."""

    def __init__(self, tau: float, learnable: bool):
        super().__init__()
        log_tau = torch.tensor(math.log(tau))
        if learnable:
            self.log_tau = nn.Parameter(log_tau)
        else:
            self.register_buffer("log_tau", log_tau)

    def forward(self) -> torch.Tensor:
        return self.log_tau.exp()


def projection_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Module:
    if hidden_dim == 0:
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)
    )


class Tower(nn.Module):
    def __init__(self, backbone: str, backbone_kwargs: dict, in_chans: int, hidden_dim: int, embed_dim: int):
        super().__init__()
        self.backbone = timm.create_model(
            backbone, pretrained=False, num_classes=0, in_chans=in_chans, **backbone_kwargs
        )
        # what the backbone returns with num_classes=0: num_features is the width before timm's pre-logits
        # layers, which some (mobilenetv3: 288 against 1024) widen
        self.head = projection_head(self.backbone.head_hidden_size, hidden_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone features and the normalised projection."""
        features = self.backbone(x)
        return features, F.normalize(self.head(features), dim=-1)


class ContrastiveModel(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        m = cfg.model
        args = (m.backbone, m.backbone_kwargs, m.in_chans, m.proj_hidden_dim, m.embed_dim)
        self.tower_a = Tower(*args)
        self.tower_b = Tower(*args) if m.two_towers else self.tower_a
        self.temperature = Temperature(cfg.loss.tau, cfg.loss.learnable_tau)

    def forward(self, view_a: torch.Tensor, view_b: torch.Tensor):
        """(u, v, tau): normalised embeddings of both views and the current temperature."""
        if self.tower_b is self.tower_a:
            # one forward over both views keeps BatchNorm statistics over the whole local batch
            _, z = self.tower_a(torch.cat([view_a, view_b]))
            u, v = z.chunk(2)
        else:
            u, v = self.tower_a(view_a)[1], self.tower_b(view_b)[1]
        return u, v, self.temperature()

    def embed(self, x: torch.Tensor, side: str = "a", output: str = "projection") -> torch.Tensor:
        tower = self.tower_a if side == "a" else self.tower_b
        features, z = tower(x)
        return z if output == "projection" else features


MAX_LOGIT_SCALE = math.log(100)
"""open_clip's training loop clamps its logit scale log(1/tau) to [0, ln 100] after each step: tau >= 0.01."""


class LogitScale(nn.Module):
    """open_clip's logit scale: ``logit_scale`` = log(1/tau), learned or fixed, initialised at log(1/loss.tau)
    (open_clip's log(1/0.07) is loss.tau=0.07; SigLIP's log 10 is loss.tau=0.1), read clamped to ln 100.

    open_clip clamps the parameter in place after the update; here its value is clamped where it is read, so
    the tau every step uses is the same and no training-loop hook is needed (above ln 100 its gradient is 0).
    """

    def __init__(self, tau: float, learnable: bool):
        super().__init__()
        logit_scale = torch.tensor(math.log(1 / tau))
        if learnable:
            self.logit_scale = nn.Parameter(logit_scale)
        else:
            self.register_buffer("logit_scale", logit_scale)

    def forward(self) -> torch.Tensor:
        """tau = 1 / exp(clamp(logit_scale, max=ln 100))."""
        return torch.exp(-self.logit_scale.clamp(max=MAX_LOGIT_SCALE))


SIGLIP_INIT_LOGIT_BIAS = -10.0
"""open_clip's initial logit bias for SigLIP (``init_logit_bias``), from the paper: -10."""


def text_tower_config(model_cfg) -> dict:
    """The open_clip ``CLIPTextCfg`` fields of ``model.text_tower``'s open_clip model config, with ``model.text_cfg``
    over them (names and fields checked by dist_cl.config.validation)."""
    import open_clip

    return {**open_clip.get_model_config(model_cfg.text_tower)["text_cfg"], **model_cfg.text_cfg}


class ImageTextModel(nn.Module):
    """CLIP: view_a is an image, embedded by the timm ``Tower``; view_b a caption's open_clip token ids
    (B, context_length), embedded by open_clip's ``TextTransformer``, randomly initialised (or from
    ``model.text_pretrained``, a local open_clip checkpoint), projected to ``model.embed_dim``.

    ``forward`` gives (u, v, tau), as ``ContrastiveModel``; under loss.name=siglip the third output is
    (tau, b), the learnt logit bias b beside tau, so that it goes through the step (DDP, accumulation) as tau does.
    """

    def __init__(self, cfg: Config):
        super().__init__()
        from open_clip.model import CLIPTextCfg, _build_text_tower

        m = cfg.model
        self.tower_a = Tower(m.backbone, m.backbone_kwargs, m.in_chans, m.proj_hidden_dim, m.embed_dim)
        self.text_tower = _build_text_tower(m.embed_dim, CLIPTextCfg(**text_tower_config(m)))
        if m.text_pretrained:
            self.load_text_weights(m.text_pretrained)
        self.temperature = LogitScale(cfg.loss.tau, cfg.loss.learnable_tau)
        self.logit_bias = nn.Parameter(torch.tensor(SIGLIP_INIT_LOGIT_BIAS)) if cfg.loss.name == "siglip" else None

    def load_text_weights(self, path: str) -> None:
        """The text tower's weights from an open_clip checkpoint file (a CLIP's, whose text weights sit at its
        top level under the ``TextTransformer``'s own names)."""
        from open_clip.factory import load_state_dict

        state = load_state_dict(path)
        wanted = self.text_tower.state_dict()
        missing = [key for key in wanted if key not in state]
        if missing:
            raise ConfigError(f"model.text_pretrained={path!r} holds no text tower weights {missing[:3]}; give an "
                              "open_clip CLIP checkpoint of the same model.text_tower")
        self.text_tower.load_state_dict({key: state[key] for key in wanted})

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        context = self.text_tower.context_length
        if tokens.shape[-1] != context:
            raise ValueError(f"captions of {tokens.shape[-1]} tokens for a text tower with context_length {context}; "
                             "tokenise with the text tower's context length")
        return self.text_tower(tokens)

    def forward(self, view_a: torch.Tensor, view_b: torch.Tensor):
        """(u, v, tau): normalised image and caption embeddings and the temperature (with SigLIP's bias)."""
        u, v = self.tower_a(view_a)[1], F.normalize(self.encode_text(view_b), dim=-1)
        tau = self.temperature()
        return u, v, tau if self.logit_bias is None else torch.stack([tau, self.logit_bias])

    def embed(self, x: torch.Tensor, side: str = "a", output: str = "projection") -> torch.Tensor:
        """Side a: the image tower's backbone features or projection; side b: the caption's projection,
        unnormalised as ``features``."""
        if side == "a":
            features, z = self.tower_a(x)
            return z if output == "projection" else features
        features = self.encode_text(x)
        return F.normalize(features, dim=-1) if output == "projection" else features


class _GlobalBatchRows(torch.autograd.Function):
    """``table[index]`` for this rank's slice; backward gives every rank the gradient rows of the whole
    global batch, averaged over ranks as DDP would, as one sparse tensor.

    A step touches B of the N rows, so neither the communication nor the update needs to be dense: DDP's
    dense all-reduce and the dense update were most of a free-embedding step (docs/BENCHMARKS.md).
    """

    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.table_shape = table.shape
        ctx.save_for_backward(index)
        return table[index]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        rows, grads = gather_rows(index), gather_rows(grad.contiguous()) / world_size()
        # Every rank's forward indexed the table with its rows, so they are in range: no check to pay for.
        sparse = torch.sparse_coo_tensor(rows[None], grads, ctx.table_shape, check_invariants=False)
        return sparse.coalesce(), None


def keep_coalesced(table: nn.Parameter) -> None:
    """Keep the coalesced flag of ``table``'s first gradient of a step.

    ``_GlobalBatchRows.backward`` returns a coalesced gradient, but AccumulateGrad stores it rebuilt without
    the flag, and the gradient norm would then sort it again every step. A gradient added to the first (an
    accumulated step) is left as torch's sparse sum makes it, with the flag that sum sets.
    """
    first = [False]

    def before(grad: torch.Tensor) -> None:
        first[0] = table.grad is None and grad.is_coalesced()

    def after(param: nn.Parameter) -> None:
        if first[0]:
            grad = param.grad
            param.grad = torch.sparse_coo_tensor(grad._indices(), grad._values(), grad.shape,
                                                 check_invariants=False, is_coalesced=True)

    table.register_hook(before)
    table.register_post_accumulate_grad_hook(after)


class _AverageGradient(torch.autograd.Function):
    """Identity whose gradient is averaged over ranks (what DDP does for a dense parameter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        if world_size() > 1:
            grad = grad.contiguous()
            dist.all_reduce(grad)
        return grad / world_size()


class FreeEmbeddings(nn.Module):
    """The paper's synthetic model: u_i, v_i are free parameters, looked up by sample index.

    It averages its own gradients across ranks (``averages_own_gradients``: the trainer does not wrap it
    in DDP), sending only the global batch's rows; the tables get sparse gradients, which plain SGD applies.
    """

    averages_own_gradients = True

    def __init__(self, num_samples: int, embed_dim: int, tau: float, learnable_tau: bool, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.u = nn.Parameter(torch.randn(num_samples, embed_dim, generator=g))
        self.v = nn.Parameter(torch.randn(num_samples, embed_dim, generator=g))
        keep_coalesced(self.u)
        keep_coalesced(self.v)
        self.temperature = Temperature(tau, learnable_tau)

    def forward(self, index_a: torch.Tensor, index_b: torch.Tensor):
        u = _GlobalBatchRows.apply(self.u, index_a)
        v = _GlobalBatchRows.apply(self.v, index_b)
        tau = self.temperature()
        if tau.requires_grad:
            tau = _AverageGradient.apply(tau)
        return F.normalize(u, dim=-1), F.normalize(v, dim=-1), tau

    def embed(self, index: torch.Tensor, side: str = "a", output: str = "projection") -> torch.Tensor:
        return F.normalize((self.u if side == "a" else self.v)[index], dim=-1)


def check_backbone(name: str) -> None:
    """A ConfigError unless ``name`` is 'free' or a model in timm's registry, with the closest names:
    before any process group starts, rather than a timm traceback from every rank."""
    if name == "free" or timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ConfigError(f"model.backbone={name!r} is not a timm model; {hint}list them with "
                      "python -c \"import timm; print(timm.list_models())\"")


def build_model(cfg: Config, num_samples: int) -> nn.Module:
    if cfg.model.backbone == "free":
        return FreeEmbeddings(num_samples, cfg.model.embed_dim, cfg.loss.tau, cfg.loss.learnable_tau, cfg.seed)
    return ImageTextModel(cfg) if cfg.model.text_tower else ContrastiveModel(cfg)


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` with its BatchNorms synchronised over the ranks. timm's conversion, not torch's: torch's turns
    timm's BatchNormAct2d (BatchNorm, activation and drop in one module) into a bare SyncBatchNorm that
    never calls the activation."""
    return timm.layers.convert_sync_batchnorm(model)


def build_training_model(cfg: Config, num_samples: int, channels: int, device: torch.device) -> nn.Module:
    """The model to train on ``device``, checked against the data (``channels`` of its images), with
    SyncBatchNorm where ``model.sync_bn`` asks for it and the device has it."""
    if cfg.train.global_batch_size > num_samples:
        raise ConfigError(f"train.global_batch_size={cfg.train.global_batch_size} is larger than the "
                          f"{num_samples} training samples; lower it or use more data")
    if cfg.model.text_tower and not DATASETS[cfg.data.name].captions:
        captioned = " or ".join(name for name, declared in DATASETS.items() if declared.captions)
        raise ConfigError(f"model.text_tower={cfg.model.text_tower} embeds captions, and data.name={cfg.data.name} "
                          f"has none; use data.name={captioned} (image–caption shards) or remove model.text_tower")
    if cfg.model.backbone != "free" and channels != cfg.model.in_chans:
        raise ConfigError(f"model.in_chans={cfg.model.in_chans} but the data has {channels}-channel images; "
                          f"set model.in_chans={channels}")
    model = build_model(cfg, num_samples).to(device)
    if cfg.model.sync_bn and device.type == "cuda":
        return sync_batchnorm(model)
    if cfg.model.sync_bn:
        log.warning("model.sync_bn=true needs CUDA (torch's SyncBatchNorm has no CPU kernel); on %s each "
                    "rank's BatchNorm keeps normalising over its own slice of the batch", device)
    return model


def current_tau(model: nn.Module) -> float:
    """The model's temperature now, as a number (a learnt one read without its graph)."""
    return float(model.temperature().detach())
