"""The synthetic experiment (dist_cl.evaluate.synthetic, run by tools/synthetic.py) end to end, and the
paper's synthetic ordering where it holds on a short run."""

import csv

import numpy as np
import pytest
import torch

from dist_cl.evaluate import synthetic as synthetic_experiment
from dist_cl.selection import select_batches


@pytest.fixture(scope="module")
def synthetic(one_torch_thread):
    """The experiment, on one torch thread as tools/synthetic.py runs it (its tensors are tiny)."""
    return synthetic_experiment


def test_synthetic_writes_csv_png_and_tensorboard_for_every_strategy(synthetic, tmp_path):
    rows = synthetic.run(synthetic.Settings(steps=4, seeds=2, dims=[4]), tmp_path)
    assert [r["strategy"] for r in rows] == list(synthetic.STRATEGIES)
    with open(tmp_path / "losses.csv") as f:
        records = list(csv.DictReader(f))
    assert len(records) == len(synthetic.STRATEGIES) * 2 * 4
    assert all(np.isfinite(float(r["full_batch_loss"])) for r in records)
    assert (tmp_path / "losses.png").stat().st_size > 0
    for name in synthetic.STRATEGIES:
        assert list((tmp_path / "tensorboard" / "N8_B2_d4" / name).glob("events.out.tfevents.*"))


def test_optimum_is_the_loss_of_the_simplex_etf_gram_matrix(synthetic):
    n, tau = 8, 0.5
    gram = np.full((n, n), -1 / (n - 1)) + np.eye(n) * n / (n - 1)
    logits = gram / tau
    expected = 2 * np.mean(np.log(np.exp(logits).sum(1)) - np.diag(logits))
    kind, value = synthetic.optimum(n, 2 * n, tau)
    assert kind == "simplex ETF" and value == pytest.approx(expected, rel=1e-12)
    assert synthetic.optimum(n, 3, tau) is None


def test_osgd_update_trains_on_the_batch_exact_osgd_selects(synthetic):
    xu, xv = torch.randn(2, 1, 8, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    first = next(synthetic.epoch_batches("osgd", xu, xv, 2, [0], 0, 1.0, fixed_plan=None))
    unit_u, unit_v = (torch.nn.functional.normalize(x[0], dim=-1).numpy() for x in (xu, xv))
    expected = select_batches("osgd", unit_u, unit_v, 2, seed=0, tau=1.0, q=1)
    np.testing.assert_array_equal(first[0].numpy(), expected)


def test_hard_batches_beat_shuffling_and_shuffling_beats_a_fixed_partition_after_100_steps(synthetic, tmp_path):
    """The paper's Fig. 2 ordering at N=8, B=2; it holds for every seed here from step ~50 on.

    full and ncb catch up with fixed only after ~300 steps at d=16 (see docs/RESULTS.md), so they are
    checked at d=4 only, where they are below fixed from the start.
    """
    common = dict(steps=100, report_steps=[100])
    rows = synthetic.run(synthetic.Settings(**common, dims=[16, 4], strategies=["fixed", "random", "osgd", "sc"]),
                         tmp_path)
    rows += synthetic.run(synthetic.Settings(**common, dims=[4], strategies=["full"]), tmp_path)
    loss = {(r["setting"], r["strategy"]): r["step100"] for r in rows}
    for setting in ("N8_B2_d16", "N8_B2_d4"):
        assert max(loss[setting, "osgd"], loss[setting, "sc"]) < loss[setting, "random"] < loss[setting, "fixed"]
    assert loss["N8_B2_d4", "full"] < loss["N8_B2_d4", "fixed"]
