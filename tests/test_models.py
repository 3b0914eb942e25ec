import copy

import pytest
import torch
from conftest import ROOT

from dist_cl.config import load_config
from dist_cl.learn.losses import InfoNCELoss
from dist_cl.learn.models import build_model, sync_batchnorm
from dist_cl.learn.optim import lr_factor


def digits_batch(n=6):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=g), torch.rand(n, 1, 8, 8, generator=g)


def test_shared_tower_embeds_both_views_with_one_backbone():
    model = build_model(load_config(None, []), num_samples=10)
    u, v, tau = model(*digits_batch())
    assert u.shape == v.shape == (6, 64)
    torch.testing.assert_close(u.norm(dim=1), torch.ones(6))
    assert model.tower_a is model.tower_b and float(tau) == pytest.approx(0.1)


def test_sync_batchnorm_keeps_the_activation_of_timms_fused_batchnorm():
    """mobilenetv3 normalises with timm's BatchNormAct2d; in eval mode (running statistics, no collective)
    the synchronised model must compute what the original does. torch's own conversion fails this. (Its
    pre-logits output is 1024 wide, its num_features 288: the projection head must take the former.)"""
    cfg = load_config(None, ["model.backbone=mobilenetv3_small_050"])
    model = build_model(cfg, num_samples=10).eval()
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    synced = sync_batchnorm(copy.deepcopy(model)).eval()
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    with torch.no_grad():
        torch.testing.assert_close(synced(x, x)[0], model(x, x)[0], rtol=0, atol=0)


def test_two_towers_have_separate_weights_and_both_learn():
    model = build_model(load_config(None, ["model.two_towers=true"]), num_samples=10)
    assert model.tower_a is not model.tower_b
    u, v, tau = model(*digits_batch())
    InfoNCELoss()(u, v, tau).backward()
    for tower in (model.tower_a, model.tower_b):
        assert tower.head[0].weight.grad.abs().sum() > 0


def test_learnable_temperature_receives_a_gradient_and_fixed_does_not_train():
    learned = build_model(load_config(None, ["loss.learnable_tau=true", "loss.tau=0.07"]), num_samples=10)
    u, v, tau = learned(*digits_batch())
    InfoNCELoss()(u, v, tau).backward()
    assert learned.temperature.log_tau.grad is not None and learned.temperature.log_tau.grad != 0
    fixed = build_model(load_config(None, []), num_samples=10)
    assert "temperature.log_tau" not in dict(fixed.named_parameters())


def test_free_embeddings_look_up_normalised_rows_by_index():
    model = build_model(load_config(ROOT / "configs" / "synthetic.yaml", ["model.embed_dim=4"]), 8)
    idx = torch.tensor([3, 0, 3])
    u, v, _ = model(idx, idx)
    torch.testing.assert_close(u[0], u[2])
    torch.testing.assert_close(u[0], model.u[3] / model.u[3].norm())


def test_schedule_warms_up_linearly_then_decays_to_zero():
    assert lr_factor(0.5, 2.0, 10.0) == pytest.approx(0.25)
    assert lr_factor(2.0, 2.0, 10.0) == pytest.approx(1.0)
    assert lr_factor(6.0, 2.0, 10.0) == pytest.approx(0.5)
    assert lr_factor(10.0, 2.0, 10.0) == pytest.approx(0.0)
    assert lr_factor(1.0, 0.0, 4.0) == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(torch.pi / 4)).item()))


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants because weights_only=True")
def test_free_embeddings_average_sparse_row_gradients_over_ranks_like_one_process(collectives):
    """2 ranks, no DDP: each rank ends with the full-batch gradient, as sparse rows of the batch only."""
    from free_grads import BATCH, make_model

    reference = make_model()
    u, v, tau = reference(BATCH, BATCH)
    InfoNCELoss()(u, v, tau).backward()
    outside = torch.ones(len(reference.u), dtype=torch.bool)
    outside[BATCH] = False
    for rank in range(2):
        grads = torch.load(collectives / "free_grads" / f"rank{rank}.pt")
        for side in ("u", "v"):
            assert grads[side].layout == torch.sparse_coo
            dense = grads[side].to_dense()
            torch.testing.assert_close(dense, getattr(reference, side).grad.to_dense(), rtol=1e-10, atol=1e-12)
            assert (dense[outside] == 0).all() and (dense[BATCH].abs().sum(1) > 0).all()
        torch.testing.assert_close(grads["log_tau"], reference.temperature.log_tau.grad, rtol=1e-10, atol=1e-12)
