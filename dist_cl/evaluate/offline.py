"""Evaluation of saved embeddings: every metric the arrays of a training and a held-out split allow.

The arrays are what dist_cl.evaluate.extraction writes (u, v, backbone, labels, indices per split); the
commands over this are ``dist-cl-evaluate`` (dist_cl.cli.evaluate) and ``dist-cl-extract-embeddings``.
"""

import logging
from pathlib import Path

import numpy as np
import torch

from dist_cl.evaluate.metrics import image_text_recalls, knn_top1, linear_probe_top1, retrieval_recall

log = logging.getLogger("dist_cl.evaluate")


def load_split(directory: Path) -> dict[str, np.ndarray] | None:
    """The arrays the extraction wrote for one split, by file stem; None if the split was not written."""
    if not (directory / "meta.json").is_file():
        return None
    return {path.stem: np.load(path) for path in sorted(directory.glob("*.npy"))}


def compute_metrics(
    train: dict[str, np.ndarray] | None, heldout: dict[str, np.ndarray] | None, *, ks: tuple[int, ...] = (1, 5, 10),
    knn_k: int = 20, probe: bool = True, probe_c: float = 1.0, probe_max_iter: int = 1000, seed: int = 0,
    image_text: bool = False,
) -> dict[str, float]:
    """Every metric the inputs allow: retrieval needs u and v (``image_text``: u images and v captions, each
    direction's recall@1/5/10 too); kNN and the probe need backbone features and labels in both splits."""
    metrics = {}
    pairs = heldout if heldout is not None and "u" in heldout else train
    if pairs is not None and "u" in pairs:
        u, v = torch.from_numpy(pairs["u"]), torch.from_numpy(pairs["v"])
        if torch.equal(u, v):
            log.warning("u == v (clean inputs through a shared tower): retrieval is trivially perfect; "
                        "extract with --views auto or augmented")
        for k in ks:
            metrics["retrieval_top1" if k == 1 else f"retrieval_recall{k}"] = retrieval_recall(u, v, k)
        if image_text:
            metrics.update(image_text_recalls(u, v))
    labelled = [s for s in (train, heldout) if s is not None and "backbone" in s and "labels" in s]
    if len(labelled) == 2:
        metrics["knn_top1"] = knn_top1(torch.from_numpy(train["backbone"]), train["labels"],
                                       torch.from_numpy(heldout["backbone"]), heldout["labels"], knn_k)
        if probe:
            metrics["probe_top1"] = linear_probe_top1(train["backbone"], train["labels"], heldout["backbone"],
                                                      heldout["labels"], C=probe_c, max_iter=probe_max_iter,
                                                      seed=seed)
    return metrics


def format_table(metrics: dict[str, float]) -> str:
    width = max(len("metric"), *(len(key) for key in metrics))
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    lines += [f"{key:<{width}}  {value:.4f}" for key, value in metrics.items()]
    return "\n".join(lines)
