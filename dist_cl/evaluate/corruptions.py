"""Common corruptions (Hendrycks & Dietterich, ICLR 2019) of (C, H, W) float images in [0, 1], 1 or 3 channels.

Six of the benchmark's 19: gaussian noise, gaussian blur, contrast, brightness, pixelate and JPEG, with the
severity table of Hendrycks' CIFAR-10-C (robustness/ImageNet-C/create_c/make_cifar_c.py), which the authors
scaled down from ImageNet-C's 224 px to 32 px images; at 28 px (Fashion-MNIST) it applies as it is, and
pixelate's factor is a fraction of the side at any size. The package that ships these corruptions,
``imagecorruptions``, needs OpenCV and scikit-image, takes H x W x 3 uint8 arrays with ImageNet-C's 224 px
parameters and draws noise from numpy's global RNG, so they are written here in torch (JPEG through Pillow).

A corrupted image is a function of (image, name, severity, generator state): only the noise draws random
numbers, from the generator passed in.
"""

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SEVERITIES = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # noise standard deviation
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # sigma in pixels
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # factor on each pixel's distance to its channel's mean
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to the HSV value
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # side of the box-downsampled image, as a fraction
    "jpeg_compression": (80, 65, 58, 50, 40),  # JPEG quality
}
CORRUPTIONS = tuple(SEVERITIES)


def gaussian_noise(x: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    return (x + std * torch.randn(x.shape, generator=generator)).clamp(0, 1)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """scikit-image's ``gaussian``, which Hendrycks used: a separable kernel truncated at 4 sigma, edges
    extended by their nearest pixel (torchvision's blur reflects them instead)."""
    radius = int(4 * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = x.shape[0]
    y = F.pad(x[None], (radius,) * 4, mode="replicate")
    y = F.conv2d(y, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(y, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)[0].clamp(0, 1)


def contrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    mean = x.mean(dim=(1, 2), keepdim=True)
    return ((x - mean) * factor + mean).clamp(0, 1)


def brightness(x: torch.Tensor, shift: float) -> torch.Tensor:
    """Add ``shift`` to the HSV value (the channel maximum), hue and saturation unchanged: every channel
    scales by new value / value, and a black pixel (no hue) turns grey."""
    value = x.amax(dim=0, keepdim=True)
    new_value = (value + shift).clamp(max=1)
    return torch.where(value > 0, x * new_value / value.clamp(min=1e-12), new_value)


def pixelate(x: torch.Tensor, fraction: float) -> torch.Tensor:
    """Average boxes down to ``int(side * fraction)`` pixels a side, then repeat them back up to the side."""
    h, w = x.shape[1:]
    small = F.interpolate(x[None], size=(max(1, int(h * fraction)), max(1, int(w * fraction))), mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest")[0]


def jpeg_compression(x: torch.Tensor, quality: int) -> torch.Tensor:
    """Saved and reloaded by Pillow at ``quality``, as Hendrycks did."""
    pixels = (x * 255).round().to(torch.uint8).permute(1, 2, 0).squeeze(2).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    decoded = torch.from_numpy(np.array(Image.open(buffer))).to(x.dtype) / 255
    return decoded.view(x.shape[1], x.shape[2], -1).permute(2, 0, 1)


def corrupt(x: torch.Tensor, name: str, severity: int, generator: torch.Generator) -> torch.Tensor:
    """``x`` (C, H, W) in [0, 1] with corruption ``name`` at ``severity`` 1..5; same shape, in [0, 1]."""
    if name not in SEVERITIES:
        raise ValueError(f"corruption {name!r} is unknown; choose one of {', '.join(CORRUPTIONS)}")
    if not 1 <= severity <= len(SEVERITIES[name]):
        raise ValueError(f"severity={severity} must be 1..{len(SEVERITIES[name])}")
    level = SEVERITIES[name][severity - 1]
    if name == "gaussian_noise":
        return gaussian_noise(x, level, generator)
    return {"gaussian_blur": gaussian_blur, "contrast": contrast, "brightness": brightness, "pixelate": pixelate,
            "jpeg_compression": jpeg_compression}[name](x, level)
