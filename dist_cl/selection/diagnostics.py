"""What a plan is made of besides its loss: the batch-mate pairs it repeats from the previous epoch's plan
(pair coverage, which the paper's Theorems 4-5 tie to full-batch equivalence) and the share of batch-mates
with one label (diagnostic only: selection never reads labels)."""

import numpy as np


def same_group_share(plan: np.ndarray, group_of: np.ndarray) -> float:
    """Share of the plan's batch-mate pairs {i, j} (i, j in one row) with group_of[i] == group_of[j] >= 0."""
    plan = np.asarray(plan, dtype=np.int64)
    groups = np.asarray(group_of, dtype=np.int64)[plan]
    same = 0
    for row in groups:
        counts = np.bincount(row[row >= 0])
        same += int((counts * (counts - 1) // 2).sum())
    batch_size = plan.shape[1]
    return same / (len(plan) * batch_size * (batch_size - 1) // 2)


def pair_repeat(plan: np.ndarray, previous: np.ndarray, num_samples: int) -> float:
    """Share of the plan's batch-mate pairs that were batch-mates in ``previous`` too (both partitions).

    A random partition repeats about (B - 1) / (N - 1) of its pairs; a fixed one all of them.
    """
    previous = np.asarray(previous, dtype=np.int64)
    batch_of = np.full(num_samples, -1, dtype=np.int64)
    batch_of[previous] = np.arange(len(previous))[:, None]
    return same_group_share(plan, batch_of)


def label_purity(plan: np.ndarray, labels: np.ndarray) -> float:
    """Share of the plan's batch-mate pairs with the same label (unlabelled samples, label < 0, never match)."""
    return same_group_share(plan, labels)
