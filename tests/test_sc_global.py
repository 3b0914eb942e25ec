"""SC-global: a valid, deterministic partition that finds planted hard batches; its pieces against brute force."""

import hashlib
import importlib
import itertools
import threading
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from dist_cl.selection import plan_loss, sc_global, select_batches
from dist_cl.selection.balanced import balanced_spectral_partition
from dist_cl.selection.knn import cross_knn
from dist_cl.selection.sc_global import kmeans_cells, local_map, sc_global_partition, sparse_loss_affinity

TAU = 0.1


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def random_pairs(n, d, seed, view_noise=0.5):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, d))
    return unit(z + view_noise * rng.standard_normal((n, d))), unit(z + view_noise * rng.standard_normal((n, d)))


def planted_pairs(n_groups, batch_size, d, seed, spread=0.05):
    """n_groups tight groups of B pairs around random centres, rows shuffled; returns u, v, group of each row."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((n_groups, d)))
    group = rng.permutation(np.repeat(np.arange(n_groups), batch_size))
    z = centres[group] + spread * rng.standard_normal((len(group), d))
    return (unit(z + 0.1 * spread * rng.standard_normal(z.shape)),
            unit(z + 0.1 * spread * rng.standard_normal(z.shape)), group)


def all_partitions(items, batch_size):
    """Every partition of ``items`` into groups of batch_size (the first item always in the first group)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for mates in itertools.combinations(rest, batch_size - 1):
        remaining = [i for i in rest if i not in mates]
        for tail in all_partitions(remaining, batch_size):
            yield [[first, *mates], *tail]


def test_sparse_loss_affinity_matches_dense_formula_on_8_points():
    u, v = random_pairs(8, 5, seed=0)
    batch_size = 4
    s = u @ v.T / TAU
    w = np.zeros((8, 8))
    for i, j in itertools.product(range(8), repeat=2):
        w[i, j] = np.log(1 + (batch_size - 1) * np.exp(s[i, j] - s[i, i])) + np.log(
            1 + (batch_size - 1) * np.exp(s[j, i] - s[i, i]))
    expected = w + w.T
    np.fill_diagonal(expected, 0.0)
    rows, cols = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    # every pair named twice (i,j and j,i) plus the diagonal: each must count once, the diagonal never
    graph = sparse_loss_affinity(u @ v.T, rows.ravel(), cols.ravel(), batch_size, TAU)
    np.testing.assert_allclose(graph.toarray(), expected, rtol=1e-9)  # the naive log(1 + x) loses digits


def test_sparse_loss_affinity_keeps_only_candidate_edges():
    u, v = random_pairs(8, 5, seed=1)
    graph = sparse_loss_affinity(u @ v.T, np.array([0, 3]), np.array([5, 2]), 4, TAU).toarray()
    assert set(zip(*np.nonzero(graph))) == {(0, 5), (5, 0), (3, 2), (2, 3)}


@pytest.mark.parametrize("n, k", [(50, 5), (7, 6), (7, 20), (700, 8), (1100, 16)])
def test_cross_knn_matches_brute_force_numpy(n, k):
    """Small blocks take one top-k of every line; from 64 k GROUPS rows the two-stage top-k (1100 rows:
    padded to a multiple of GROUPS)."""
    u, v = random_pairs(n, 16, seed=n + k)
    u, v = u.astype(np.float32), v.astype(np.float32)
    block, u_to_v, v_to_u = cross_knn(u, v, k)
    s = u.astype(np.float64) @ v.T.astype(np.float64)
    np.testing.assert_allclose(block, s, rtol=1e-5, atol=1e-5)
    np.fill_diagonal(s, -np.inf)
    k = min(k, n - 1)
    assert u_to_v.shape == v_to_u.shape == (n, k)
    for i in range(n):
        assert set(u_to_v[i]) == set(np.argsort(-s[i])[:k])
        assert set(v_to_u[i]) == set(np.argsort(-s[:, i])[:k])


