"""Exactly balanced partition of a weighted graph into groups of B by recursive spectral bisection.

Each node set of m*B (+ r) vertices is cut into floor(m/2)*B and ceil(m/2)*B (+ r) vertices by a
size-constrained 2-means in the spectral embedding of its normalised Laplacian, started from the Fiedler
vector's rank cut (a balanced normalised cut), and both halves are cut again until every group holds B
vertices (and one piece holds the r < B left over). Balance is exact by construction, so no Hungarian
step is needed, and every eigenproblem is small: 8 vectors of a shrinking subgraph, not N/B of all.
"""

import numpy as np
import scipy.linalg
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from threadpoolctl import threadpool_limits

EMBEDDING_DIMS = 8
"""Eigenvectors per bisection: enough to tell apart the clusters that share one Fiedler value."""
DIFFUSION_TIME = 4
"""Eigenvector weights lambda^t: t random-walk steps, so a coordinate counts by how long it persists."""
TWO_MEANS_ITERATIONS = 10
"""Balanced 2-means refinements of the Fiedler cut; it usually settles in 2-3."""
OVERSAMPLE = 8
"""Extra vectors in the subspace iteration block: they absorb the slowest-converging directions."""
SUBSPACE_ITERATIONS = 10
"""Block power steps; the eigenvalues that matter (near 1) dominate the rest within a few."""
ORTHONORMALISE_EVERY = 5
"""Power steps per QR: the span does not depend on it, and five steps of a spectrum in [0, 1] leave the block
well conditioned."""
DENSE_EIGH_MAX = 64
"""Subgraphs up to this size use a dense eigensolver; above it the block iteration is faster."""


