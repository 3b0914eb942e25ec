"""Strategies over the N-choose-B batch set: full batch, all N-choose-B, and Ordered SGD (OSGD).

Small-N tools for the paper's theory (Theorem 1: all N-choose-B batches share the full-batch optimum;
OSGD trains on the highest-loss batches), plus OSGD's chunked "kb" form that scales to real data.
"""

import itertools
from math import comb

import numpy as np

from dist_cl.selection.errors import SelectionError
from dist_cl.selection.scoring import batch_losses


def _too_many(n: int, batch_size: int, max_batches: int) -> str:
    return (f"N={n} choose B={batch_size} is {comb(n, batch_size):,} batches, over max_batches={max_batches:,}; "
            f"raise max_batches or use a partition strategy (random, sc)")


def all_batches(n: int, batch_size: int) -> np.ndarray:
    """Every B-subset of range(n) as sorted rows in lexicographic order: (comb(n, B), B) int64."""
    flat = itertools.chain.from_iterable(itertools.combinations(range(n), batch_size))
    return np.fromiter(flat, dtype=np.int64, count=comb(n, batch_size) * batch_size).reshape(-1, batch_size)


def full_batch(n: int, batch_size: int, *, seed: int, max_n: int = 4096) -> np.ndarray:
    """One batch of all N: full-batch gradient descent. It takes ``batch_size`` and ``seed``, which it does not
    need, in the calling convention of the strategies that ignore the embeddings (dist_cl.config.strategies)."""
    if n > max_n:
        raise SelectionError(f"full batch of N={n} is over max_n={max_n}; the N x N logits would not fit, "
                         f"raise max_n or use a mini-batch strategy")
    return np.arange(n, dtype=np.int64)[None]


def ncb_batches(n: int, batch_size: int, *, seed: int, max_batches: int = 100_000) -> np.ndarray:
    """Every one of the N-choose-B batches once, rows in a seeded random order (an epoch of Theorem 1)."""
    if comb(n, batch_size) > max_batches:
        raise SelectionError(_too_many(n, batch_size, max_batches))
    batches = all_batches(n, batch_size)
    return batches[np.random.default_rng(seed).permutation(len(batches))]


def osgd_shape(n: int, batch_size: int, q: int | None = None, k: int | None = None,
               max_batches: int = 100_000) -> tuple[int | None, int]:
    """(k, q) as ``osgd`` resolves them for N = ``n``: k None for the exact form; q checked."""
    if k is None and comb(n, batch_size) <= max_batches:
        q = n // batch_size if q is None else q
        if not 1 <= q <= comb(n, batch_size):
            raise SelectionError(f"q={q} must be between 1 and the {comb(n, batch_size)} candidate batches")
        return None, q
    n_batches = n // batch_size
    k = min(1500, n_batches) if k is None else k
    q = max(1, k // 10) if q is None else q
    if not 1 <= q <= k <= n_batches:
        raise SelectionError(f"need 1 <= q <= k <= N // B for kb-OSGD, got q={q}, k={k}, N // B={n_batches}")
    return k, q


def osgd_batches(n: int, batch_size: int, **options) -> int:
    """Batches one ``osgd`` selection gives: q (exact), or q for each full chunk of k batches (kb)."""
    k, q = osgd_shape(n, batch_size, **options)
    return q if k is None else (n // batch_size // k) * q


def osgd(u, v, batch_size: int, *, seed: int, tau: float = 0.1, q: int | None = None, k: int | None = None,
         max_batches: int = 100_000, loss: str = "infonce", loss_options: dict | None = None) -> np.ndarray:
    """Ordered SGD: the highest-loss batches, hardest first, scored with the training loss ``loss`` (settings
    ``loss_options``).

    Exact (no ``k`` and N-choose-B <= max_batches): the q (default N // B) highest-loss batches among all
    N-choose-B; rows may share indices. Otherwise "kb": a seeded random partition cut into chunks of k
    batches (default min(1500, N // B)), keeping the q (default k // 10, the official 1500/150 ratio)
    highest-loss batches of each chunk; no shared indices. Like the official code, a last partial chunk is
    dropped. The trainer selects again every ``osgd_batches`` steps until an epoch's worth of N // B steps,
    as the official code does (dist_cl.plan.planner).
    """
    n = len(u)
    k, q = osgd_shape(n, batch_size, q, k, max_batches)
    if k is None:
        batches = all_batches(n, batch_size)
        order = np.argsort(-batch_losses(u, v, batches, tau, loss=loss, loss_options=loss_options), kind="stable")
        return batches[order[:q]]
    n_batches = n // batch_size
    perm = np.random.default_rng(seed).permutation(n)
    chunks = perm[: (n_batches // k) * k * batch_size].reshape(-1, k, batch_size)
    losses = batch_losses(u, v, chunks.reshape(-1, batch_size), tau, loss=loss,
                          loss_options=loss_options).reshape(-1, k)
    top = np.argsort(-losses, axis=1, kind="stable")[:, :q]
    return np.take_along_axis(chunks, top[..., None], axis=1).reshape(-1, batch_size)
