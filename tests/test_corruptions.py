"""Corruptions are seeded functions of the image that keep its shape and range and grow with severity; the
corrupted-view retrieval equals a loop over each image's corrupted versions."""

import colorsys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from test_shards import shards_from_npz

from dist_cl.config import AugmentConfig, ConfigError, load_config
from dist_cl.data.digits import DigitsPairs, digits_split
from dist_cl.data.pairs import sample_rng
from dist_cl.data.shards import ShardPairs
from dist_cl.evaluate.corrupted_retrieval import EVAL_SEVERITIES, CorruptedViews, corrupted_retrieval, group_recall
from dist_cl.evaluate.corruptions import CORRUPTIONS, SEVERITIES, brightness, contrast, corrupt, gaussian_blur
from dist_cl.evaluate.metrics import EVAL_EPOCH, evaluate


def image(channels: int, side: int = 28) -> torch.Tensor:
    """Smooth shapes with edges and a mid-grey background: what the corruptions act on in real images."""
    g = torch.Generator().manual_seed(channels * side)
    coarse = torch.rand(1, channels, 4, 4, generator=g)
    smooth = F.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)[0]
    return (0.2 + 0.6 * smooth).clamp(0, 1)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", CORRUPTIONS)
@pytest.mark.parametrize("channels,side", [(1, 28), (3, 28), (1, 8)])
def test_corruption_is_deterministic_and_keeps_shape_and_range(name, channels, side):
    x = image(channels, side)
    for severity in range(1, 6):
        y = corrupt(x, name, severity, seeded(0))
        assert torch.equal(y, corrupt(x, name, severity, seeded(0)))
        assert y.shape == x.shape and y.dtype == x.dtype
        assert y.min() >= 0 and y.max() <= 1


@pytest.mark.parametrize("name", CORRUPTIONS)
@pytest.mark.parametrize("channels", [1, 3])
def test_severity_5_changes_the_image_more_than_severity_1(name, channels):
    x = image(channels)
    mse = [F.mse_loss(corrupt(x, name, severity, seeded(0)), x).item() for severity in (1, 5)]
    assert 0 < mse[0] < mse[1]


def test_noise_is_drawn_from_the_generator_with_the_tables_deviation():
    x = torch.full((1, 64, 64), 0.5)
    first, second = (corrupt(x, "gaussian_noise", 5, seeded(seed)) - x for seed in (0, 1))
    assert not torch.equal(first, second)
    assert abs(first.std().item() - SEVERITIES["gaussian_noise"][4]) < 0.005 and abs(first.mean().item()) < 0.005


@pytest.mark.parametrize("sigma", SEVERITIES["gaussian_blur"])
def test_blur_equals_scipy_gaussian_filter_with_nearest_edges(sigma):
    x = torch.rand(3, 9, 8, dtype=torch.float64, generator=seeded(2))
    expected = gaussian_filter(x.numpy(), sigma=(0, sigma, sigma), mode="nearest", truncate=4.0)
    np.testing.assert_allclose(gaussian_blur(x, sigma).numpy(), expected, rtol=0, atol=1e-12)


def test_brightness_adds_to_the_hsv_value_and_keeps_hue_and_saturation():
    x = torch.rand(3, 4, 5, dtype=torch.float64, generator=seeded(3))
    x[:, 0, 0] = 0  # black: no hue, turns grey
    y = brightness(x, 0.3)
    for r in range(4):
        for c in range(5):
            h, s, v = colorsys.rgb_to_hsv(*x[:, r, c].tolist())
            np.testing.assert_allclose(y[:, r, c].numpy(), colorsys.hsv_to_rgb(h, s, min(v + 0.3, 1.0)), atol=1e-12)
    gray = torch.rand(1, 4, 5, dtype=torch.float64, generator=seeded(4))
    assert torch.allclose(brightness(gray, 0.3), (gray + 0.3).clamp(max=1))


def test_contrast_scales_each_channels_deviation_from_its_mean():
    x = torch.rand(3, 4, 5, dtype=torch.float64, generator=seeded(5))
    mean = x.mean(dim=(1, 2), keepdim=True)
    assert torch.allclose(contrast(x, 0.15), (x - mean) * 0.15 + mean)


@pytest.mark.parametrize("name,severity", [("fog", 1), ("contrast", 0), ("contrast", 6)])
def test_unknown_corruption_or_severity_is_an_error(name, severity):
    with pytest.raises(ValueError, match="corruption 'fog' is unknown|severity"):
        corrupt(image(1), name, severity, seeded(0))


def test_group_recall_equals_a_loop_over_groups():
    a = torch.randn(7, 6, 5, generator=seeded(6))
    b = a + 1.5 * torch.randn(7, 6, 5, generator=seeded(7))
    hits = np.zeros(6)
    for i in range(7):
        for j in range(6):
            hits[j] += int(torch.argmax(b[i] @ a[i, j]) == j) + int(torch.argmax(a[i] @ b[i, j]) == j)
    np.testing.assert_allclose(group_recall(a, b).numpy(), hits / 14)
    assert 0 < hits.sum() < 84  # neither trivial nor impossible
    unit = F.normalize(a, dim=2)
    assert torch.equal(group_recall(unit, unit), torch.ones(6, dtype=torch.float64))


