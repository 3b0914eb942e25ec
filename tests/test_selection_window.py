"""The false-negative window (dist_cl.selection.window): exact at its ends, against a float64 brute force."""

import logging

import numpy as np
import pytest
from test_selection_hardness import assert_partition

from dist_cl.config import ConfigError, load_config
from dist_cl.selection import SelectionError, select_batches
from dist_cl.selection.sc_global import knn_loss_graph
from dist_cl.selection.window import _swap_out, conflict_graph, conflicts_within, honour_window, nearest_partners

N, B = 320, 16


def clustered_pairs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pairs in 10 tight clusters, where a sample's nearest are its cluster mates: the neighbours that hard
    batches put together."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(10, 16))
    u = centres[rng.integers(10, size=N)] + 0.4 * rng.normal(size=(N, 16))
    v = u + 0.2 * rng.normal(size=(N, 16))
    return tuple((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32) for x in (u, v))


def brute_force_nearest(u: np.ndarray, v: np.ndarray, p: int) -> np.ndarray:
    """(n, p): the p largest <u_i, v_j>, j != i, in float64 (random data: no ties)."""
    s = u.astype(np.float64) @ v.astype(np.float64).T
    np.fill_diagonal(s, -np.inf)
    return np.argsort(-s, axis=1)[:, :p]


def shared_with_nearest(plan: np.ndarray, nearest: np.ndarray) -> int:
    """Pairs (i, j), j among i's nearest, in one batch of ``plan``."""
    batch_of = np.full(len(nearest), -1)
    batch_of[plan.ravel()] = np.repeat(np.arange(len(plan)), plan.shape[1])
    i = np.repeat(np.arange(len(nearest)), nearest.shape[1])
    j = nearest.ravel()
    return int(((batch_of[i] >= 0) & (batch_of[i] == batch_of[j])).sum())


def test_nearest_partners_equal_a_float64_brute_force():
    u, v = clustered_pairs()
    np.testing.assert_array_equal(nearest_partners(u, v, 5), brute_force_nearest(u, v, 5))


@pytest.mark.parametrize("strategy", ["sc", "sc_global"])
def test_window_zero_is_the_strategys_own_plan(strategy):
    u, v = clustered_pairs()
    np.testing.assert_array_equal(select_batches(strategy, u, v, B, seed=3, false_negative_window=0),
                                  select_batches(strategy, u, v, B, seed=3))


@pytest.mark.parametrize("strategy", ["sc", "sc_global"])
@pytest.mark.parametrize("p", [1, 3, 8])
def test_no_sample_shares_its_batch_with_one_of_its_p_nearest(strategy, p):
    u, v = clustered_pairs()
    nearest = brute_force_nearest(u, v, p)
    assert shared_with_nearest(select_batches(strategy, u, v, B, seed=3), nearest) > 0  # the window has work
    plan = select_batches(strategy, u, v, B, seed=3, false_negative_window=p)
    assert_partition(plan, N, B)
    assert shared_with_nearest(plan, nearest) == 0


def test_the_candidate_edges_leave_out_every_conflicting_pair_and_keep_k_others():
    u, v = clustered_pairs()
    conflicts = conflict_graph(brute_force_nearest(u, v, 4))
    graph = knn_loss_graph(u, v, B, 0.1, knn=6, conflicts=conflicts).tocoo()
    assert not np.asarray(conflicts[graph.row, graph.col]).any()
    # each u_i keeps its 6 nearest v's that do not conflict with it (brute force, float64)
    s = u.astype(np.float64) @ v.astype(np.float64).T
    np.fill_diagonal(s, -np.inf)
    edges = set(zip(graph.row.tolist(), graph.col.tolist()))
    for i in range(0, N, 37):
        ranked = [j for j in np.argsort(-s[i]) if not conflicts[i, j]][:6]
        assert all((i, j) in edges for j in ranked), i


@pytest.mark.parametrize("seed", range(12))
def test_the_repair_stops_only_where_no_swap_frees_a_sample_and_counts_what_is_left(seed, caplog):
    rng = np.random.default_rng(seed)
    u, v = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in rng.normal(size=(2, 52, 6)))
    plan = rng.permutation(52)[:48].reshape(6, 8)  # 4 samples left out, as N % B are
    conflicts = conflict_graph(nearest_partners(u, v, 5))
    with caplog.at_level(logging.WARNING, logger="dist_cl"):
        kept = honour_window(plan, conflicts, u + v)
    assert sorted(kept.ravel()) == sorted(plan.ravel())
    left = conflicts_within(kept, conflicts)
    assert left <= conflicts_within(plan, conflicts)
    batch_of = np.full(52, -1)
    batch_of[kept.ravel()] = np.repeat(np.arange(6), 8)
    x = (u + v) / np.linalg.norm(u + v, axis=1, keepdims=True)
    sums = x[kept].sum(axis=1)
    assert not any(_swap_out(i, kept.copy(), batch_of.copy(), sums.copy(), x, conflicts) for i in kept.ravel())
    assert (f"{left} samples still share a batch" in caplog.text) == (left > 0)


def test_a_window_that_cannot_be_honoured_is_reported(caplog):
    u, v = clustered_pairs()
    plan = np.arange(2 * B).reshape(2, B)  # two batches, and every sample conflicts with 20 others
    conflicts = conflict_graph(nearest_partners(u[: 2 * B], v[: 2 * B], 20))
    with caplog.at_level(logging.WARNING, logger="dist_cl"):
        kept = honour_window(plan, conflicts, u[: 2 * B] + v[: 2 * B])
    assert sorted(kept.ravel()) == list(range(2 * B))
    assert "still share a batch" in caplog.text


@pytest.mark.parametrize(("strategy", "options", "message", "config_message"), [
    ("random", {}, "applies to sc and sc_global; 'random' builds no loss graph",
     "false_negative_window is not an option of strategy 'random'"),
    ("osgd", {}, "applies to sc and sc_global; 'osgd'", "false_negative_window is not an option of strategy 'osgd'"),
    ("sc", {"group_size": 4}, "group_size puts random samples into batches",
     "selection.options.group_size puts random samples into batches"),
    ("sc_global", {"random_fraction": 0.5}, "random_fraction puts random samples into batches",
     "selection.options.random_fraction puts random samples into batches"),
])
def test_the_window_is_refused_where_it_cannot_hold(strategy, options, message, config_message):
    u, v = clustered_pairs()
    with pytest.raises(SelectionError, match=message):
        select_batches(strategy, u, v, B, seed=0, false_negative_window=2, **options)
    with pytest.raises(ConfigError, match=config_message):
        load_config(None, [f"selection.strategy={strategy}", "selection.options.false_negative_window=2",
                           *(f"selection.options.{key}={value}" for key, value in options.items())])
