"""Corrupted-view retrieval, the paper's robustness metric, as the official code computes it.

krafton-ai/mini-batch-cl's ``evaluation.py --evaluation corrupted_top1_accuracy`` loads, for one image at a
time, its versions under every corruption at one severity (CIFAR-100-C files), makes two augmented views
of each with the training augmentation, and scores top-1 retrieval among them: view a of the image's
corruption c must find view b of the same corruption c among view b of all its corruptions (and b -> a).
The negatives are the same image corrupted otherwise, so the metric asks how much of the image the
embedding keeps beyond what the augmentations remove; chance is 1 / (number of corruptions).

Here the corruptions are dist_cl.evaluate.corruptions' six, applied to a held-out image in [0, 1] (the data set's
``raw``) before its augmentation and normalisation, at severities 1 and 5. Views and noise are seeded by
(run seed, evaluation epoch, sample, severity, corruption): the same at every evaluation.
"""

import numpy as np
import torch
from torch.utils.data import Dataset

from dist_cl.data.pairs import sample_rng
from dist_cl.evaluate.corruptions import CORRUPTIONS, corrupt
from dist_cl.evaluate.embed import embed_indices

EVAL_SEVERITIES = (1, 5)


class CorruptedViews(Dataset):
    """Item k: two augmented views of sample ``indices[k // C]`` under corruption ``k % C`` at ``severity``."""

    def __init__(self, dataset, indices: np.ndarray, severity: int, epoch: int):
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.severity = severity
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices) * len(CORRUPTIONS)

    def __getitem__(self, k: int):
        index, c = int(self.indices[k // len(CORRUPTIONS)]), k % len(CORRUPTIONS)
        with sample_rng(self.dataset.seed, self.epoch, index, self.severity, c):
            x = corrupt(self.dataset.raw(index), CORRUPTIONS[c], self.severity, torch.default_generator)
            return self.dataset.augment(x), self.dataset.augment(x), k


def group_recall(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a, b: (n, m, d), n groups of m items. Per item position j: the fraction of groups where a[i, j]'s
    highest inner product among b[i, :] is b[i, j], averaged with the same for b -> a; shape (m,)."""
    similarity = torch.einsum("nid,njd->nij", a.double(), b.double())
    target = torch.arange(a.shape[1])
    a_to_b = (similarity.argmax(2) == target).double().mean(0)
    b_to_a = (similarity.argmax(1) == target).double().mean(0)
    return (a_to_b + b_to_a) / 2


def evenly_spaced(n: int, samples: int) -> np.ndarray:
    """``samples`` indices spread evenly over range(n) (all of them for 0 or samples >= n)."""
    m = n if samples == 0 else min(samples, n)
    return np.arange(m) * n // m


def corrupted_retrieval(model, dataset, samples: int, *, epoch: int, rank: int, world_size: int,
                        device) -> dict:
    """``corrupted_r1/<corruption>_s<severity>`` over ``samples`` evenly spaced images of ``dataset``, their
    mean per severity (``corrupted_r1/s<severity>``, the official number) and over all (``corrupted_r1_mean``)."""
    indices = evenly_spaced(len(dataset), samples)
    metrics, per_severity = {}, []
    for severity in EVAL_SEVERITIES:
        views = CorruptedViews(dataset, indices, severity, epoch)
        u, v = embed_indices(model, views, np.arange(len(views)), augmented=True, rank=rank,
                             world_size=world_size, device=device)
        hits = group_recall(u.view(len(indices), len(CORRUPTIONS), -1), v.view(len(indices), len(CORRUPTIONS), -1))
        metrics.update({f"corrupted_r1/{name}_s{severity}": float(hit) for name, hit in zip(CORRUPTIONS, hits)})
        metrics[f"corrupted_r1/s{severity}"] = float(hits.mean())
        per_severity.append(float(hits.mean()))
    metrics["corrupted_r1_mean"] = float(np.mean(per_severity))
    return metrics