class TinyModel(torch.nn.Module):
    """A fixed random projection of the pixels: enough to tell the retrieval's bookkeeping apart."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(64, 16)

    def embed(self, x: torch.Tensor, side: str = "a", output: str = "projection") -> torch.Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)


@pytest.fixture(scope="module")
def digits():
    images, labels = digits_split(0.2, 0, "heldout")
    return DigitsPairs(images, labels, load_config(None).data.augment, seed=3)


def test_corrupted_retrieval_equals_brute_force_over_each_images_versions(digits):
    torch.manual_seed(0)
    model = TinyModel()
    metrics = corrupted_retrieval(model, digits, 9, epoch=EVAL_EPOCH, rank=0, world_size=1, device="cpu")
    indices = np.arange(9) * len(digits) // 9
    for severity in EVAL_SEVERITIES:
        hits = np.zeros(len(CORRUPTIONS))
        for i in indices:
            views = []
            for c, name in enumerate(CORRUPTIONS):
                with sample_rng(digits.seed, EVAL_EPOCH, int(i), severity, c):
                    x = corrupt(digits.images[i], name, severity, torch.default_generator)
                    views.append((digits.augment(x), digits.augment(x)))
            with torch.no_grad():
                a = torch.stack([model.embed(va[None])[0] for va, _ in views]).double()
                b = torch.stack([model.embed(vb[None])[0] for _, vb in views]).double()
            for c in range(len(CORRUPTIONS)):
                hits[c] += int(torch.argmax(b @ a[c]) == c) + int(torch.argmax(a @ b[c]) == c)
        expected = hits / (2 * len(indices))
        for c, name in enumerate(CORRUPTIONS):
            assert metrics[f"corrupted_r1/{name}_s{severity}"] == pytest.approx(expected[c], abs=1e-12)
        assert metrics[f"corrupted_r1/s{severity}"] == pytest.approx(expected.mean(), abs=1e-12)
    assert metrics["corrupted_r1_mean"] == pytest.approx(np.mean([metrics[f"corrupted_r1/s{s}"] for s in (1, 5)]))
    assert 0 < metrics["corrupted_r1_mean"] < 1


def test_corrupted_views_are_fixed_per_sample_severity_and_corruption(digits):
    views = CorruptedViews(digits, np.array([4, 10]), 5, EVAL_EPOCH)
    assert len(views) == 2 * len(CORRUPTIONS)
    a, b, k = views[7]
    torch.manual_seed(99)  # the caller's RNG state must not leak in
    a2, b2, _ = views[7]
    assert k == 7 and torch.equal(a, a2) and torch.equal(b, b2) and not torch.equal(a, b)
    assert not torch.equal(views[6][0], a) and not torch.equal(views[1][0], a)
    assert not torch.equal(CorruptedViews(digits, np.array([4, 10]), 1, EVAL_EPOCH)[7][0], a)


def test_evaluate_adds_corrupted_retrieval_only_when_asked(digits):
    torch.manual_seed(0)
    common = dict(rank=0, world_size=1, device="cpu", knn_k=5, tau=0.1)
    plain = evaluate(TinyModel(), digits, digits, **common)
    assert not any(key.startswith("corrupted_r1") for key in plain)
    full = evaluate(TinyModel(), digits, digits, corruptions=True, corruption_samples=3, **common)
    assert len([key for key in full if key.startswith("corrupted_r1")]) == 2 * len(CORRUPTIONS) + 3


@pytest.mark.parametrize("overrides,message", [
    (["eval.corruptions=true", "data.name=synthetic", "model.backbone=free", "train.optimizer=sgd",
      "train.weight_decay=0"], "data.name=synthetic has none"),
    (["eval.corruption_samples=-1"], "eval.corruption_samples=-1 must be >= 0"),
])
def test_corruption_settings_are_validated(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize("shape", [(12, 10, 3), (12, 10)], ids=["RGB", "L"])
def test_shard_images_are_corrupted_from_their_pixels(tmp_path, shape):
    directory, arrays = shards_from_npz(tmp_path, shape=shape)
    shards = ShardPairs(directory, AugmentConfig(), image_size=8, seed=0)
    pixels = torch.from_numpy(arrays["images"][4]).reshape(12, 10, -1).permute(2, 0, 1)
    assert torch.equal(shards.raw(4), pixels.float() / 255)
    a, b, _ = CorruptedViews(shards, np.array([4]), 5, EVAL_EPOCH)[5]
    assert a.shape == b.shape == (shards.channels, 8, 8) and not torch.equal(a, b)
