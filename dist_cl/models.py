"""Encoders that map the two views of a pair to L2-normalised embeddings u, v, plus the temperature.

A timm backbone (``pretrained=False``) with a projection MLP, shared by both views (SimCLR) or one per
side (CLIP, ``two_towers``); and the free-embedding model of the paper's synthetic setting.
"""

import math

import timm
import torch
import torch.nn.functional as F
from torch import nn

from dist_cl.config import Config


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
        self.head = projection_head(self.backbone.num_features, hidden_dim, embed_dim)

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


class FreeEmbeddings(nn.Module):
    """The paper's synthetic model: u_i, v_i are free parameters, looked up by sample index."""

    def __init__(self, num_samples: int, embed_dim: int, tau: float, learnable_tau: bool, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.u = nn.Parameter(torch.randn(num_samples, embed_dim, generator=g))
        self.v = nn.Parameter(torch.randn(num_samples, embed_dim, generator=g))
        self.temperature = Temperature(tau, learnable_tau)

    def forward(self, index_a: torch.Tensor, index_b: torch.Tensor):
        return F.normalize(self.u[index_a], dim=-1), F.normalize(self.v[index_b], dim=-1), self.temperature()

    def embed(self, index: torch.Tensor, side: str = "a", output: str = "projection") -> torch.Tensor:
        return F.normalize((self.u if side == "a" else self.v)[index], dim=-1)


def build_model(cfg: Config, num_samples: int) -> nn.Module:
    if cfg.model.backbone == "free":
        return FreeEmbeddings(num_samples, cfg.model.embed_dim, cfg.loss.tau, cfg.loss.learnable_tau, cfg.seed)
    return ContrastiveModel(cfg)
