"""The paper's spectral-clustering (SC) selection: hard batches as dense clusters of a loss graph.

Per chunk of ``chunk_batches * B`` samples of a random permutation (the paper's real-data setting):
pairwise loss affinity -> spectral embedding of its normalised Laplacian -> k-means with N_c / B centres
-> Hungarian assignment to B copies of each centre, so every cluster (batch) has exactly B pairs.
Follows the official code (krafton-ai/mini-batch-cl, utils.py: custom_affinity, spectral_clustering).
"""

import numpy as np
import scipy.sparse as sp
from scipy.linalg import eigh
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from dist_cl.selection.errors import SelectionError


def dense_loss_affinity(u, v, batch_size: int, tau: float) -> np.ndarray:
    """log-affinity W (n, n): the pairwise terms that approximate a batch's loss (docs/DESIGN.md §1)."""
    s = np.asarray(u, dtype=np.float64) @ np.asarray(v, dtype=np.float64).T / tau
    margin = np.log(batch_size - 1) - np.diag(s)[:, None]
    # w_ij = log(1 + (B-1) e^{s_ij - s_ii}) + log(1 + (B-1) e^{s_ji - s_ii}); then W <- W + W^T
    w = np.logaddexp(0.0, s + margin) + np.logaddexp(0.0, s.T + margin)
    return w + w.T


def dense_spectral_embedding(log_affinity: np.ndarray, n_components: int) -> np.ndarray:
    """Rows of D^{-1/2} x for the n_components smallest eigenvectors x of the normalised Laplacian of exp(W).

    As sklearn.manifold.spectral_embedding(norm_laplacian=True, drop_first=False) in the official code:
    the diagonal is ignored (scipy's laplacian does so), and exp(W) is taken after subtracting max W,
    which leaves the normalised Laplacian unchanged and keeps exp from overflowing at small tau.
    """
    off_diagonal = ~np.eye(len(log_affinity), dtype=bool)
    affinity = np.where(off_diagonal, np.exp(log_affinity - log_affinity[off_diagonal].max()), 0.0)
    inv_sqrt_degree = 1.0 / np.sqrt(np.maximum(affinity.sum(1), np.finfo(np.float64).tiny))
    normalised = inv_sqrt_degree[:, None] * affinity * inv_sqrt_degree[None, :]
    n = len(normalised)
    _, vectors = eigh(normalised, subset_by_index=[n - n_components, n - 1])
    # largest eigenvalues of D^-1/2 A D^-1/2 = smallest of L = I - D^-1/2 A D^-1/2
    return vectors[:, -n_components:] * inv_sqrt_degree[:, None]


def _squared_distances(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """||x_n - c_rk||^2 for centres (runs, k, dim) -> (runs, n, k), without an (runs, n, k, dim) temporary."""
    cross = (centres @ x.T).transpose(0, 2, 1)
    return np.maximum((x**2).sum(1)[None, :, None] - 2 * cross + (centres**2).sum(-1)[:, None, :], 0.0)


def kmeans(x: np.ndarray, n_clusters: int, rng: np.random.Generator, n_init: int = 10,
           max_iter: int = 300) -> np.ndarray:
    """Centres (n_clusters, dim) of the best of n_init Lloyd runs from D^2 (k-means++) seeding, vectorised.

    The official code calls sklearn KMeans(n_clusters) (n_init=10 in its sklearn); this is the same
    algorithm without sklearn's per-call overhead, which dominated the synthetic runs.
    """
    centres = np.empty((n_init, n_clusters, x.shape[1]))
    centres[:, 0] = x[rng.integers(len(x), size=n_init)]
    nearest = ((x[None] - centres[:, :1]) ** 2).sum(-1)
    for c in range(1, n_clusters):
        weights = nearest / nearest.sum(1, keepdims=True)
        pick = (weights.cumsum(1) < rng.random((n_init, 1))).sum(1).clip(max=len(x) - 1)
        centres[:, c] = x[pick]
        nearest = np.minimum(nearest, ((x[None] - centres[:, c, None]) ** 2).sum(-1))
    labels = None
    for _ in range(max_iter):
        new_labels = _squared_distances(x, centres).argmin(-1)
        if labels is not None and (new_labels == labels).all():
            break
        labels = new_labels
        onehot = np.eye(n_clusters)[labels]
        counts = onehot.sum(1)[..., None]
        centres = np.where(counts > 0, (onehot.transpose(0, 2, 1) @ x) / np.maximum(counts, 1), centres)
    inertia = _squared_distances(x, centres).min(-1).sum(-1)
    return centres[inertia.argmin()]


def balanced_clusters(x: np.ndarray, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """Partition the rows of x into len(x) / B clusters of exactly B: k-means + Hungarian (official sc_even)."""
    centres = kmeans(x, len(x) // batch_size, rng)
    slots = np.repeat(centres, batch_size, axis=0)
    _, slot_of_row = linear_sum_assignment(cdist(x, slots))
    return np.argsort(slot_of_row // batch_size, kind="stable").reshape(-1, batch_size)


def sc_chunk(u, v, batch_size: int, tau: float, rng: np.random.Generator,
             conflicts: sp.csr_matrix | None = None) -> np.ndarray:
    """SC on one chunk of n pairs (n a multiple of B): n / B batches of local row indices. Pairs that
    ``conflicts`` (dist_cl.selection.window) links get no affinity."""
    n_clusters = len(u) // batch_size
    if n_clusters == 1:
        return np.arange(len(u))[None]
    log_affinity = dense_loss_affinity(u, v, batch_size, tau)
    if conflicts is not None:
        log_affinity[conflicts.toarray()] = -np.inf
    maps = dense_spectral_embedding(log_affinity, n_components=n_clusters)
    return balanced_clusters(maps, batch_size, rng)


def spectral_clustering(u, v, batch_size: int, *, seed: int, tau: float = 0.1, chunk_batches: int = 40,
                        conflicts: sp.csr_matrix | None = None) -> np.ndarray:
    """The paper's SC plan: a partition of N - N % B indices, SC run per chunk of chunk_batches * B.

    Unlike the official code, which drops the N mod (k B) samples past the last full chunk, the last
    chunk here may be smaller, so every epoch covers N - N % B indices like the other partitions.
    """
    if chunk_batches < 1:
        raise SelectionError(f"chunk_batches={chunk_batches} must be at least 1 (SC runs per chunk of as many batches)")
    rng = np.random.default_rng(seed)
    n = len(u)
    perm = rng.permutation(n)[: n - n % batch_size]
    chunk = chunk_batches * batch_size
    parts = np.split(perm, range(chunk, len(perm), chunk))
    return np.concatenate([part[sc_chunk(u[part], v[part], batch_size, tau, rng,
                                         None if conflicts is None else conflicts[part][:, part])] for part in parts])
