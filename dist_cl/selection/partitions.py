"""Embedding-free partition: shuffled SGD (random; also `fixed`, drawn once and reused)."""

import numpy as np


def random_partition(u, v, batch_size: int, *, seed: int, tau: float = 0.1) -> np.ndarray:
    """A fresh random partition into N // B batches; the N % B left over are chosen by ``seed``."""
    n = len(u)
    perm = np.random.default_rng(seed).permutation(n)
    usable = n - n % batch_size
    return perm[:usable].reshape(-1, batch_size)

