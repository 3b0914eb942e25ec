"""SimCLR views are reproducible from (seed, epoch, index) and shaped for the model; eval views are fixed."""

import numpy as np
import pytest
import torch
from PIL import Image

from dist_cl.config import AugmentConfig
from dist_cl.data.pairs import sample_rng
from dist_cl.data.transforms import blur_kernel_size, eval_transform, simclr_transform

FULL = AugmentConfig(blur_prob=0.5)


def image(mode: str, size: tuple = (20, 14)) -> Image.Image:
    channels = 3 if mode == "RGB" else 1
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


def views(seed: int, epoch: int, index: int, mode: str = "RGB") -> tuple[torch.Tensor, torch.Tensor]:
    transform = simclr_transform(FULL, 16, 3 if mode == "RGB" else 1)
    with sample_rng(seed, epoch, index):
        return transform(image(mode)), transform(image(mode))


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_views_are_identical_for_the_same_seed_epoch_and_index(mode):
    a1, b1 = views(0, 2, 5, mode)
    torch.manual_seed(123)  # the caller's RNG state must not leak into the views
    a2, b2 = views(0, 2, 5, mode)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert not torch.equal(a1, b1)


@pytest.mark.parametrize("other", [(0, 3, 5), (0, 2, 6), (1, 2, 5)], ids=["epoch", "index", "seed"])
def test_views_differ_when_epoch_index_or_seed_differ(other):
    a1, _ = views(0, 2, 5)
    a2, _ = views(*other)
    assert not torch.equal(a1, a2)


def test_views_leave_the_callers_rng_untouched():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    views(0, 0, 0)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("mode,channels", [("RGB", 3), ("L", 1)])
def test_train_and_eval_views_are_square_float_tensors_of_the_image_size(mode, channels):
    for transform in (simclr_transform(FULL, 16, channels), eval_transform(16, channels)):
        out = transform(image(mode))
        assert out.shape == (channels, 16, 16) and out.dtype == torch.float32


def test_eval_view_is_deterministic_centre_crop():
    transform = eval_transform(16, 3)
    assert torch.equal(transform(image("RGB")), transform(image("RGB")))


def test_zero_strengths_and_probabilities_leave_colour_and_blur_steps_out():
    cfg = AugmentConfig(color_jitter=0.0, grayscale_prob=0.0, blur_prob=0.0)
    names = [type(t).__name__ for t in simclr_transform(cfg, 16, 3).transforms]
    assert "RandomApply" not in names and "RandomGrayscale" not in names


def test_blur_kernel_is_odd_and_a_tenth_of_the_image():
    assert [blur_kernel_size(s) for s in (8, 32, 96, 224)] == [3, 3, 9, 23]


@pytest.mark.parametrize("channels", [1, 3])
def test_tensor_input_without_to_image_gives_the_same_views_as_plain_tensors(channels):
    pixels = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (channels, 20, 14), dtype=np.uint8))
    for wrapped, plain in ((simclr_transform(FULL, 16, channels), simclr_transform(FULL, 16, channels, False)),
                           (eval_transform(16, channels), eval_transform(16, channels, from_pil=False))):
        with sample_rng(0, 1, 2):
            expected = wrapped(pixels)
        with sample_rng(0, 1, 2):
            out = plain(pixels)
        assert type(out) is torch.Tensor and torch.equal(out, expected.as_subclass(torch.Tensor))