@pytest.mark.parametrize("n, batch_size", [(96, 8), (100, 8), (37, 5), (64, 64), (12, 2), (5, 7)])
def test_balanced_partition_is_exactly_balanced(n, batch_size):
    rng = np.random.default_rng(n)
    # two disconnected blocks plus isolated vertices: components that do not pack into halves exactly
    dense = rng.random((n, n)) * (rng.random((n, n)) < 0.2)
    dense[: n // 3, n // 3:] = 0
    dense[n - 3:] = 0
    graph = sp.csr_matrix(np.triu(dense, 1) + np.triu(dense, 1).T)
    groups, leftover = balanced_spectral_partition(graph, batch_size, seed=0)
    assert groups.shape == (n // batch_size, batch_size)
    assert len(leftover) == n % batch_size
    assert np.array_equal(np.sort(np.concatenate([groups.ravel(), leftover])), np.arange(n))


@pytest.mark.parametrize("hnsw_assign_min", [10**9, 16])
def test_kmeans_cells_cover_every_row_once_within_twice_cell_size(monkeypatch, hnsw_assign_min):
    monkeypatch.setattr(sc_global, "HNSW_ASSIGN_MIN", hnsw_assign_min)  # 16: the HNSW assignment path
    u, v, _ = planted_pairs(150, 8, d=32, seed=5)
    cells = kmeans_cells(u + v, 256, seed=0, fine_size=32)
    assert np.array_equal(np.sort(np.concatenate(cells)), np.arange(len(u)))
    assert all(0 < len(cell) <= 2 * 256 for cell in cells)


@pytest.mark.parametrize("n_groups, batch_size, cell_size", [(6, 4, 4096), (16, 8, 4096), (40, 8, 64), (4, 2, 4096)])
def test_sc_global_recovers_planted_groups(n_groups, batch_size, cell_size):
    u, v, group = planted_pairs(n_groups, batch_size, d=32, seed=n_groups)
    plan = sc_global_partition(u, v, batch_size, seed=0, tau=TAU, knn=2 * batch_size, cell_size=cell_size)
    found = sorted(sorted(group[row]) for row in plan)
    assert found == sorted([g] * batch_size for g in range(n_groups))


def test_sc_global_reaches_brute_force_optimum_on_12_points():
    u, v, _ = planted_pairs(3, 4, d=8, seed=3, spread=0.4)
    plan = select_batches("sc_global", u, v, 4, seed=0, tau=TAU)
    losses = [plan_loss(u, v, np.array(p), TAU) for p in all_partitions(list(range(12)), 4)]
    assert len(losses) == 5775
    assert plan_loss(u, v, plan, TAU) == pytest.approx(max(losses), rel=1e-12)


def test_sc_global_lift_beats_random_partitions_on_unplanted_pairs():
    u, v = random_pairs(512, 8, seed=4)
    plan = sc_global_partition(u, v, 16, seed=0, tau=TAU)
    random_losses = [plan_loss(u, v, np.random.default_rng(s).permutation(512).reshape(-1, 16), TAU) for s in range(20)]
    assert plan_loss(u, v, plan, TAU) > max(random_losses)


@pytest.mark.parametrize("n, batch_size", [(100, 7), (64, 2), (33, 33), (1000, 32), (1000, 1000), (250, 3)])
@pytest.mark.parametrize("seed", [0, 1, 2**32 - 1])  # the trainer's epoch seeds span uint32; FAISS takes a C int
def test_sc_global_partition_covers_every_index_once(n, batch_size, seed):
    u, v = random_pairs(n, 12, seed=seed)
    plan = select_batches("sc_global", u, v, batch_size, seed=seed, tau=TAU, cell_size=256)
    assert plan.dtype == np.int64
    assert plan.shape == (n // batch_size, batch_size)
    assert len(np.unique(plan)) == plan.size
    assert plan.min() >= 0 and plan.max() < n
    again = select_batches("sc_global", u, v, batch_size, seed=seed, tau=TAU, cell_size=256)
    assert np.array_equal(plan, again)


def test_sc_global_dropped_remainder_depends_on_seed():
    u, v = random_pairs(103, 12, seed=0)
    dropped = [frozenset(range(103)) - set(sc_global_partition(u, v, 10, seed=s).ravel()) for s in range(5)]
    assert all(len(d) == 3 for d in dropped)
    assert len(set(dropped)) > 1


PLAN_DIGESTS = {
    "planted": "8073bdd642574d31fab0a4933fef0969bf84585f920c8fe231c63381fc71511b",
    "random": "7c8bc73d875025c8d8bfadeed86fcfd51de3dd3499e5652a40116589ba1c2c48",
}
"""SHA-256 of the plans below, recorded at fbbd544, before the cells ran side by side on the cores (issue 30):
a change that speeds sc_global up without changing its algorithm leaves them as they are."""


def digest_case(case):
    """(u, v, B, options): 7-8 cells of 256 on planted groups, or the default cells of 2048 on unplanted pairs."""
    if case == "planted":
        u, v, _ = planted_pairs(60, 32, d=32, seed=7, spread=0.3)
        return u, v, 32, {"seed": 11, "cell_size": 256}
    u, v = random_pairs(6000, 32, seed=8)
    return u, v, 64, {"seed": 12}


@pytest.mark.parametrize("case", sorted(PLAN_DIGESTS))
def test_sc_global_plan_digest_is_unchanged(case):
    u, v, batch_size, options = digest_case(case)
    plan = select_batches("sc_global", u, v, batch_size, tau=TAU, **options)
    assert hashlib.sha256(plan.tobytes()).hexdigest() == PLAN_DIGESTS[case]


def test_sc_global_plan_is_the_same_with_cells_on_one_thread():
    u, v, batch_size, options = digest_case("planted")
    side_by_side = select_batches("sc_global", u, v, batch_size, tau=TAU, **options)
    one_thread = select_batches("sc_global", u, v, batch_size, tau=TAU, map_fn=local_map, **options)
    assert np.array_equal(side_by_side, one_thread)



def test_bench_selection_phases_count_the_cells_run_on_other_threads(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "tools"))
    bench_selection = importlib.import_module("bench_selection")
    u, v, batch_size, options = digest_case("planted")
    profiles = bench_selection.profile_threads()
    try:
        sc_global_partition(u, v, batch_size, tau=TAU, **options)
    finally:
        threading.setprofile(None)
        for profile in profiles:
            profile.disable()
    seconds = bench_selection.phase_seconds(profiles)
    assert set(seconds) == set(bench_selection.PHASES)
    assert all(s > 0 for s in seconds.values()), seconds
