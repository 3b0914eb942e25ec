"""SC-global: one loss-aware partition of the whole dataset into hard batches (docs/DESIGN.md §1, "SC-global").

Coarse to fine, because the textbook global pipeline does not scale (docs/BENCHMARKS.md): approximate kNN
over the whole data set is slow and of poor recall, and one global eigsh is slow too.

1. Cells. FAISS spherical k-means of the pair locations x_i = u_i + v_i into fine clusters of
   ~``fine_size`` samples, whose centroids are clustered into cells of ~``cell_size`` samples. A pair's
   hard negatives (large s_ij or s_ji) lie near it, so they share its cell.
2. Batches. In each cell: exact cross kNN (one dense block), the sparse loss affinity of the paper on
   those candidate edges, and recursive spectral bisection into exactly balanced groups of B.
3. Fragments. The < B samples a cell leaves over are pooled and go through 1-2 again, until the pool
   fits one cell. The pool shrinks by ~B / (2 cell_size) per round, so a round or two suffices.

The k-means and the kNN run on ``device``: on a CUDA device the kNN is a torch product there, and the
k-means uses FAISS's GPU index where FAISS was built with GPUs (the ``gpu`` extra; ``faiss_on_gpu``).
"""

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import scipy.sparse as sp
import torch
from threadpoolctl import threadpool_limits

from dist_cl.selection.balanced import balanced_spectral_partition
from dist_cl.selection.errors import SelectionError
from dist_cl.selection.knn import cross_knn, resolve_device
from dist_cl.selection.window import without_conflicts

FINE_CLUSTER_SIZE = 128
"""Rows per fine k-means cluster, the unit that cells are built from."""
HNSW_ASSIGN_MIN = 2048
"""Centroid count from which k-means assigns rows through an HNSW graph of the centroids."""
ASSIGN_CHUNKS = 64
"""Row chunks of the k-means assignment, dealt over the ranks (fixed, so results do not depend on W)."""


def sparse_loss_affinity(similarities: np.ndarray, rows: np.ndarray, cols: np.ndarray, batch_size: int,
                         tau: float) -> sp.csr_matrix:
    """Sparse symmetric W: W_ij = w_ij + w_ji on the candidate edges (rows, cols), i != j; 0 elsewhere.

    w_ij = log(1 + (B-1) e^{s_ij - s_ii}) + log(1 + (B-1) e^{s_ji - s_ii}), s_ij = <u_i, v_j> / tau, read from
    ``similarities`` = U V^T (the kNN's block): the paper's pairwise approximation of the batch loss (then
    W <- W + W^T). Each unordered candidate pair counts once however many kNN lists name it. Computed in the
    dtype of ``similarities``.
    """
    n = len(similarities)
    rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    off_diagonal = rows != cols
    # a sparse pattern of the upper triangle merges duplicates in O(E), where np.unique sorts
    lo, hi = np.minimum(rows, cols)[off_diagonal], np.maximum(rows, cols)[off_diagonal]
    pattern = sp.csr_matrix((np.ones(len(lo), dtype=np.float32), (lo, hi)), shape=(n, n))
    pattern.sum_duplicates()
    i, j = np.repeat(np.arange(n), np.diff(pattern.indptr)), pattern.indices.astype(np.int64)
    s_ii = np.diagonal(similarities) / tau
    s_ij = similarities[i, j] / tau
    s_ji = similarities[j, i] / tau
    log_negatives = np.log(batch_size - 1)

    def term(margin):
        return np.logaddexp(0.0, log_negatives + margin)  # log(1 + (B-1) e^margin), overflow-safe

    w = term(s_ij - s_ii[i]) + term(s_ji - s_ii[i]) + term(s_ji - s_ii[j]) + term(s_ij - s_ii[j])
    return sp.csr_matrix((np.concatenate([w, w]), (np.concatenate([i, j]), np.concatenate([j, i]))), shape=(n, n))