def balanced_spectral_partition(graph: sp.csr_matrix, batch_size: int, *,
                                seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Groups (n // B, B) of vertex indices of the symmetric non-negative ``graph``, and the n % B
    vertices left over: a part cut off like any other group, so it is one coherent piece of the graph."""
    # BLAS here works on (n, 16) blocks, where threads only spin and slow the bisection down
    # (docs/BENCHMARKS.md, "sc_global design": BLAS threads)
    with threadpool_limits(limits=1, user_api="blas"):
        return _recursive_bisection(sp.csr_matrix(graph, dtype=np.float64), batch_size,
                                    np.random.default_rng(seed))


def _recursive_bisection(graph: sp.csr_matrix, batch_size: int,
                         rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    groups, leftover = [], np.arange(0)
    stack = [np.arange(graph.shape[0])]
    while stack:
        nodes = stack.pop()
        if len(nodes) < batch_size:
            leftover = nodes
            continue
        if len(nodes) == batch_size:
            groups.append(nodes)
            continue
        # the remainder n % B always stays on the right, so it ends as one piece beside a full group
        left = max(len(nodes) // batch_size // 2, 1) * batch_size
        in_left = bisect(graph[nodes][:, nodes], left, rng)
        stack.append(nodes[~in_left])
        stack.append(nodes[in_left])
    return np.array(groups, dtype=np.int64).reshape(-1, batch_size), leftover


def bisect(graph: sp.csr_matrix, left: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of exactly ``left`` vertices forming a low normalised cut against the rest.

    Disconnected components are never split unless sizes force it: they are packed, largest first,
    into the left side, and only the smallest component that does not fit is cut spectrally.
    """
    n_comp, labels = connected_components(graph, directed=False)
    if n_comp == 1:
        return _spectral_cut(graph, left, rng)
    sizes = np.bincount(labels, minlength=n_comp)
    in_left_comp = np.zeros(n_comp, dtype=bool)
    room = left
    for c in np.argsort(-sizes, kind="stable"):
        if sizes[c] <= room:
            in_left_comp[c] = True
            room -= sizes[c]
    mask = in_left_comp[labels]
    if room:
        outside = np.flatnonzero(~in_left_comp)
        straddler = outside[np.argmin(sizes[outside])]
        members = np.flatnonzero(labels == straddler)
        mask[members] = _spectral_cut(graph[members][:, members], room, rng)
    return mask


def _spectral_cut(graph: sp.csr_matrix, left: int, rng: np.random.Generator) -> np.ndarray:
    """The ``left`` vertices of a connected graph on one side of a balanced 2-means cut of its spectral
    embedding, started from the Fiedler cut.

    The Fiedler vector alone ties whole clusters when its eigenvalue is near-degenerate (many weakly
    linked clusters), and a cut at a fixed rank then splits a tied cluster; more eigenvectors separate them.
    """
    embedding = diffusion_embedding(graph, EMBEDDING_DIMS, rng)
    in_left = _lowest(embedding[:, 0], left)
    for _ in range(TWO_MEANS_ITERATIONS):
        # with both centres fixed, the best split of given sizes sorts by the difference of distances
        toward_right = embedding @ (embedding[~in_left].mean(0) - embedding[in_left].mean(0))
        updated = _lowest(toward_right, left)
        if np.array_equal(updated, in_left):
            break
        in_left = updated
    return in_left


def _lowest(score: np.ndarray, count: int) -> np.ndarray:
    mask = np.zeros(len(score), dtype=bool)
    mask[np.argsort(score, kind="stable")[:count]] = True
    return mask


def diffusion_embedding(graph: sp.csr_matrix, dims: int, rng: np.random.Generator) -> np.ndarray:
    """Rows of D^-1/2 X Lambda^t, X the eigenvectors of D^-1/2 W D^-1/2 after the trivial one, largest
    first (a diffusion map of the normalised-cut embedding; column 0 is the Fiedler vector)."""
    n = graph.shape[0]
    dims = min(dims, n - 2)
    if dims < 1:
        return np.arange(n, dtype=np.float64)[:, None]
    inv_sqrt_deg = 1.0 / np.sqrt(np.maximum(np.asarray(graph.sum(axis=1)).ravel(), 1e-300))
    normalised = sp.diags(inv_sqrt_deg) @ graph @ sp.diags(inv_sqrt_deg)
    if n <= DENSE_EIGH_MAX:
        vals, vecs = scipy.linalg.eigh(normalised.toarray(), driver="evd")
        vals, vecs = vals[:-1], vecs[:, :-1]  # the trivial pair: eigenvalue 1, vector D^1/2 1
    else:
        trivial = np.sqrt(np.asarray(graph.sum(axis=1)).ravel())
        vals, vecs = _subspace_iteration(normalised, trivial / np.linalg.norm(trivial), dims + OVERSAMPLE, rng)
    largest_first = np.argsort(vals)[::-1][:dims]
    # diffusion-map weights: eigenvectors of within-cluster noise (eigenvalue near 0) would otherwise
    # count as much as those that separate clusters (eigenvalue near 1)
    weights = np.clip(vals[largest_first], 0.0, None) ** DIFFUSION_TIME
    return vecs[:, largest_first] * inv_sqrt_deg[:, None] * weights


def _subspace_iteration(normalised: sp.csr_matrix, trivial: np.ndarray, count: int,
                        rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Approximate top ``count`` eigenpairs of D^-1/2 W D^-1/2 orthogonal to its known top vector.

    Block power iteration on (M + I) / 2 (spectrum in [0, 1], same vectors) then Rayleigh-Ritz. The cut
    needs the dominant subspace, not converged vectors, and ARPACK spent hundreds of matvecs a call resolving
    near-degenerate eigenvalues (docs/BENCHMARKS.md, "sc_global design"); a block of sparse products is cheap.
    """
    block = rng.standard_normal((normalised.shape[0], count))
    for step in range(SUBSPACE_ITERATIONS):
        if step % ORTHONORMALISE_EVERY == 0:
            block -= np.outer(trivial, trivial @ block)
            block = np.linalg.qr(block)[0]
        block = 0.5 * (normalised @ block + block)
    block -= np.outer(trivial, trivial @ block)
    block = np.linalg.qr(block)[0]
    vals, rotation = np.linalg.eigh(block.T @ (normalised @ block))
    return vals, block @ rotation
