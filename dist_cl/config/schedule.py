"""The learning-rate schedule that ``train.lr``, ``train.warmup_epochs`` and ``train.epochs`` describe.

A pure function of training progress in (fractional) epochs, so it needs no state of its own in a checkpoint:
a resumed run recomputes the same rate from its epoch and cursor. It sits in the config layer, below the
optimizer that applies it (dist_cl.learn.optim.set_lr), because the resume policy (dist_cl.config.resume)
also reads it: to name the jump in the rate that a changed ``train.epochs`` makes.
"""

import math


def lr_factor(progress: float, warmup: float, total: float) -> float:
    """Linear warm-up to 1, then cosine decay to 0; ``progress`` in (fractional) epochs.

    Measured in epochs rather than steps because strategies differ in batches per epoch (osgd keeps q of
    every k).
    """
    if progress < warmup:
        return progress / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (progress - warmup) / max(total - warmup, 1e-12))))
