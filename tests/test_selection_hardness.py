"""Hardness controls (group_size, sc_global's chunk_batches, random_fraction), plan row order and the plan
diagnostics: each control exact at its ends and deterministic for a seed."""

import numpy as np
import pytest
from test_selection_mixing import planted

from dist_cl.selection import STRATEGY_FUNCTIONS, SelectionError, select_batches
from dist_cl.selection.diagnostics import label_purity, pair_repeat, same_group_share
from dist_cl.selection.partitions import random_partition


def batch_set(plan: np.ndarray) -> set[frozenset]:
    return {frozenset(row.tolist()) for row in plan}


def assert_partition(plan: np.ndarray, n: int, batch_size: int):
    assert plan.shape == (n // batch_size, batch_size)
    assert len(np.unique(plan)) == plan.size and plan.min() >= 0 and plan.max() < n


@pytest.mark.parametrize("strategy", ["sc", "sc_global"])
def test_loss_aware_rows_come_in_a_seeded_order_of_the_strategys_own_batches(strategy):
    u, _ = planted(12, 8)
    plan = select_batches(strategy, u, u, 8, seed=5)
    own = STRATEGY_FUNCTIONS[strategy](u, u, 8, seed=5, tau=0.1)
    assert batch_set(plan) == batch_set(own)
    np.testing.assert_array_equal(plan, select_batches(strategy, u, u, 8, seed=5))
    assert not np.array_equal(plan, own)  # 12 rows: the identity order has chance 1 / 12!


def test_random_and_fixed_plans_keep_their_order():
    u, _ = planted(4, 8)
    for strategy in ("random", "fixed"):
        np.testing.assert_array_equal(select_batches(strategy, u, u, 8, seed=2), random_partition(len(u), 8, seed=2))


@pytest.mark.parametrize("strategy", ["sc", "sc_global"])
def test_group_size_ends_are_the_strategy_and_a_random_partition(strategy):
    u, _ = planted(12, 8)
    assert batch_set(select_batches(strategy, u, u, 8, seed=3, group_size=8)) == \
        batch_set(select_batches(strategy, u, u, 8, seed=3))
    assert batch_set(select_batches(strategy, u, u, 8, seed=3, group_size=1)) == \
        batch_set(random_partition(len(u), 8, seed=3))


@pytest.mark.parametrize("strategy", ["sc", "sc_global"])
def test_group_size_keeps_hard_groups_whole_and_mixes_them(strategy):
    """On planted groups of 8, groups of 4 are halves of planted groups, and a batch of 8 holds two of them:
    the largest planted share of a batch falls from 8 (whole groups) towards a random partition's.

    sc_global keeps every half within one planted group; the paper's SC (k-means on its spectral embedding,
    then a Hungarian balancing) splits groups of identical points less cleanly, but far above chance
    (a random 4 of 96 is one group's with probability 0.0003)."""
    u, group = planted(12, 8)
    plan = select_batches(strategy, u, u, 8, seed=1, group_size=4)
    assert_partition(plan, 96, 8)
    np.testing.assert_array_equal(plan, select_batches(strategy, u, u, 8, seed=1, group_size=4))
    pure = np.mean([len(set(group[half])) == 1 for row in plan for half in (row[:4], row[4:])])
    assert pure == 1.0 if strategy == "sc_global" else pure > 0.5
    assert np.mean([np.bincount(group[row]).max() for row in plan]) < 8
    assert not np.array_equal(plan, select_batches(strategy, u, u, 8, seed=2, group_size=4))


@pytest.mark.parametrize("strategy,options,message", [
    ("sc_global", {"group_size": 3}, "group_size=3 must divide batch_size=8"),
    ("osgd", {"group_size": 4, "k": 2}, "group_size applies to partition strategies; 'osgd'"),
    ("sc", {"group_size": 4, "random_fraction": 0.5}, "set one of them"),
    ("sc", {"random_fraction": 1.5}, "random_fraction=1.5 must be in"),
    ("osgd", {"random_fraction": 0.5, "k": 2}, "random_fraction applies to partition strategies; 'osgd'"),
])
def test_hardness_controls_are_checked(strategy, options, message):
    u, _ = planted(4, 8)
    with pytest.raises(SelectionError, match=message):
        select_batches(strategy, u, u, 8, seed=0, **options)


def test_random_fraction_one_is_a_random_partition():
    u, _ = planted(8, 12)
    for strategy in ("sc", "sc_global"):
        assert batch_set(select_batches(strategy, u, u, 8, seed=4, random_fraction=1.0)) == \
            batch_set(random_partition(len(u), 8, seed=4))


def test_sc_global_chunk_ends_are_a_random_partition_and_the_global_partition():
    u, _ = planted(12, 8)
    u = np.concatenate([u, u[:5]])  # N % B = 5 samples dropped
    assert batch_set(select_batches("sc_global", u, u, 8, seed=6, chunk_batches=1)) == \
        batch_set(random_partition(len(u), 8, seed=6))
    for k in (12, 50):
        np.testing.assert_array_equal(select_batches("sc_global", u, u, 8, seed=6, chunk_batches=k),
                                      select_batches("sc_global", u, u, 8, seed=6))


def test_sc_global_chunks_partition_within_random_chunks():
    u, group = planted(12, 8)
    plan = select_batches("sc_global", u, u, 8, seed=7, chunk_batches=3)
    assert_partition(plan, 96, 8)
    np.testing.assert_array_equal(plan, select_batches("sc_global", u, u, 8, seed=7, chunk_batches=3))
    purity = lambda p: np.mean([np.bincount(group[row]).max() for row in p])  # noqa: E731
    # a chunk of 24 random samples rarely holds a planted group whole: less pure than global, purer than random
    assert purity(random_partition(len(u), 8, seed=7)) < purity(plan) < purity(select_batches("sc_global", u, u, 8,
                                                                                             seed=7))
    with pytest.raises(SelectionError, match="chunk_batches=-1"):
        select_batches("sc_global", u, u, 8, seed=0, chunk_batches=-1)


def test_diagnostics_on_a_hand_made_plan():
    plan = np.array([[0, 1, 2], [3, 4, 5]])
    previous = np.array([[0, 1, 3], [2, 4, 5]])
    # batch-mate pairs: {0,1} {0,2} {1,2} {3,4} {3,5} {4,5}; repeated from previous: {0,1} and {4,5}
    assert pair_repeat(plan, previous, 6) == pytest.approx(2 / 6)
    assert pair_repeat(plan, plan, 6) == 1.0
    labels = np.array([7, 7, 7, 1, 2, -1])
    # same label: {0,1} {0,2} {1,2}; the unlabelled 5 matches nothing
    assert label_purity(plan, labels) == pytest.approx(3 / 6)
    # a previous plan that left sample 5 out (N % B dropped) repeats only {3,4}
    assert pair_repeat(plan, np.array([[0, 2, 3, 4]]), 6) == pytest.approx(2 / 6)
    assert same_group_share(np.array([[0, 1]]), np.array([-1, -1])) == 0.0
