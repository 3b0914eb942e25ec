"""Selection strategies against brute force and float64 references (paper: Cho et al., TMLR 2024)."""

import inspect
import itertools
import re
from math import comb

import numpy as np
import pytest
import torch
from sklearn.manifold import spectral_embedding as sklearn_spectral_embedding
from test_losses import reference_ntxent

from dist_cl.learn.losses import batch_infonce
from dist_cl.selection import (
    STRATEGIES,
    STRATEGY_FUNCTIONS,
    SelectionError,
    batch_losses,
    lift,
    plan_loss,
    select_batches,
)
from dist_cl.selection.spectral import dense_loss_affinity, dense_spectral_embedding

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def unit_pairs(n: int, d: int, seed: int, dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    u, v = rng.normal(size=(2, n, d))
    return ((u / np.linalg.norm(u, axis=1, keepdims=True)).astype(dtype),
            (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(dtype))


def reference_loss(u: np.ndarray, v: np.ndarray, batch, tau: float) -> float:
    """L(S) written out term by term in float64 (docs/DESIGN.md §1)."""
    s = u[list(batch)].astype(np.float64) @ v[list(batch)].astype(np.float64).T / tau
    total = 0.0
    for i in range(len(batch)):
        total += -np.log(np.exp(s[i, i]) / np.exp(s[i]).sum()) - np.log(np.exp(s[i, i]) / np.exp(s[:, i]).sum())
    return total / len(batch)


def test_batch_infonce_matches_float64_reference():
    u, v = unit_pairs(6, 5, seed=0)
    expected = reference_loss(u, v, range(6), tau=0.3)
    assert float(batch_infonce(torch.from_numpy(u), torch.from_numpy(v), 0.3)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_plan_loss_and_batch_losses_match_float64_reference(dtype):
    u, v = unit_pairs(20, 8, seed=1, dtype=dtype)
    plan = np.random.default_rng(2).permutation(20).reshape(5, 4)
    expected = [reference_loss(u, v, row, tau=0.1) for row in plan]
    np.testing.assert_allclose(batch_losses(u, v, plan, tau=0.1), expected, rtol=1e-10)
    assert plan_loss(u, v, plan, tau=0.1) == pytest.approx(np.mean(expected), rel=1e-10)


def test_float32_scoring_the_trainer_logs_agrees_with_float64_to_six_digits():
    u, v = unit_pairs(512, 32, seed=3)
    plan = select_batches("sc_global", u, v, 64, seed=0, tau=0.1)
    np.testing.assert_allclose(batch_losses(u, v, plan, tau=0.1, dtype=torch.float32),
                               batch_losses(u, v, plan, tau=0.1), rtol=1e-6)
    assert lift(u, v, plan, tau=0.1, seed=1, dtype=torch.float32) == pytest.approx(lift(u, v, plan, tau=0.1, seed=1),
                                                                                   rel=1e-6)


def test_lift_is_one_for_the_random_partition_it_compares_against_and_above_one_for_osgd():
    u, v = unit_pairs(12, 3, seed=3)
    reference = select_batches("random", u, v, 3, seed=7)
    assert lift(u, v, reference, tau=0.1, seed=7) == pytest.approx(1.0, abs=1e-12)
    assert lift(u, v, select_batches("osgd", u, v, 3, seed=7, tau=0.1), tau=0.1, seed=7) > 1.0


def test_osgd_exact_returns_the_highest_loss_batches_of_brute_force():
    u, v = unit_pairs(9, 3, seed=4)
    brute = {batch: reference_loss(u, v, batch, tau=0.2) for batch in itertools.combinations(range(9), 3)}
    ranked = sorted(brute, key=brute.get, reverse=True)
    plan = select_batches("osgd", u, v, 3, seed=0, tau=0.2)
    assert plan.shape == (3, 3)
    assert [tuple(row) for row in plan] == ranked[:3]
    assert tuple(select_batches("osgd", u, v, 3, seed=0, tau=0.2, q=1)[0]) == ranked[0]


def test_osgd_scores_batches_with_the_training_loss():
    """Under loss.name=ntxent, OSGD keeps the highest NT-Xent batches, which here are not InfoNCE's."""
    u, v = unit_pairs(9, 3, seed=4)
    batches = list(itertools.combinations(range(9), 3))
    ntxent = {batch: reference_ntxent(u[list(batch)], v[list(batch)], 0.2) for batch in batches}
    infonce = {batch: reference_loss(u, v, batch, tau=0.2) for batch in batches}
    ranked = sorted(batches, key=ntxent.get, reverse=True)[:3]
    assert ranked != sorted(batches, key=infonce.get, reverse=True)[:3]
    plan = select_batches("osgd", u, v, 3, seed=0, tau=0.2, loss="ntxent")
    assert [tuple(row) for row in plan] == ranked
    np.testing.assert_allclose(batch_losses(u, v, plan, tau=0.2, loss="ntxent"), [ntxent[b] for b in ranked],
                               rtol=1e-12)


def test_osgd_kb_keeps_the_top_q_of_each_chunk_of_k_random_batches_without_shared_indices():
    u, v = unit_pairs(60, 4, seed=5)
    plan = select_batches("osgd", u, v, 3, seed=1, tau=0.1, k=5, q=2)
    assert plan.shape == (8, 3)
    assert len(np.unique(plan)) == plan.size
    chunks = np.random.default_rng(1).permutation(60).reshape(4, 5, 3)
    for chunk, kept in zip(chunks, plan.reshape(4, 2, 3)):
        losses = [reference_loss(u, v, row, tau=0.1) for row in chunk]
        np.testing.assert_array_equal(kept, chunk[np.argsort(losses)[::-1][:2]])


def test_ncb_enumerates_every_batch_exactly_once():
    u, v = unit_pairs(9, 2, seed=6)
    plan = select_batches("ncb", u, v, 4, seed=0)
    assert plan.shape == (comb(9, 4), 4)
    rows = {tuple(sorted(row)) for row in plan}
    assert len(rows) == comb(9, 4)
    assert rows == set(itertools.combinations(range(9), 4))


def test_full_is_one_batch_of_every_index():
    u, v = unit_pairs(7, 2, seed=7)
    np.testing.assert_array_equal(select_batches("full", u, v, 3, seed=0), [np.arange(7)])


def test_dense_loss_affinity_matches_the_papers_pairwise_terms():
    u, v = unit_pairs(5, 3, seed=8)
    b, tau = 4, 0.2
    s = u @ v.T / tau
    w = np.array([[np.log(1 + (b - 1) * np.exp(s[i, j] - s[i, i])) + np.log(1 + (b - 1) * np.exp(s[j, i] - s[i, i]))
                   for j in range(5)] for i in range(5)])
    np.testing.assert_allclose(dense_loss_affinity(u, v, b, tau), w + w.T, rtol=1e-12)


def test_dense_spectral_embedding_spans_the_same_subspace_as_sklearn_in_the_official_code():
    u, v = unit_pairs(20, 6, seed=9)
    log_affinity = dense_loss_affinity(u, v, 4, tau=0.5)
    ours = dense_spectral_embedding(log_affinity, n_components=5)
    theirs = sklearn_spectral_embedding(np.exp(log_affinity), n_components=5, norm_laplacian=True,
                                        drop_first=False, eigen_solver="arpack", random_state=0)

    def projector(basis):
        q, _ = np.linalg.qr(basis)
        return q @ q.T

    np.testing.assert_allclose(projector(ours), projector(theirs), atol=1e-6)


def test_sc_partition_is_harder_than_the_average_random_partition():
    u, v = unit_pairs(80, 8, seed=10)
    sc = plan_loss(u, v, select_batches("sc", u, v, 8, seed=0, tau=0.1), tau=0.1)
    random_losses = [plan_loss(u, v, select_batches("random", u, v, 8, seed=s), tau=0.1) for s in range(200)]
    assert sc >= np.mean(random_losses)


@pytest.mark.parametrize("seed", range(5))
def test_sc_recovers_planted_groups_exactly(seed):
    n_groups, b, d = 6, 4, 16
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.normal(size=(d, n_groups)))[0].T
    group = rng.permutation(np.repeat(np.arange(n_groups), b))
    u = centres[group] + 0.05 * rng.normal(size=(n_groups * b, d))
    v = centres[group] + 0.05 * rng.normal(size=(n_groups * b, d))
    u, v = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (u, v))
    plan = select_batches("sc", u, v, b, seed=seed, tau=0.1)
    assert {frozenset(row) for row in plan} == {frozenset(np.flatnonzero(group == g)) for g in range(n_groups)}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_declared_options_are_exactly_the_functions_keyword_parameters(name):
    spec, parameters = STRATEGIES[name], inspect.signature(STRATEGY_FUNCTIONS[name]).parameters
    convention = {"u", "v", "batch_size", "seed", "tau"} if spec.reads_embeddings else {"n", "batch_size", "seed"}
    collectives = {"map_fn"} if spec.takes_map_fn else set()
    devices = {"device"} if spec.takes_device else set()
    losses = {"loss", "loss_options"} if spec.takes_loss else set()
    conflicts = {"conflicts"} if spec.takes_conflicts else set()
    assert set(parameters) == convention | set(spec.options) | collectives | devices | losses | conflicts
    assert all(parameters[option].kind is inspect.Parameter.KEYWORD_ONLY for option in spec.options)


def test_every_declared_strategy_has_a_function():
    assert STRATEGY_FUNCTIONS.keys() == STRATEGIES.keys()


def test_registry_marks_which_strategies_read_embeddings():
    assert {name for name, s in STRATEGIES.items() if s.reads_embeddings} >= {"osgd", "sc"}
    assert not STRATEGIES["full"].reads_embeddings and not STRATEGIES["ncb"].reads_embeddings
    assert not STRATEGIES["fixed"].per_epoch


@pytest.mark.parametrize(("name", "args", "options", "message"), [
    ("random", (8, 2), {"batch_size": 9}, "batch_size=9 is larger than the number of pairs N=8"),
    ("sc", (8, 2), {"batch_size": 1}, "batch_size=1 must be at least 2"),
    ("nope", (8, 2), {"batch_size": 2}, f"unknown selection strategy 'nope'; known: {', '.join(sorted(STRATEGIES))}"),
    ("ncb", (30, 2), {"batch_size": 10}, "30,045,015 batches, over max_batches=100,000"),
    ("full", (30, 2), {"batch_size": 2, "max_n": 16}, "full batch of N=30 is over max_n=16"),
    ("sc", (8, 2), {"batch_size": 2, "tau": 0.0}, "tau=0.0 must be positive"),
])
def test_bad_input_raises_a_selection_error_that_names_the_problem(name, args, options, message):
    u, v = unit_pairs(*args, seed=0)
    with pytest.raises(SelectionError, match=message.replace("(", r"\(")):
        select_batches(name, u, v, seed=0, **options)


@pytest.mark.parametrize("name", ["sc", "osgd"])
def test_non_finite_embeddings_are_refused_by_strategies_that_read_them(name):
    u, v = unit_pairs(8, 2, seed=0)
    u[3, 1] = np.nan
    with pytest.raises(SelectionError, match="non-finite"):
        select_batches(name, u, v, 2, seed=0)


@pytest.mark.parametrize(("name", "options"), [
    ("random", {}), ("fixed", {}), ("full", {}), ("ncb", {}), ("random", {"random_fraction": 0.5}),
    ("fixed", {"group_size": 2}),
])
def test_strategies_that_ignore_the_embeddings_plan_from_num_samples_alone(name, options):
    u, v = unit_pairs(9, 2, seed=0)
    np.testing.assert_array_equal(select_batches(name, None, None, 4, seed=3, num_samples=9, **options),
                                  select_batches(name, u, v, 4, seed=3, **options))


@pytest.mark.parametrize(("name", "u", "num_samples", "message"), [
    ("sc", None, 8, "strategy 'sc' reads the embeddings: pass u and v, not num_samples alone"),
    ("random", None, None, "strategy 'random' needs num_samples (N) where u and v are not given"),
    ("random", np.zeros((8, 2)), 8, "num_samples is for calls without u and v"),
])
def test_num_samples_goes_without_u_and_v_and_only_for_strategies_that_ignore_them(name, u, num_samples, message):
    with pytest.raises(SelectionError, match=re.escape(message)):
        select_batches(name, u, u, 2, seed=0, num_samples=num_samples)


def test_mismatched_shapes_are_refused():
    u, _ = unit_pairs(8, 3, seed=0)
    with pytest.raises(SelectionError, match=r"one shape, got \(8, 3\) and \(7, 3\)"):
        select_batches("random", u, u[:7], 2, seed=0)
