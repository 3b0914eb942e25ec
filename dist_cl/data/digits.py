"""The embedded default: scikit-learn's 1,797 real 8x8 digit images, with a stratified held-out split."""

import math

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from dist_cl.config import AugmentConfig
from dist_cl.config.datasets import DATASETS
from dist_cl.data.pairs import PairDataset

DIGITS = DATASETS["digits"]


def digits_split(holdout_fraction: float, split_seed: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, 1, 8, 8) in [0, 1] and labels of the ``train`` or ``heldout`` split."""
    digits = load_digits()
    if (len(digits.images), len(np.unique(digits.target))) != (DIGITS.samples, DIGITS.classes):
        raise ValueError(f"scikit-learn's digits hold {len(digits.images)} images of {len(np.unique(digits.target))} "
                         f"classes where dist_cl.config.datasets declares {DIGITS.samples} of {DIGITS.classes}, from "
                         "which data.holdout_fraction's bounds are checked: update the declaration")
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    train_idx, held_idx = train_test_split(
        np.arange(len(images)), test_size=holdout_fraction, random_state=split_seed, stratify=digits.target
    )
    idx = train_idx if split == "train" else held_idx
    return images[idx], digits.target[idx].astype(np.int64)


class DigitsPairs(PairDataset):
    """Two views per digit: a random shift (pad + crop), a small rotation and Gaussian noise, in torch."""

    channels = DIGITS.channels

    def __init__(self, images: np.ndarray, labels: np.ndarray, augment: AugmentConfig, seed: int):
        super().__init__(seed)
        self.images = torch.from_numpy(images)
        self.labels = labels
        self.cfg = augment

    def __len__(self) -> int:
        return len(self.images)

    def identity(self):
        yield from super().identity()
        yield self.images.numpy().tobytes()

    def load(self, index: int) -> torch.Tensor:
        return self.images[index]

    def clean(self, image: torch.Tensor) -> torch.Tensor:
        return image

    def raw(self, index: int) -> torch.Tensor:
        return self.load(index)

    def augment(self, image: torch.Tensor) -> torch.Tensor:
        c, h, w = image.shape
        s = self.cfg.crop_shift
        if s:
            padded = F.pad(image, (s, s, s, s))
            dy, dx = torch.randint(0, 2 * s + 1, (2,)).tolist()
            image = padded[:, dy : dy + h, dx : dx + w]
        if self.cfg.rotate_degrees:
            angle = math.radians((torch.rand(()).item() * 2 - 1) * self.cfg.rotate_degrees)
            cos, sin = math.cos(angle), math.sin(angle)
            theta = torch.tensor([[[cos, -sin, 0.0], [sin, cos, 0.0]]])
            grid = F.affine_grid(theta, (1, c, h, w), align_corners=False)
            image = F.grid_sample(image[None], grid, align_corners=False)[0]
        if self.cfg.noise_std:
            image = image + self.cfg.noise_std * torch.randn_like(image)
        return image
