"""What a step does to the gradients after the backward pass: the clip, and the free embeddings' sparse rows."""

import pytest
import torch
from accumulation_steps import BATCHES, train_step, views

from dist_cl.runtime.distributed import close_distributed, init_distributed


@pytest.fixture(scope="module", autouse=True)
def one_process(one_torch_thread):
    init_distributed(backend="gloo")
    yield
    close_distributed()


@pytest.mark.parametrize("grad_clip", [None, 0.05])
@pytest.mark.parametrize("case", ["infonce", "infonce_free"])
def test_a_step_clips_and_updates_exactly_as_torchs_clip_grad_norm(case, grad_clip):
    model, step_fn = train_step(case, 1)
    step_fn.train.grad_clip = grad_clip
    reference, reference_fn = train_step(case, 1)
    index = torch.tensor(BATCHES[0])
    inputs = views(0, index, free=case.endswith("_free"))
    result = step_fn(*inputs, index, lambda: "a test step")

    u, v, tau = reference(*inputs)
    reference_fn.loss_fn(u, v, tau, index).backward()
    norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), grad_clip or float("inf"))
    reference_fn.optimizer.step()

    assert grad_clip is None or norm > grad_clip  # the clip acts
    assert result.loss is not None
    for (name, got), want in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(got, want), name


@pytest.mark.parametrize("accum_steps", [1, 2])
def test_the_free_embeddings_gradient_is_marked_coalesced_only_where_it_is(accum_steps):
    model, step_fn = train_step("infonce_free", accum_steps)
    index = torch.tensor(BATCHES[0])
    step_fn.optimizer.step = lambda: None  # keep the gradients to look at
    step_fn(*views(0, index, free=True), index, lambda: "a test step")
    for table in (model.u, model.v):
        grad = table.grad
        rebuilt = torch.sparse_coo_tensor(grad._indices(), grad._values(), grad.shape, check_invariants=True)
        assert not rebuilt.is_coalesced()
        coalesced = rebuilt.coalesce()
        if grad.is_coalesced():
            assert torch.equal(grad._indices(), coalesced._indices())
            assert torch.equal(grad._values(), coalesced._values())
        assert grad.is_coalesced() or accum_steps > 1  # a step of one backward pass needs no sort
        assert torch.equal(coalesced._indices()[0], index.sort().values)
