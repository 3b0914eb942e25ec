"""The optimizer and its learning-rate schedule (the factor itself is dist_cl.config.schedule.lr_factor, a pure
function of progress in epochs, so a resumed run recomputes the same rate from its epoch and cursor)."""

import torch
from timm.optim import create_optimizer_v2

from dist_cl.config import TrainConfig
from dist_cl.config.schedule import lr_factor


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


def set_lr(optimizer: torch.optim.Optimizer, train: TrainConfig, epoch: int, cursor: int, n_batches: int) -> float:
    """The schedule's rate for global batch ``cursor`` of ``epoch`` (half a step in, so none is zero)."""
    factor = lr_factor(epoch + (cursor + 0.5) / n_batches, train.warmup_epochs, train.epochs)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    return optimizer.param_groups[0]["lr"]