def knn_loss_graph(u: np.ndarray, v: np.ndarray, batch_size: int, tau: float, knn: int,
                   device: torch.device | None = None, conflicts: sp.csr_matrix | None = None) -> sp.csr_matrix:
    """Loss affinity restricted to each u_i's ``knn`` nearest v's and each v_i's nearest u's; with
    ``conflicts`` (dist_cl.selection.window), the ``knn`` nearest that do not conflict with i."""
    extra = 0 if conflicts is None else int(np.diff(conflicts.indptr).max(initial=0))
    similarities, u_to_v, v_to_u = cross_knn(u, v, knn + extra, device)
    n = len(u)
    if conflicts is None:
        rows = np.repeat(np.arange(n), u_to_v.shape[1])
        return sparse_loss_affinity(similarities, np.concatenate([rows, rows]),
                                    np.concatenate([u_to_v.ravel(), v_to_u.ravel()]), batch_size, tau)
    edges = [without_conflicts(np.arange(n), lists, conflicts, knn) for lists in (u_to_v, v_to_u)]
    return sparse_loss_affinity(similarities, np.concatenate([edges[0][0], edges[1][0]]),
                                np.concatenate([edges[0][1], edges[1][1]]), batch_size, tau)


def local_map(fn: Callable, items: Sequence) -> list:
    return [fn(item) for item in items]


def core_map(fn: Callable, items: Sequence) -> list:
    """``[fn(item) for item in items]`` with one thread per core, each computing single-threaded.

    Most of a cell's work (sparse products, small QRs, Python) runs on one core whatever the BLAS and
    torch thread counts, so cells side by side use the cores that threads within a cell leave idle. Each
    cell's result does not depend on the thread that computes it, so neither does the plan.
    """
    workers = min(len(os.sched_getaffinity(0)), len(items))
    if workers < 2:
        return local_map(fn, items)

    def single_threaded(item):
        torch.set_num_threads(1)  # this thread's OpenMP team and MKL; restored below for the caller
        return fn(item)

    threads = torch.get_num_threads()
    try:
        with threadpool_limits(limits=1), ThreadPoolExecutor(workers) as pool:
            return list(pool.map(single_threaded, items))
    finally:
        torch.set_num_threads(threads)


def _faiss():
    """The ``faiss`` module of whichever FAISS extra is installed (faiss-cpu or faiss-gpu: pyproject.toml)."""
    try:
        import faiss
    except ImportError as err:
        raise SelectionError("sc_global needs FAISS: pip install -e '.[cpu]', or '.[gpu]' on a CUDA host") from err
    return faiss


def faiss_gpus() -> int:
    """GPUs the installed FAISS can use: 0 for faiss-cpu, or where no CUDA device is visible."""
    faiss = _faiss()
    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


def faiss_on_gpu(device: torch.device, gpus: int) -> bool:
    """Whether the k-means runs on ``device`` (a CUDA device, with a FAISS that has ``gpus``) or on the CPU."""
    return device.type == "cuda" and gpus > 0


_gpu_resources: dict[tuple[int, int], object] = {}


def _gpu_index(d: int, device: torch.device):
    """An exact inner-product index on ``device``. FAISS's GPU resources are not thread-safe: one per
    (device, thread), kept, since each holds a scratch allocation that is costly to make."""
    faiss = _faiss()
    key = (device.index, threading.get_ident())
    if key not in _gpu_resources:
        _gpu_resources[key] = faiss.StandardGpuResources()
    config = faiss.GpuIndexFlatConfig()
    config.device = device.index
    return faiss.GpuIndexFlatIP(_gpu_resources[key], d, config)


