"""SimCLR two-view augmentation and the evaluation transform for real images (PIL in, normalised tensor out).

Every random draw goes through the global torch RNG (torchvision's transforms use it), so inside
``PairDataset``'s ``sample_rng`` a sample's views depend only on (seed, epoch, index).
"""

import torch
from torchvision.transforms import v2

from dist_cl.config import AugmentConfig

# ImageNet statistics; a one-channel image uses their mean, as timm does for in_chans=1.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(channels: int) -> v2.Normalize:
    if channels == 3:
        return v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if channels == 1:
        return v2.Normalize([sum(IMAGENET_MEAN) / 3], [sum(IMAGENET_STD) / 3])
    raise ValueError(f"channels={channels}: images must have 1 (L) or 3 (RGB) channels")


def _to_tensor(channels: int, from_pil: bool) -> list:
    # a tensor input stays a plain tensor: v2.ToImage would wrap it in a tv_tensors.Image, whose every later
    # operation goes through torch_function dispatch, a large share of a small image's transform
    return ([v2.ToImage()] if from_pil else []) + [v2.ToDtype(torch.float32, scale=True), normalize(channels)]


def blur_kernel_size(image_size: int) -> int:
    """SimCLR blurs with a kernel 10% of the image side, made odd and at least 3."""
    return max(3, int(0.1 * image_size) // 2 * 2 + 1)


def simclr_transform(cfg: AugmentConfig, image_size: int, channels: int, from_pil: bool = True) -> v2.Compose:
    """Random resized crop, flip, colour jitter, grayscale, blur (Chen et al. 2020, appendix A).

    ``from_pil=False`` takes (C, H, W) uint8 or [0, 1] float tensors only, and returns plain tensors."""
    steps: list = [v2.RandomResizedCrop(image_size, scale=(cfg.crop_scale_min, 1.0), antialias=True)]
    if cfg.flip_prob > 0:
        steps.append(v2.RandomHorizontalFlip(cfg.flip_prob))
    if cfg.color_jitter > 0 and cfg.color_jitter_prob > 0:
        s = cfg.color_jitter
        steps.append(v2.RandomApply([v2.ColorJitter(s, s, s, min(s / 4, 0.5))], p=cfg.color_jitter_prob))
    if cfg.grayscale_prob > 0:
        steps.append(v2.RandomGrayscale(cfg.grayscale_prob))
    if cfg.blur_prob > 0:
        steps.append(v2.RandomApply([v2.GaussianBlur(blur_kernel_size(image_size), (0.1, 2.0))], p=cfg.blur_prob))
    return v2.Compose(steps + _to_tensor(channels, from_pil))


def eval_transform(image_size: int, channels: int, from_pil: bool = True) -> v2.Compose:
    """Resize the short side and centre-crop: the deterministic view used for kNN and retrieval."""
    return v2.Compose(
        [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)] + _to_tensor(channels, from_pil)
    )
