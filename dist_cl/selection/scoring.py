"""How hard a plan's batches are: per-batch training loss, plan loss and lift (docs/DESIGN.md §4)."""

import numpy as np
import torch

from dist_cl.learn.losses import BATCH_LOSSES
from dist_cl.selection.partitions import random_partition

_CHUNK_ELEMENTS = 1 << 22
"""Gathered (rows, B, d) floats scored at once, so N-choose-B scoring stays within a few hundred MB."""


def batch_losses(u, v, plan, tau: float, dtype: torch.dtype = torch.float64, loss: str = "infonce",
                 loss_options: dict | None = None) -> np.ndarray:
    """L(S) of every row S of ``plan`` (n_batches, B) under training loss ``loss`` (dist_cl.learn.losses.BATCH_LOSSES)
    with its settings ``loss_options`` (``losses.batch_options``); float64 by default, so ties and argmax match
    a reference."""
    u = torch.as_tensor(np.asarray(u), dtype=dtype)
    v = torch.as_tensor(np.asarray(v), dtype=dtype)
    plan = torch.as_tensor(np.asarray(plan, dtype=np.int64))
    rows = max(1, _CHUNK_ELEMENTS // (plan.shape[1] * u.shape[1]))
    losses = [BATCH_LOSSES[loss](u[chunk], v[chunk], tau, **(loss_options or {})) for chunk in plan.split(rows)]
    return torch.cat(losses).double().numpy()


def plan_loss(u, v, plan, tau: float, dtype: torch.dtype = torch.float64, loss: str = "infonce",
              loss_options: dict | None = None) -> float:
    """Mean L(S) over the plan's batches: the mini-batch loss the plan trains on."""
    return float(batch_losses(u, v, plan, tau, dtype, loss, loss_options).mean())


def lift(u, v, plan, tau: float, seed: int, dtype: torch.dtype = torch.float64, loss: str = "infonce",
         loss_options: dict | None = None) -> float:
    """plan_loss / plan_loss of a random partition with the same B on the same embeddings (>1: harder).

    The trainer logs it in float32: cheaper than float64, and as exact as a logged ratio needs
    (docs/BENCHMARKS.md, "Selection share in training").
    """
    reference = random_partition(len(u), np.asarray(plan).shape[1], seed=seed)
    return (plan_loss(u, v, plan, tau, dtype, loss, loss_options)
            / plan_loss(u, v, reference, tau, dtype, loss, loss_options))