def spherical_kmeans(x: np.ndarray, n_centroids: int, *, seed: int, weights: np.ndarray | None = None,
                     map_fn: Callable[[Callable, Sequence], list] = local_map,
                     device: torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """FAISS spherical k-means of the unit rows of ``x``: (label of each row, centroids).

    Trained on at most 64 rows per centroid for 10 iterations, then every row is assigned: cells need
    coherent groups, not converged centroids, which cost much more (docs/BENCHMARKS.md).
    Beyond HNSW_ASSIGN_MIN centroids the assignment searches an HNSW graph of the centroids instead of
    all of them (FAISS's large-k k-means), which keeps the fine level of N = 1M (7,800 centroids) cheap.

    Through ``map_fn`` one rank trains and every rank receives its centroids (FAISS's threaded HNSW build
    need not be reproducible across processes; one set of centroids is consistent by construction), then
    the assignment, a large share of the k-means time at N = 1M (docs/BENCHMARKS.md, "sc_global over
    ranks"), is split over the ranks in ASSIGN_CHUNKS row chunks.

    With FAISS on a GPU (``faiss_on_gpu``) training and assignment search all centroids exactly: the same
    k-means up to ties below HNSW_ASSIGN_MIN centroids, the exact assignment that HNSW approximates above.
    """
    [centroids] = map_fn(lambda _: _train_centroids(x, n_centroids, seed, weights, device), [None])
    index = _centroid_index(x.shape[1], n_centroids, device)
    index.add(centroids)
    chunks = np.array_split(np.arange(len(x)), min(ASSIGN_CHUNKS, len(x)))
    labels = map_fn(lambda rows: index.search(x[rows], 1)[1].ravel(), chunks)
    return np.concatenate(labels), centroids


def _centroid_index(d: int, n_centroids: int, device: torch.device | None):
    faiss = _faiss()
    device = resolve_device(device)
    if faiss_on_gpu(device, faiss_gpus()):
        return _gpu_index(d, device)
    if n_centroids < HNSW_ASSIGN_MIN:
        return faiss.IndexFlatIP(d)
    index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efSearch = 16
    return index


def _train_centroids(x: np.ndarray, n_centroids: int, seed: int, weights: np.ndarray | None,
                     device: torch.device | None) -> np.ndarray:
    faiss = _faiss()
    d = x.shape[1]
    clustering = faiss.Clustering(d, n_centroids)
    clustering.niter, clustering.seed, clustering.spherical = 10, seed % 2**31, True  # FAISS takes a C int
    clustering.min_points_per_centroid, clustering.max_points_per_centroid = 1, 64
    if n_centroids >= HNSW_ASSIGN_MIN:
        # 64 rows per centroid made the fine level of N = 1M far too slow (docs/BENCHMARKS.md)
        clustering.max_points_per_centroid = 16
    clustering.train(x, _centroid_index(d, n_centroids, device), weights)
    return faiss.vector_to_array(clustering.centroids).reshape(n_centroids, d)


def kmeans_cells(x: np.ndarray, cell_size: int, *, seed: int, fine_size: int = FINE_CLUSTER_SIZE,
                 map_fn: Callable[[Callable, Sequence], list] = local_map,
                 device: torch.device | None = None) -> list[np.ndarray]:
    """Row indices of ``x`` grouped into cells of about ``cell_size`` rows, in two k-means levels.

    Fine clusters of ~``fine_size`` rows first, then the fine centroids are clustered into cells. One
    k-means level straight to cells split synthetic clusters over cells (docs/BENCHMARKS.md), since a
    centroid of ~60 clusters is barely closer to a member than a random centroid in d = 128; a fine cluster holds
    a few clusters, and cells are whole fine clusters. A cell over twice ``cell_size`` is split again.
    """
    x = np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12), dtype=np.float32)
    n_cells = max(2, round(len(x) / cell_size))
    n_fine = max(n_cells, round(len(x) / fine_size))
    fine_labels, fine_centroids = spherical_kmeans(x, n_fine, seed=seed, map_fn=map_fn, device=device)
    fine_counts = np.bincount(fine_labels, minlength=n_fine).astype(np.float32)
    cell_of_fine, _ = spherical_kmeans(fine_centroids, n_cells, seed=seed, weights=fine_counts, map_fn=map_fn,
                                       device=device)
    labels = cell_of_fine[fine_labels]
    sizes = np.bincount(labels, minlength=n_cells)
    if sizes.max() == len(x):  # k-means found one cluster (duplicated rows): cut them evenly instead
        return np.array_split(np.arange(len(x)), n_cells)
    cells = []
    for cell in np.split(np.argsort(labels, kind="stable"), np.cumsum(sizes)[:-1]):
        if len(cell) > 2 * cell_size:
            sub_cells = kmeans_cells(x[cell], cell_size, seed=seed, fine_size=fine_size, map_fn=map_fn,
                                     device=device)
            cells.extend(cell[sub] for sub in sub_cells)
        elif len(cell):
            cells.append(cell)
    return cells


