"""Contrastive gradient accumulation (train.accum_steps): a step in micro-batches is the unaccumulated step."""

import pytest
import torch
from accumulation_steps import ACCUM_STEPS, BATCHES, CASES, steps, train_step, views
from conftest import ROOT
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

import dist_cl.learn.step
from dist_cl.config import ConfigError, load_config

TOLERANCE = {"atol": 1e-10, "rtol": 0.0}


@pytest.fixture(scope="module")
def one_process(one_torch_thread):
    from dist_cl.runtime.distributed import close_distributed, init_distributed

    init_distributed(backend="gloo")
    yield {(case, k): steps(case, k) for case in CASES for k in ACCUM_STEPS}
    close_distributed()


@pytest.fixture(scope="module")
def two_ranks(collectives):
    out = collectives / "accumulation_steps"
    return {(case, k): torch.load(out / f"{case}-k{k}-rank0.pt", weights_only=False)
            for case in CASES for k in ACCUM_STEPS}


def assert_same_steps(accumulated: list[dict], reference: list[dict]) -> None:
    """Loss, every gradient, the bank's features and the u table of every step within 1e-10; the score."""
    for step, (got, want) in enumerate(zip(accumulated, reference, strict=True)):
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-10), step
        assert got["score"] == pytest.approx(want["score"], rel=1e-6), step  # read as float32 where it is the loss
        assert got["grads"].keys() == want["grads"].keys()
        for name in want["grads"]:
            torch.testing.assert_close(got["grads"][name], want["grads"][name], **TOLERANCE, msg=f"{step} {name}")
        for key in ("u", "v") + (("u_table",) if want["u_table"] is not None else ()):
            torch.testing.assert_close(got[key], want[key], **TOLERANCE, msg=f"{step} {key}")


@pytest.mark.parametrize("k", ACCUM_STEPS[1:])
@pytest.mark.parametrize("case", CASES)
def test_accumulated_step_equals_the_unaccumulated_step_in_one_process(one_process, case, k):
    assert_same_steps(one_process[case, k], one_process[case, 1])


@pytest.mark.parametrize("k", ACCUM_STEPS)
@pytest.mark.parametrize("case", CASES)
def test_accumulated_step_on_two_ranks_equals_the_unaccumulated_single_process_step(two_ranks, one_process, case, k):
    assert_same_steps(two_ranks[case, k], one_process[case, 1])


def test_ddp_all_reduces_the_gradients_once_per_step_whatever_the_micro_batches(one_process, monkeypatch):
    reduced = []

    class CountingDDP(DistributedDataParallel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.register_comm_hook(None, self.count)

        @staticmethod
        def count(state, bucket):
            reduced.append(bucket.index())
            return default_hooks.allreduce_hook(None, bucket)

    monkeypatch.setattr(dist_cl.learn.step, "DistributedDataParallel", CountingDDP)
    steps("infonce", 1)
    unaccumulated, reduced[:] = list(reduced), []
    steps("infonce", 4)
    assert reduced == unaccumulated == [0] * len(BATCHES)  # the tiny model's gradients fill one bucket


def test_a_non_finite_micro_batch_skips_the_whole_step_leaving_weights_and_u_table_as_they_were(one_process):
    model, step_fn = train_step("sogclr", 2, nonfinite="skip")
    index = torch.tensor(BATCHES[0])
    view_a, view_b = views(0, index, free=False)
    view_a[-1] = float("nan")  # one broken sample, in the second micro-batch
    weights = {name: t.clone() for name, t in model.state_dict().items()}
    result = step_fn(view_a, view_b, index, lambda: "a test step")
    assert result.skipped and result.loss is None
    for name, t in model.state_dict().items():
        assert torch.equal(t, weights[name]), name
    assert not step_fn.loss_fn.u_table.any()


def test_under_bf16_autocast_an_accumulated_step_has_the_same_loss_and_its_gradients_within_bf16_rounding(
        one_process):
    index = torch.tensor(BATCHES[0])
    view_a, view_b = (x.float() for x in views(0, index, free=False))
    results = {}
    for k in ACCUM_STEPS:
        model, step_fn = train_step("infonce", k, dtype=torch.float32)
        step_fn.amp_dtype = torch.bfloat16  # TrainStep keeps AMP to CUDA; the CPU's autocast has bf16 too
        result = step_fn(view_a, view_b, index, lambda: "a test step")
        results[k] = result, {name: p.grad for name, p in model.named_parameters()}
    (reference, grads), *accumulated = results.values()
    assert reference.u.dtype == torch.bfloat16
    for result, accumulated_grads in accumulated:
        assert result.loss == reference.loss
        assert torch.equal(result.u, reference.u) and torch.equal(result.v, reference.v)
        for name, grad in grads.items():  # bf16 sums of fewer rows a micro-batch round differently
            torch.testing.assert_close(accumulated_grads[name], grad, rtol=0, atol=2e-2 * grad.abs().max().item())


def test_accum_steps_that_do_not_divide_the_per_rank_batch_are_refused_by_name():
    config = ROOT / "configs" / "synthetic.yaml"
    load_config(config, ["train.global_batch_size=64", "train.accum_steps=4"], world_size=2)
    with pytest.raises(ConfigError, match=r"train.accum_steps=3 does not divide the per-rank batch .* = 32"):
        load_config(config, ["train.global_batch_size=64", "train.accum_steps=3"], world_size=2)
    with pytest.raises(ConfigError, match="train.accum_steps=0 must be positive"):
        load_config(config, ["train.accum_steps=0"])
