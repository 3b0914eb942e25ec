"""Plan invariants of every strategy over many shapes and seeds (hypothesis)."""

from math import comb

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_cl.selection import select_batches

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def unit_pairs(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    u, v = rng.normal(size=(2, n, d))
    return u / np.linalg.norm(u, axis=1, keepdims=True), v / np.linalg.norm(v, axis=1, keepdims=True)


@st.composite
def problems(draw, max_n=48):
    n = draw(st.integers(2, max_n))
    b = draw(st.integers(2, n))
    return n, b, draw(st.integers(1, 8)), draw(st.integers(0, 2**31 - 1))


@settings(max_examples=40, deadline=None)
@given(problems(), st.sampled_from(["random", "fixed", "sc"]), st.integers(1, 5))
def test_partitions_cover_n_minus_remainder_distinct_indices_and_are_deterministic(problem, name, chunk_batches):
    n, b, d, seed = problem
    u, v = unit_pairs(n, d, seed)
    options = {"chunk_batches": chunk_batches} if name == "sc" else {}
    plan = select_batches(name, u, v, b, seed=seed, **options)
    assert plan.dtype == np.int64 and plan.shape == (n // b, b)
    assert len(np.unique(plan)) == plan.size == n - n % b
    assert plan.min() >= 0 and plan.max() < n
    np.testing.assert_array_equal(plan, select_batches(name, u, v, b, seed=seed, **options))


@settings(max_examples=15, deadline=None)
@given(st.integers(16, 48), st.integers(2, 4), st.sampled_from(["random", "fixed", "sc"]))
def test_partitions_differ_across_seeds(n, b, name):
    u, v = unit_pairs(n, 4, seed=n)
    plans = {select_batches(name, u, v, b, seed=seed).tobytes() for seed in range(4)}
    assert len(plans) > 1


@settings(max_examples=30, deadline=None)
@given(problems(max_n=12))
def test_ncb_and_exact_osgd_rows_are_distinct_b_subsets(problem):
    n, b, d, seed = problem
    u, v = unit_pairs(n, d, seed)
    ncb = select_batches("ncb", u, v, b, seed=seed)
    assert ncb.shape == (comb(n, b), b)
    assert len({tuple(sorted(row)) for row in ncb}) == len(ncb)
    osgd = select_batches("osgd", u, v, b, seed=seed, tau=0.5)
    assert osgd.shape == (n // b, b)
    assert all(len(set(row)) == b for row in osgd)
    assert len({tuple(sorted(row)) for row in osgd}) == len(osgd)
    np.testing.assert_array_equal(osgd, select_batches("osgd", u, v, b, seed=seed + 1, tau=0.5))


@settings(max_examples=30, deadline=None)
@given(problems(max_n=200), st.data())
def test_osgd_kb_plans_share_no_index_and_keep_q_per_chunk(problem, data):
    n, b, d, seed = problem
    k = data.draw(st.integers(1, n // b))
    q = data.draw(st.integers(1, k))
    u, v = unit_pairs(n, d, seed)
    plan = select_batches("osgd", u, v, b, seed=seed, k=k, q=q)
    assert plan.shape == ((n // b) // k * q, b)
    assert len(np.unique(plan)) == plan.size
    np.testing.assert_array_equal(plan, select_batches("osgd", u, v, b, seed=seed, k=k, q=q))