def partition_cell(u: np.ndarray, v: np.ndarray, conflicts: sp.csr_matrix | None, batch_size: int, tau: float,
                   knn: int, *, seed: int, device: torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Hard batches (n // B, B) of one cell and its n % B rows left over, by spectral bisection of
    the kNN loss graph (without the cell's ``conflicts``, if any)."""
    if len(u) < batch_size:
        return np.empty((0, batch_size), dtype=np.int64), np.arange(len(u))
    graph = knn_loss_graph(u, v, batch_size, tau, knn, device, conflicts)
    return balanced_spectral_partition(graph, batch_size, seed=seed)


def sc_global_partition(u, v, batch_size: int, *, seed: int, tau: float = 0.1, knn: int = 16,
                        cell_size: int = 2048, fine_size: int = FINE_CLUSTER_SIZE, chunk_batches: int = 0,
                        map_fn: Callable[[Callable, Sequence], list] | None = None,
                        device: torch.device | None = None, conflicts: sp.csr_matrix | None = None) -> np.ndarray:
    """Partition into N // B hard batches over the whole dataset; the N % B dropped are chosen by ``seed``.

    ``knn``: candidate negatives per sample and direction. ``cell_size``: samples per cell (at least
    4 B); N up to it is one cell, an exact global spectral partition. ``fine_size``: samples per fine
    k-means cluster, the unit cells are made of. Each cell gives its
    full batches; the < B rows it leaves over (a coherent fragment, e.g. the part of a cluster that did
    not fill a batch) are pooled and clustered again, so fragments join their nearest fragments.
    ``chunk_batches`` k > 0: partition each chunk of k B samples of a seeded random permutation on its
    own instead, as the paper's SC does on real data: a stochastic partition whose neighbourhoods meet
    in other combinations every epoch (1 is a random partition, k >= N // B the global one).
    ``map_fn(fn, cells)``: how the independent per-cell work is mapped (e.g. dealt over ranks by
    dist_cl.runtime.distributed.distributed_map; by default ``core_map``); the plan does not depend on it.
    ``device``: where the k-means and the kNN run (``knn.resolve_device``). ``conflicts``: pairs kept out of
    the candidate edges (dist_cl.selection.window).
    """
    u = np.ascontiguousarray(u, dtype=np.float32)
    v = np.ascontiguousarray(v, dtype=np.float32)
    n = len(u)
    rng = np.random.default_rng(seed)
    usable = rng.permutation(n)[: n - n % batch_size]
    cell_size = max(cell_size, 4 * batch_size)
    map_fn = map_fn or core_map
    device = resolve_device(device)  # here, since a CUDA thread's current device is its own
    if chunk_batches < 0:
        raise SelectionError(f"chunk_batches={chunk_batches} must be >= 0 (0: one global partition)")
    chunk = chunk_batches * batch_size
    partition = partial(partition_cell, batch_size=batch_size, tau=tau, knn=knn, seed=seed, device=device)

    def cell(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return partition(u[rows], v[rows], None if conflicts is None else conflicts[rows][:, rows])

    if not chunk_batches or chunk >= len(usable):
        return _partition_pool(u, v, np.sort(usable), cell, cell_size, fine_size, seed, map_fn, device)
    chunks = [np.sort(rows) for rows in np.split(usable, range(chunk, len(usable), chunk))]
    if chunk > cell_size:
        return np.concatenate([_partition_pool(u, v, rows, cell, cell_size, fine_size, seed, map_fn, device)
                               for rows in chunks])
    results = map_fn(lambda rows: cell(rows)[0], chunks)
    return np.concatenate([rows[groups] for rows, groups in zip(chunks, results)])


def _partition_pool(u: np.ndarray, v: np.ndarray, pool: np.ndarray, cell: Callable, cell_size: int, fine_size: int,
                    seed: int, map_fn: Callable, device: torch.device | None) -> np.ndarray:
    """Full batches of the rows ``pool`` (a multiple of B): cells, ``cell(rows)`` (partition_cell with the
    strategy's options) in each, the fragments pooled again."""
    batches = []
    while len(pool) > cell_size:
        cells = [pool[rows] for rows in kmeans_cells(u[pool] + v[pool], cell_size, seed=seed, fine_size=fine_size,
                                                     map_fn=map_fn, device=device)]
        results = map_fn(cell, cells)
        batches.extend(rows[groups] for rows, (groups, _) in zip(cells, results))
        pool = np.concatenate([rows[leftover] for rows, (_, leftover) in zip(cells, results)])
    groups, _ = cell(pool)
    batches.append(pool[groups])
    return np.concatenate(batches)
