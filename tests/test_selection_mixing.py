"""random_fraction: part of each batch random, the rest chosen by a partition strategy."""

import numpy as np
import pytest

from dist_cl.selection import select_batches


def planted(groups: int, size: int, dim: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(groups, dim))
    u = np.repeat(centres, size, axis=0) + 0.01 * rng.normal(size=(groups * size, dim))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    return u.astype(np.float32), np.repeat(np.arange(groups), size)


@pytest.mark.parametrize("strategy", ["sc", "sc_global", "random"])
@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75, 1.0])
def test_mixed_plans_are_partitions(strategy, fraction):
    u, _ = planted(8, 12)
    plan = select_batches(strategy, u, u, 8, seed=3, random_fraction=fraction)
    assert plan.shape == (12, 8)
    assert len(np.unique(plan)) == plan.size


def test_zero_fraction_is_the_strategy_itself():
    u, _ = planted(8, 12)
    np.testing.assert_array_equal(select_batches("sc_global", u, u, 8, seed=3, random_fraction=0.0),
                                  select_batches("sc_global", u, u, 8, seed=3))


@pytest.mark.parametrize("strategy", ["sc", "sc_global"])
def test_hardness_falls_as_the_random_fraction_grows(strategy):
    """On planted groups, the share of a batch from its largest group measures hardness: it must fall
    from the pure strategy's (whole groups) towards a random partition's as the fraction grows."""
    u, group = planted(12, 8)
    share = [np.mean([np.bincount(group[row]).max() for row in
                      select_batches(strategy, u, u, 8, seed=1, random_fraction=f)]) for f in (0, 0.25, 0.5, 1.0)]
    assert share[0] == 8
    assert share[0] > share[1] > share[2] > share[3]

