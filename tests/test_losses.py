import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ddp_loss_grads import LOSSES, make_problem

from dist_cl.learn.losses import InfoNCELoss, NTXentLoss, batch_infonce, batch_ntxent


def reference_infonce(u: np.ndarray, v: np.ndarray, tau: float) -> float:
    """The paper's symmetric InfoNCE, written out term by term in float64."""
    s = u @ v.T / tau
    n = len(u)
    total = 0.0
    for i in range(n):
        total -= np.log(np.exp(s[i, i]) / np.exp(s[i]).sum())
        total -= np.log(np.exp(s[i, i]) / np.exp(s[:, i]).sum())
    return total / n


def reference_ntxent(u: np.ndarray, v: np.ndarray, tau: float) -> float:
    z = np.concatenate([u, v])
    n = len(u)
    s = z @ z.T / tau
    total = 0.0
    for i in range(2 * n):
        partner = (i + n) % (2 * n)
        others = [j for j in range(2 * n) if j != i]
        total -= np.log(np.exp(s[i, partner]) / np.exp(s[i, others]).sum())
    return total / (2 * n)


def unit_rows(shape, seed):
    x = np.random.default_rng(seed).normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("batch_loss,reference", [(batch_infonce, reference_infonce), (batch_ntxent, reference_ntxent)])
def test_batch_loss_matches_float64_reference_for_every_batch(batch_loss, reference):
    u, v = unit_rows((3, 6, 4), 0), unit_rows((3, 6, 4), 1)
    got = batch_loss(torch.from_numpy(u), torch.from_numpy(v), 0.2).numpy()
    np.testing.assert_allclose(got, [reference(u[b], v[b], 0.2) for b in range(3)], rtol=1e-12)


@pytest.mark.parametrize("loss_cls,reference", [(InfoNCELoss, reference_infonce), (NTXentLoss, reference_ntxent)])
def test_single_process_loss_matches_float64_reference(loss_cls, reference):
    u, v = unit_rows((10, 5), 2), unit_rows((10, 5), 3)
    got = loss_cls()(torch.from_numpy(u), torch.from_numpy(v), 0.3).item()
    assert got == pytest.approx(reference(u, v, 0.3), rel=1e-12)


@pytest.mark.parametrize("loss_cls,batch_loss", [(InfoNCELoss, batch_infonce), (NTXentLoss, batch_ntxent)])
def test_loss_module_equals_its_batch_loss_on_one_batch(loss_cls, batch_loss):
    u, v = torch.from_numpy(unit_rows((7, 3), 4)), torch.from_numpy(unit_rows((7, 3), 5))
    assert loss_cls()(u, v, 0.1).item() == pytest.approx(batch_loss(u, v, 0.1).item(), rel=1e-12)


GATHERED = {"infonce": InfoNCELoss, "ntxent": NTXentLoss}


@pytest.mark.parametrize("loss_name", LOSSES)
def test_gathered_loss_gradients_match_single_process(collectives, loss_name):
    """Each loss's DDP gradients on 2 torchrun ranks (``ddp_loss_grads``) against one process."""
    distributed = torch.load(collectives / "ddp_loss_grads" / f"{loss_name}.pt")
    x_a, x_b, model = make_problem()
    loss = GATHERED[loss_name]()(F.normalize(model(x_a), dim=-1), F.normalize(model(x_b), dim=-1), 0.5)
    loss.backward()
    assert distributed["loss"] == pytest.approx(loss.item(), rel=1e-12)
    torch.testing.assert_close(distributed["weight"], model.weight.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(distributed["bias"], model.bias.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss_cls", [InfoNCELoss, NTXentLoss])
def test_loss_under_bf16_autocast_is_the_float32_loss(loss_cls):
    """autocast(bf16) runs matmuls in bf16 even on float32 inputs (on the CPU as on CUDA); the loss must
    not. With autocast left on inside the loss, this is off by ~1e-2."""
    u, v = (torch.from_numpy(unit_rows((64, 32), seed)).float() for seed in (6, 7))
    tau = torch.tensor(0.1)
    want = loss_cls()(u, v, tau).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (u @ v.T).dtype == torch.bfloat16  # the premise: autocast casts this matmul down
        got = loss_cls()(u, v, tau)
    assert got.dtype == torch.float32
    assert abs(got.item() - want) < 1e-5
