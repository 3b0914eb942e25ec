"""Batch selection strategies behind one function: plan = select_batches(name, u, v, batch_size, ...).

A plan is an int64 array (n_batches, batch_size) of sample indices; row b is global batch b.
Partitions (random, fixed, sc) use every index at most once; full, ncb and exact osgd are the paper's
small-N strategies over the N-choose-B batch set. Register a new strategy with one STRATEGIES entry.
"""

from dataclasses import dataclass
from typing import Callable

import numpy as np

from dist_cl.selection.enumerate import full_batch, ncb_batches, osgd
from dist_cl.selection.errors import SelectionError
from dist_cl.selection.partitions import random_partition
from dist_cl.selection.sc_global import sc_global_partition
from dist_cl.selection.scoring import batch_losses, lift, plan_loss
from dist_cl.selection.spectral import spectral_clustering


@dataclass(frozen=True)
class Strategy:
    fn: Callable[..., np.ndarray]
    reads_embeddings: bool
    """False: the plan depends on the seed alone (no bank needed)."""
    per_epoch: bool = True
    """False: one plan for the whole run; callers pass the run seed, not an epoch seed."""


STRATEGIES = {
    "random": Strategy(random_partition, reads_embeddings=False),
    "fixed": Strategy(random_partition, reads_embeddings=False, per_epoch=False),
    "full": Strategy(full_batch, reads_embeddings=False),
    "ncb": Strategy(ncb_batches, reads_embeddings=False),
    "osgd": Strategy(osgd, reads_embeddings=True),
    "sc": Strategy(spectral_clustering, reads_embeddings=True),
    "sc_global": Strategy(sc_global_partition, reads_embeddings=True),
}

__all__ = ["STRATEGIES", "SelectionError", "Strategy", "batch_losses", "lift", "plan_loss", "select_batches"]


def select_batches(name: str, u, v, batch_size: int, *, seed: int, tau: float = 0.1, **options) -> np.ndarray:
    """Run strategy ``name`` on the L2-normalised pair embeddings ``u, v`` (N, d); returns the plan."""
    if name not in STRATEGIES:
        raise SelectionError(f"unknown selection strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}")
    u = np.asarray(u)
    v = np.asarray(v)
    if u.ndim != 2 or u.shape != v.shape:
        raise SelectionError(f"u and v must both be (N, d) arrays of one shape, got {u.shape} and {v.shape}")
    n = u.shape[0]
    if batch_size < 2:
        raise SelectionError(f"batch_size={batch_size} must be at least 2 (a batch needs a negative)")
    if batch_size > n:
        raise SelectionError(f"batch_size={batch_size} is larger than the number of pairs N={n}")
    if STRATEGIES[name].reads_embeddings and not (np.isfinite(u).all() and np.isfinite(v).all()):
        raise SelectionError("u or v holds non-finite values (NaN/inf); check the model's embeddings")
    if not tau > 0:
        raise SelectionError(f"tau={tau} must be positive (logits are <u_i, v_j> / tau)")
    plan = STRATEGIES[name].fn(u, v, batch_size, seed=seed, tau=tau, **options)
    return np.ascontiguousarray(plan, dtype=np.int64)
