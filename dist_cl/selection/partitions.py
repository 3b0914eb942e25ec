"""Embedding-free partition: shuffled SGD (random; also `fixed`, drawn once and reused)."""

import numpy as np


def random_partition(n: int, batch_size: int, *, seed: int) -> np.ndarray:
    """A fresh random partition of range(n) into n // B batches; the n % B left over are chosen by ``seed``."""
    perm = np.random.default_rng(seed).permutation(n)
    usable = n - n % batch_size
    return perm[:usable].reshape(-1, batch_size)

