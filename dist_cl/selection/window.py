"""The false-negative window (B3, arXiv 2505.11293): a sample's p nearest neighbours are the likeliest to be
positives under another name (one caption that fits two images, two photos of one thing), so they are kept
out of its candidate edges and out of its batch.

The p nearest of sample i are the p largest <u_i, v_j> over j != i in the whole data set, found by an exact
search (N^2 d: seconds at N = 100k on a CPU). Samples i and j *conflict* where either is among the other's
p nearest (``conflict_graph``). A strategy leaves conflicting pairs out of its loss graph, so spectral
clustering is not pulled towards them, and ``honour_window`` then moves samples between batches until no
batch holds a conflicting pair: clustering alone reunites neighbours through the neighbours they share.
"""

import logging

import numpy as np
import scipy.sparse as sp
import torch

from dist_cl.selection.knn import resolve_device

log = logging.getLogger("dist_cl")

SEARCH_BLOCK_ELEMENTS = 2**24
"""Similarities per block of the exact search (64 MB of float32)."""
NEAREST_BATCHES = 64
"""Batches, nearest first by centroid, that a conflicting sample tries before all the others."""


def nearest_partners(u: np.ndarray, v: np.ndarray, p: int, device: torch.device | str | None = None) -> np.ndarray:
    """(n, p) indices: for each i the p largest <u_i, v_j> over j != i, most similar first (exact, blocked)."""
    n = len(u)
    p = min(p, n - 1)
    device = resolve_device(device)
    keys = torch.as_tensor(np.ascontiguousarray(v), dtype=torch.float32, device=device)
    rows_per_block = max(1, SEARCH_BLOCK_ELEMENTS // n)
    nearest = []
    for start in range(0, n, rows_per_block):
        queries = torch.as_tensor(np.ascontiguousarray(u[start:start + rows_per_block]), dtype=torch.float32,
                                  device=device)
        s = queries @ keys.T
        s[torch.arange(len(queries)), torch.arange(start, start + len(queries))] = float("-inf")
        nearest.append(s.topk(p, dim=1).indices.cpu().numpy())
    return np.concatenate(nearest).astype(np.int64)


def conflict_graph(nearest: np.ndarray) -> sp.csr_matrix:
    """Symmetric boolean (n, n) with i ~ j where j is among i's ``nearest`` or i among j's."""
    n, p = nearest.shape
    rows = np.repeat(np.arange(n), p)
    graph = sp.csr_matrix((np.ones(n * p, dtype=bool), (rows, nearest.ravel())), shape=(n, n))
    graph = (graph + graph.T).tocsr()
    graph.sort_indices()
    return graph


def without_conflicts(rows: np.ndarray, lists: np.ndarray, conflicts: sp.csr_matrix, k: int) -> tuple[np.ndarray,
                                                                                                         np.ndarray]:
    """Edges (row, col) of the neighbour ``lists`` (n, m) of ``rows``: each row's first ``k`` that do not
    conflict with it."""
    clash = np.asarray(conflicts[np.repeat(rows, lists.shape[1]), lists.ravel()]).reshape(lists.shape)
    keep = ~clash & (np.cumsum(~clash, axis=1) <= k)
    return np.broadcast_to(rows[:, None], lists.shape)[keep], lists[keep]


def conflicts_within(plan: np.ndarray, conflicts: sp.csr_matrix) -> int:
    """Samples of ``plan`` (n_batches, B) that share their batch with a sample they conflict with."""
    batch_of = _batch_of(plan, conflicts.shape[0])
    coo = conflicts.tocoo()
    shared = (batch_of[coo.row] >= 0) & (batch_of[coo.row] == batch_of[coo.col])
    return len(np.unique(coo.row[shared]))


def honour_window(plan: np.ndarray, conflicts: sp.csr_matrix, x: np.ndarray) -> np.ndarray:
    """``plan`` with samples swapped between batches until no batch holds two samples that conflict.

    A sample that shares its batch with a conflicting sample moves to the batch nearest it (cosine to the
    batch's mean of ``x``, the pair locations) where it would conflict with nothing, in exchange for the member
    of that batch nearest its old batch that conflicts with nothing there. A swap frees the sample and adds no
    conflict, so the conflicts only fall; passes over the plan repeat until one swaps nothing (a sample stuck
    in one pass may find room after later swaps). The samples left sharing a batch, for which no batch had
    room, are counted in a warning.
    """
    plan = plan.copy()
    batch_of = _batch_of(plan, conflicts.shape[0])
    x = x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
    sums = x[plan].sum(axis=1)
    while any([_swap_out(i, plan, batch_of, sums, x, conflicts) for i in plan.ravel().copy()]):
        pass
    left = conflicts_within(plan, conflicts)
    if left:
        log.warning("false-negative window: %d samples still share a batch with one of their nearest: no batch "
                    "had room for them; lower selection.options.false_negative_window", left)
    return plan


def _swap_out(i: int, plan: np.ndarray, batch_of: np.ndarray, sums: np.ndarray, x: np.ndarray,
              conflicts: sp.csr_matrix) -> bool:
    """Swap ``i`` out of its batch if it conflicts with a member there and some batch has room (see
    ``honour_window``); whether it was swapped."""
    partners = conflicts.indices[conflicts.indptr[i]:conflicts.indptr[i + 1]]
    home, where = batch_of[i], batch_of[partners]
    if not (where == home).any():
        return False
    met = np.bincount(where[where >= 0], minlength=len(plan))  # i's conflicts in each batch
    for target in _batches_nearest(sums, x[i], home, len(plan)):
        if met[target] > 1:
            continue  # no single swap frees i there
        members = plan[target]
        if met[target]:  # i conflicts with one member: only that one can make room
            members = members[np.isin(members, partners)]
        # a candidate must conflict with nobody in i's batch but i itself, who leaves it
        clashes = np.asarray(conflicts[members][:, plan[home]].sum(axis=1)).ravel()
        clashes -= np.asarray(conflicts[members, i].todense()).ravel()
        fitting = members[clashes == 0]
        if len(fitting):
            _swap(plan, batch_of, sums, x, i, fitting[np.argmax(x[fitting] @ sums[home])])
            return True
    return False


def _batch_of(plan: np.ndarray, n: int) -> np.ndarray:
    """Each sample's row of ``plan``; -1 for a sample the plan leaves out."""
    batch_of = np.full(n, -1, dtype=np.int64)
    batch_of[plan.ravel()] = np.repeat(np.arange(len(plan)), plan.shape[1])
    return batch_of


def _batches_nearest(sums: np.ndarray, x_i: np.ndarray, home: int, n_batches: int):
    """Batch rows other than ``home``: the NEAREST_BATCHES nearest to ``x_i`` in order, then the others."""
    scores = sums @ x_i
    scores[home] = -np.inf
    near = np.argpartition(-scores, min(NEAREST_BATCHES, n_batches - 1))[:NEAREST_BATCHES]
    near = near[np.argsort(-scores[near], kind="stable")]
    yield from (b for b in near if b != home)
    yield from (b for b in np.setdiff1d(np.arange(n_batches), near, assume_unique=True) if b != home)


def _swap(plan: np.ndarray, batch_of: np.ndarray, sums: np.ndarray, x: np.ndarray, i: int, j: int) -> None:
    a, b = batch_of[i], batch_of[j]
    plan[a][plan[a] == i] = j
    plan[b][plan[b] == j] = i
    batch_of[i], batch_of[j] = b, a
    sums[a] += x[j] - x[i]
    sums[b] += x[i] - x[j]
