"""Evaluation metrics: positive-pair retrieval (the paper's metric), recall@k and kNN classification.

The metrics are pure functions of embeddings; ``evaluate`` embeds the data sharded over ranks and
applies them, so every rank returns the same numbers.
"""

import numpy as np
import torch

from dist_cl.embed import embed_indices
from dist_cl.losses import batch_infonce

EVAL_EPOCH = 2**31 - 1
"""Augmentation epoch of the held-out pairs: the same views at every evaluation of every run."""


def retrieval_recall(a: torch.Tensor, b: torch.Tensor, k: int = 1) -> float:
    """Fraction of rows whose partner is among the top-k by inner product, mean of a->b and b->a."""
    sim = a.double() @ b.double().T
    target = torch.arange(len(a))[:, None]
    k = min(k, len(a))
    hit_ab = (sim.topk(k, dim=1).indices == target).any(1).double().mean()
    hit_ba = (sim.T.topk(k, dim=1).indices == target).any(1).double().mean()
    return float((hit_ab + hit_ba) / 2)


def knn_top1(train_x: torch.Tensor, train_y: np.ndarray, test_x: torch.Tensor, test_y: np.ndarray, k: int) -> float:
    """Cosine kNN: majority label of the k nearest training rows (ties to the nearest such label)."""
    train_x = torch.nn.functional.normalize(train_x.double(), dim=1)
    test_x = torch.nn.functional.normalize(test_x.double(), dim=1)
    k = min(k, len(train_x))
    nearest = (test_x @ train_x.T).topk(k, dim=1).indices.numpy()
    votes = np.asarray(train_y)[nearest]
    predictions = []
    for row in votes:
        counts = np.bincount(row)
        winners = np.flatnonzero(counts == counts.max())
        predictions.append(next(label for label in row if label in winners))
    return float((np.asarray(predictions) == np.asarray(test_y)).mean())


def evaluate(model, train_set, heldout_set, *, rank: int, world_size: int, device, knn_k: int, tau: float) -> dict:
    """On the held-out pairs (the training pairs where there are none, as in the synthetic setting):
    retrieval top-1 / recall@5, the full-batch loss L(all pairs), and with labels kNN top-1 on backbone features.
    """
    heldout_set = heldout_set if heldout_set is not None else train_set
    heldout_set.set_epoch(EVAL_EPOCH)
    idx = np.arange(len(heldout_set))
    common = dict(rank=rank, world_size=world_size, device=device)
    u, v = embed_indices(model, heldout_set, idx, augmented=True, **common)
    metrics = {
        "retrieval_top1": retrieval_recall(u, v, 1),
        "retrieval_recall5": retrieval_recall(u, v, 5),
        "full_batch_loss": float(batch_infonce(u.double(), v.double(), tau)),
    }
    if heldout_set is not train_set and heldout_set.labels is not None and train_set.labels is not None:
        train_x, _ = embed_indices(model, train_set, np.arange(len(train_set)), output="backbone", side_b=False,
                                   **common)
        test_x, _ = embed_indices(model, heldout_set, idx, output="backbone", side_b=False, **common)
        metrics["knn_top1"] = knn_top1(train_x, train_set.labels, test_x, heldout_set.labels, knn_k)
    return metrics


def linear_probe_top1(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
    C: float = 1.0, max_iter: int = 1000, seed: int = 0,
) -> float:
    """Top-1 accuracy of a multinomial logistic regression fit on frozen training features.

    Features are standardised with the training split's mean and standard deviation (lbfgs converges
    poorly on raw ReLU features of very different scales); the test split only ever sees those statistics.
    """
    # scikit-learn is imported here so the trainer, which never probes, does not pay for the import
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train_x, test_x = np.asarray(train_x, dtype=np.float64), np.asarray(test_x, dtype=np.float64)
    scaler = StandardScaler().fit(train_x)
    probe = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
    probe.fit(scaler.transform(train_x), np.asarray(train_y))
    return float((probe.predict(scaler.transform(test_x)) == np.asarray(test_y)).mean())
