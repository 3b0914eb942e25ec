"""The optimizer and its learning-rate schedule.

The schedule is a pure function of training progress in (fractional) epochs, so it needs no state of
its own in a checkpoint: a resumed run recomputes the same rate from its epoch and cursor.
"""

import math

import torch
from timm.optim import create_optimizer_v2

from dist_cl.config import TrainConfig


def build_optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """timm's optimizer named by ``train.optimizer``; each group remembers its ``base_lr`` for the schedule."""
    optimizer = create_optimizer_v2(
        model, opt={"sgd": "momentum"}.get(train.optimizer, train.optimizer),  # timm's "sgd" is Nesterov
        lr=train.lr, weight_decay=train.weight_decay,
        **({"momentum": train.momentum} if train.optimizer in ("sgd", "lars") else {}),
    )
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    return optimizer


def lr_factor(progress: float, warmup: float, total: float) -> float:
    """Linear warm-up to 1, then cosine decay to 0; ``progress`` in (fractional) epochs.

    Measured in epochs rather than steps because strategies differ in batches per epoch (osgd keeps q of
    every k).
    """
    if progress < warmup:
        return progress / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (progress - warmup) / max(total - warmup, 1e-12))))


def epochs_change_warning(saved_epochs: int, train: TrainConfig, progress: float) -> str | None:
    """The learning-rate jump that resuming at ``progress`` (epochs) with another ``train.epochs`` makes:
    the schedule is a function of progress over the total, so a new total moves the whole cosine."""
    if saved_epochs == train.epochs:
        return None
    before, after = (train.lr * lr_factor(progress, train.warmup_epochs, total) for total in (saved_epochs,
                                                                                              train.epochs))
    return (f"train.epochs changed from {saved_epochs} to {train.epochs} on resume: the learning rate at epoch "
            f"{progress:.2f} goes from {before:.3g} to {after:.3g} (the cosine schedule is over train.epochs)")


def set_lr(optimizer: torch.optim.Optimizer, train: TrainConfig, epoch: int, cursor: int, n_batches: int) -> float:
    """The schedule's rate for global batch ``cursor`` of ``epoch`` (half a step in, so none is zero)."""
    factor = lr_factor(epoch + (cursor + 0.5) / n_batches, train.warmup_epochs, train.epochs)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    return optimizer.param_groups[0]["lr"]
