"""The plan policy (dist_cl.plan.planner.EpochPlanner) in one process: warm-up, the seed rule, re-selection."""

import json

import numpy as np
import pytest
import torch

from dist_cl.config import Config, ConfigError, SelectionConfig, TrainConfig, load_config
from dist_cl.plan.bank import EmbeddingBank
from dist_cl.plan.figures import SelectionFigures
from dist_cl.plan.planner import EpochPlanner, plan_seed
from dist_cl.plan.realised_lift import RealisedLift
from dist_cl.plan.sampler import BatchPlan, PlanSampler
from dist_cl.runtime.distributed import DistInfo
from dist_cl.runtime.seeding import Stream, derive_seed
from dist_cl.selection import select_batches

N, B, SEED = 96, 8, 5
CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


class Pairs:
    """What the planner reads of a data set: its size, labels and augmentation epoch."""

    labels = np.arange(N) % 4

    def __len__(self):
        return N

    def set_epoch(self, epoch):
        self.epoch = epoch

    def digest(self):
        return "pairs-of-this-test"


class FixedTemperature(torch.nn.Module):
    def temperature(self):
        return torch.tensor(0.2)


def planner(strategy="sc_global", **selection) -> EpochPlanner:
    """A planner over a bank every row of which training has written (unit rows, seeded)."""
    bank = EmbeddingBank(N, 16)
    rows = torch.nn.functional.normalize(torch.randn(2, N, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    bank.fill(torch.arange(N), rows[0], rows[1], step=0)
    config = Config(seed=SEED, train=TrainConfig(global_batch_size=B, epochs=3),
                    selection=SelectionConfig(strategy=strategy, **selection))
    return EpochPlanner(config, Pairs(), FixedTemperature(), bank, CPU)


def test_warmup_epochs_plan_random_batches_then_the_strategy():
    policy = planner(warmup_epochs=2, options={"cell_size": 32})
    for epoch in (0, 1):
        plan, figures = policy.plan(epoch, step=epoch * 12)
        assert plan.strategy == "random" and figures.lift == 1.0
        np.testing.assert_array_equal(plan.batches, select_batches("random", None, None, B, num_samples=N,
                                                                   seed=derive_seed(SEED, Stream.PLAN, epoch)))
    plan, figures = policy.plan(2, step=24)
    expected = select_batches("sc_global", policy.bank.u.numpy(), policy.bank.v.numpy(), B,
                              seed=derive_seed(SEED, Stream.PLAN, 2), tau=0.2, cell_size=32)
    assert plan.strategy == "sc_global" and figures.lift > 1
    np.testing.assert_array_equal(plan.batches, expected)


def test_a_teacher_replaces_the_bank_from_the_first_loss_aware_plan(tmp_path):
    teacher = torch.nn.functional.normalize(torch.randn(2, N, 16, generator=torch.Generator().manual_seed(9)), dim=-1)
    np.save(tmp_path / "u.npy", teacher[0].numpy())
    np.save(tmp_path / "v.npy", teacher[1].numpy())
    (tmp_path / "meta.json").write_text(json.dumps({"dataset_digest": Pairs().digest(), "split": "train"}))
    policy = planner(warmup_epochs=0, teacher=str(tmp_path), options={"cell_size": 32, "false_negative_window": 2})
    bank_before = policy.bank.u.clone()
    plan, figures = policy.plan(0, step=0)
    expected = select_batches("sc_global", teacher[0].numpy(), teacher[1].numpy(), B,
                              seed=derive_seed(SEED, Stream.PLAN, 0), tau=0.2, cell_size=32, false_negative_window=2)
    np.testing.assert_array_equal(plan.batches, expected)
    assert figures.lift > 1 and figures.bank_staleness is None
    assert torch.equal(policy.bank.u, bank_before)


def test_a_teacher_is_refused_by_strategies_that_read_no_embeddings():
    with pytest.raises(ConfigError, match="selection.strategy=random reads none: use a loss-aware strategy"):
        load_config(None, ["selection.strategy=random", "selection.teacher=runs/teacher"])


def test_the_seed_rule_is_per_epoch_per_cursor_or_per_run():
    assert plan_seed(SEED, 3, "sc_global") == derive_seed(SEED, Stream.PLAN, 3) != plan_seed(SEED, 4, "sc_global")
    assert plan_seed(SEED, 3, "sc_global", cursor=7) == derive_seed(SEED, Stream.RESELECT, 3, 7)
    assert plan_seed(SEED, 3, "fixed") == plan_seed(SEED, 9, "fixed") == SEED


@pytest.mark.parametrize("strategy,options", [("sc_global", {"cell_size": 32}), ("sc", {})])
def test_reselection_keeps_the_trained_batches_and_repartitions_the_rest(strategy, options):
    policy = planner(strategy, warmup_epochs=0, every_steps=4, options=options)
    plan, figures = policy.plan(0, step=0)
    assert policy.reselection_due(plan, 4) and not policy.reselection_due(plan, 3)
    before = figures.seconds
    new = policy.reselect(plan, 4, step=4, figures=figures)
    assert new is not plan and new.epoch == plan.epoch and new.strategy == strategy
    np.testing.assert_array_equal(new.batches[:4], plan.batches[:4])
    rest = np.sort(plan.batches[4:].ravel())
    np.testing.assert_array_equal(np.sort(new.batches[4:].ravel()), rest)  # the same samples, each once
    chosen = select_batches(strategy, policy.bank.u.numpy()[rest], policy.bank.v.numpy()[rest], B,
                            seed=derive_seed(SEED, Stream.RESELECT, 0, 4), tau=0.2, **options)
    np.testing.assert_array_equal(new.batches[4:], rest[chosen])
    assert figures.seconds > before  # the re-selection's time is the epoch's selection time too


def test_the_plan_computed_ahead_round_trips_through_the_checkpoint_state():
    policy = planner(warmup_epochs=0, overlap=True, options={"cell_size": 32})
    try:
        plan, _ = policy.plan(0, step=0)  # under overlap, starts computing epoch 1's plan
        state = policy.state_dict()
        restored = planner(warmup_epochs=0, overlap=True, options={"cell_size": 32})
        restored.load_state_dict(state)
        ahead, figures = restored.plan(1, step=len(plan))
        np.testing.assert_array_equal(ahead.batches, state["plan"]["batches"])
        assert figures.lift == state["figures"]["selection/lift"]
        restored.close()
    finally:
        policy.close()


def test_osgd_is_selected_again_after_each_selection_until_an_epoch_of_steps():
    """The official stepping: each kb-OSGD selection keeps q of every k batches (here 3 batches of N // B = 12),
    training takes them, and the next ones are selected from the bank as it is then, until 12 steps."""
    policy = planner("osgd", warmup_epochs=0, options={"k": 4, "q": 1})
    u, v = policy.bank.u.numpy().copy(), policy.bank.v.numpy().copy()
    plan, _ = policy.plan(0, step=0)
    assert plan.batches.shape == (N // B, B)
    first = select_batches("osgd", u, v, B, seed=derive_seed(SEED, Stream.PLAN, 0), tau=0.2, k=4, q=1)
    np.testing.assert_array_equal(plan.batches[:3], first)
    assert [cursor for cursor in range(1, 12) if policy.reselection_due(plan, cursor)] == [3, 6, 9]
    policy.bank.fill(torch.arange(N), torch.from_numpy(v), torch.from_numpy(u), step=3)  # training moved the bank
    new = policy.reselect(plan, 3, step=3, figures=SelectionFigures())
    assert new.batches.shape == plan.batches.shape
    np.testing.assert_array_equal(new.batches[:3], plan.batches[:3])
    again = select_batches("osgd", v, u, B, seed=plan_seed(SEED, 0, "osgd", cursor=3), tau=0.2, k=4, q=1)
    np.testing.assert_array_equal(new.batches[3:6], again)


class Views(Pairs):
    """Pairs whose views are their indices, for a scoring loss that only counts its calls."""

    def batch(self, indices):
        index = torch.tensor(indices)
        return index, index, index


@pytest.mark.parametrize("log_every, steps_per_epoch, scored", [
    (10, 22, 2), (10, 312, 31), (4, 390, 30), (10, 1875, 31), (10, 27405, 31)],
    ids=["digits", "fashion-mnist", "issue-30-throughput", "fashion-mnist-60k", "ncb-30-choose-4"])
def test_the_realised_lift_scores_at_the_logging_cadence_but_at_most_32_steps_of_a_long_plan(
        log_every, steps_per_epoch, scored):
    """Each scored step costs a reference batch's forward pass: an epoch pays for at most 32, however many
    steps its plan has."""
    calls = []
    plan = BatchPlan(np.zeros((steps_per_epoch, B), dtype=np.int64), epoch=0, strategy="random")
    lift = RealisedLift(Views(), PlanSampler(plan, 0, 1), lambda a, b: calls.append(len(a)) or 1.0, SEED, B,
                        log_every)
    referenced = [step for step in range(steps_per_epoch) if lift.reference_loss(0, step) is not None]
    assert len(referenced) == len(calls) == scored
    assert calls == [B] * scored
