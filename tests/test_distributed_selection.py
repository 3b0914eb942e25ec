"""The embedding bank and the plan built from it, across 2 real torchrun processes."""

import json

import numpy as np
import pytest
import torch
from bank_plan import CELL, B, N, embeddings
from conftest import ROOT, torchrun, train_cmd

from dist_cl.config import SelectionConfig
from dist_cl.plan.bank import EmbeddingBank
from dist_cl.plan.planner import bank_use
from dist_cl.runtime.checkpoint_files import load_checkpoint
from dist_cl.selection import select_batches


def test_plan_from_gathered_bank_is_identical_on_all_ranks_and_to_one_process(collectives):
    ranks = [torch.load(collectives / "bank_plan" / f"rank{r}.pt", weights_only=False) for r in range(2)]
    u, v = embeddings()
    for state in ranks:
        np.testing.assert_array_equal(state["bank"]["u"].numpy(), u)
        np.testing.assert_array_equal(state["bank"]["v"].numpy(), v)
        assert (state["bank"]["written_at"] >= 0).all()
    np.testing.assert_array_equal(ranks[0]["plan"], ranks[1]["plan"])
    expected = select_batches("sc_global", u, v, B, seed=3, tau=0.2, cell_size=CELL)
    np.testing.assert_array_equal(ranks[0]["plan"], expected)
    rebuilt = [np.concatenate([ranks[0]["slices"][b], ranks[1]["slices"][b]]) for b in range(N // B)]
    np.testing.assert_array_equal(np.stack(rebuilt), ranks[0]["plan"])
    # the false-negative window's search and swaps run once and are shared: the same plan as one process's
    np.testing.assert_array_equal(ranks[0]["window_plan"], ranks[1]["window_plan"])
    np.testing.assert_array_equal(ranks[0]["window_plan"], select_batches("sc_global", u, v, B, seed=3, tau=0.2,
                                                                          cell_size=CELL, false_negative_window=3))


def test_bank_keeps_the_newest_write_and_reports_staleness():
    bank = EmbeddingBank(4, 2)
    bank.update(torch.tensor([0, 1]), torch.ones(2, 2), torch.ones(2, 2), step=3)
    bank.update(torch.tensor([1, 2]), torch.full((2, 2), 2.0), torch.full((2, 2), 2.0), step=5)
    with pytest.raises(RuntimeError, match="sync"):
        bank.state_dict()
    bank.sync()
    assert bank.u[:, 0].tolist() == [1.0, 2.0, 2.0, 0.0]
    assert bank.missing().tolist() == [3]
    assert bank.staleness(7) == pytest.approx(((7 - 3) + (7 - 5) * 2) / 3)


@pytest.mark.parametrize("strategy, teacher, embeddings, reads, written", [
    ("random", "", "training", False, False), ("full", "", "training", False, False),
    ("sc", "", "training", True, True), ("sc", "", "refresh", True, False),
    ("sc_global", "teacher", "training", False, False)])
def test_only_plans_that_read_the_bank_keep_one_and_only_training_mode_writes_it(strategy, teacher, embeddings, reads,
                                                                                  written):
    assert bank_use(SelectionConfig(strategy=strategy, teacher=teacher, embeddings=embeddings)) == (reads, written)


def test_a_bank_of_no_rows_resumes_from_a_checkpoint_that_kept_one():
    """A random run resumed from a checkpoint written when every run kept an N-row bank."""
    full = EmbeddingBank(4, 2)
    full.update(torch.tensor([0, 1]), torch.ones(2, 2), torch.ones(2, 2), step=3)
    full.sync()
    empty = EmbeddingBank(0, 2)
    empty.load_state_dict(full.state_dict())
    empty.sync()
    assert [t.shape[0] for t in empty.state_dict().values()] == [0, 0, 0]


def test_sc_global_training_writes_every_selection_scalar_with_lift_above_one(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torchrun(train_cmd(tmp_path, "train.epochs=3", "eval.every_epochs=3", "selection.strategy=sc_global"))
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    wanted = {"selection/seconds", "selection/share", "selection/lift", "selection/bank_staleness",
              "selection/realised_lift", "selection/pair_repeat", "selection/label_purity",
              "train/full_batch_loss", "train/retrieval_top1"}
    assert wanted <= tags
    lifts = [e.value for e in events.Scalars("selection/lift")]
    assert lifts[0] == 1.0 and len(lifts) == 3 and min(lifts[1:]) > 1.0  # epoch 0 is random: it warms the bank up
    # the batches trained on are harder than random ones under the same model at the same steps
    realised = [e.value for e in events.Scalars("selection/realised_lift")]
    assert len(realised) == 3 and min(realised[1:]) > 1.0
    # pair repeat from epoch 1 on (epoch 0 has no previous plan); purity of every plan, random's ~ 1/10
    assert len(events.Scalars("selection/pair_repeat")) == 2
    purity = [e.value for e in events.Scalars("selection/label_purity")]
    assert len(purity) == 3 and 0.05 < purity[0] < 0.15 and max(purity[1:]) > purity[0]
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["selection/lift"] == pytest.approx(lifts[-1], rel=1e-6)


def test_overlap_computes_each_plan_from_the_bank_one_epoch_before_it(tmp_path):
    """selection.overlap: the plan for epoch e+1 is computed while epoch e trains, from the bank as epoch e
    started (= the bank saved at the end of epoch e-1); its cells are dealt over both ranks on the planner's
    own process group while DDP runs on the default one."""
    from dist_cl.plan.planner import plan_seed

    n, batch, tau = 64, 8, 0.5
    torchrun(train_cmd(tmp_path, "--config", str(ROOT / "configs" / "synthetic.yaml"), f"data.num_samples={n}",
                       f"train.global_batch_size={batch}", f"loss.tau={tau}", "train.epochs=3", "eval.every_epochs=0",
                       "checkpoint.keep=10", "selection.strategy=sc_global", "selection.overlap=true",
                       "selection.options={cell_size: 32}"))
    ends = [load_checkpoint(tmp_path / "checkpoints" / f"step-{8 * (e + 1):08d}.pt")[0] for e in range(3)]
    assert ends[0]["planner"]["plan"]["strategy"] == "random"  # snapshot of epoch 0, inside the warm-up
    ahead = ends[1]["planner"]["plan"]
    assert (ahead["epoch"], ahead["strategy"]) == (2, "sc_global")
    bank = ends[0]["bank"]
    assert (bank["written_at"] >= 0).all()  # N divisible by B: epoch 0 wrote every row, none is refreshed
    expected = select_batches("sc_global", bank["u"].numpy(), bank["v"].numpy(), batch,
                              seed=plan_seed(0, 2, "sc_global"), tau=tau, cell_size=32)
    np.testing.assert_array_equal(ahead["batches"], expected)
    assert ends[2]["planner"] is None  # no epoch 3 to plan for


def test_every_steps_repartitions_the_rest_of_the_epoch_from_the_bank_at_that_step(reference_runs):
    """selection.every_steps=8 on digits (22 steps an epoch; epoch 1 is sc_global): at cursor 8 (step 30)
    the 14 batches not trained yet are re-partitioned from the bank then; the first 8 stay as trained.
    The run is the SogCLR one the SIGKILL test restores to: an sc_global plan does not read the loss."""
    from dist_cl.plan.planner import plan_seed

    run_dir = reference_runs("loss.name=sogclr", "selection.strategy=sc_global", "selection.every_steps=8")
    before, after = (load_checkpoint(run_dir / "checkpoints" / f"step-{s:08d}.pt")[0] for s in (25, 30))
    assert (before["sampler"]["cursor"], after["sampler"]["cursor"]) == (3, 8)
    old, new = before["sampler"]["plan"]["batches"], after["sampler"]["plan"]["batches"]
    np.testing.assert_array_equal(new[:8], old[:8])
    rest = np.sort(old[8:].ravel())
    np.testing.assert_array_equal(np.sort(new[8:].ravel()), rest)  # same samples, each once
    assert not np.array_equal(new[8:], old[8:])
    bank = after["bank"]
    expected = rest[select_batches("sc_global", bank["u"].numpy()[rest], bank["v"].numpy()[rest], 64,
                                   seed=plan_seed(0, 1, "sc_global", cursor=8), tau=0.1)]
    np.testing.assert_array_equal(new[8:], expected)


def test_warmup_epochs_are_random_under_refresh_too(tmp_path):
    """selection.warmup_epochs holds in refresh mode: two random epochs, then the first loss-aware plan."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torchrun(train_cmd(tmp_path, "train.epochs=3", "eval.every_epochs=0", "selection.strategy=sc_global",
                       "selection.embeddings=refresh", "selection.warmup_epochs=2"), nproc=1)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("selection/bank_staleness")] == [66]  # written by loss-aware plans only
    assert [e.value for e in events.Scalars("selection/lift")][:2] == [1.0, 1.0]  # random's, by definition
    bank = load_checkpoint(tmp_path / "checkpoints" / "step-00000066.pt")[0]["bank"]
    assert (bank["written_at"] == 44).all()  # the refresh before epoch 2's plan; the steps since write none
    epochs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["strategy"] for r in epochs if r["kind"] == "epoch"] == ["random", "random", "sc_global"]
