"""Fixed embeddings to select batches on instead of the live bank: the teacher of B3 (arXiv 2505.11293).

A run then batches by the similarities a teacher model sees, e.g. the output of dist-cl-extract-embeddings
of an earlier run on the same data (its ``train/`` split: u.npy, v.npy, indices.npy, meta.json). The file
must be of this run's training set sample for sample, which its dataset digest
(dist_cl.data.pairs.PairDataset.digest) and its indices show; anything else is refused before training.
"""

import json
from pathlib import Path

import numpy as np

from dist_cl.config import ConfigError

FILES = ("u.npy", "v.npy", "meta.json")


def teacher_folder(path: str) -> Path:
    """The folder holding the teacher's arrays: ``path`` itself, or its ``train/`` split."""
    folder = Path(path)
    return folder / "train" if (folder / "train" / "u.npy").is_file() else folder


def load_teacher(path: str, dataset) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's (u, v), L2-normalised float32 rows in ``dataset``'s index order, or ConfigError naming
    what does not fit."""
    folder = teacher_folder(path)
    fix = ("point it at the output of dist-cl-extract-embeddings (its folder or its train/ split) for a "
           "checkpoint of a run on this training set")
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise ConfigError(f"selection.teacher={path}: {folder} has no {', '.join(missing)}; {fix}")
    try:
        meta = json.loads((folder / "meta.json").read_text())
        u, v = np.load(folder / "u.npy"), np.load(folder / "v.npy")
    except (ValueError, OSError) as err:  # JSONDecodeError is a ValueError, as is a pickled or truncated .npy
        raise ConfigError(f"selection.teacher={path}: its files cannot be read ({err}); {fix}") from err
    if u.ndim != 2 or u.shape != v.shape:
        raise ConfigError(f"selection.teacher={path}: u.npy {u.shape} and v.npy {v.shape} must be (N, d) arrays of "
                          f"one shape; {fix}")
    if len(u) != len(dataset):
        raise ConfigError(f"selection.teacher={path} holds embeddings of {len(u):,} samples, and this run's training "
                          f"set has {len(dataset):,}; {fix}")
    indices_file = folder / "indices.npy"
    if indices_file.is_file() and not np.array_equal(np.load(indices_file), np.arange(len(u))):
        raise ConfigError(f"selection.teacher={path}: its rows are not samples 0..N-1 in order (indices.npy); {fix}")
    digest = meta.get("dataset_digest")
    if digest != dataset.digest():
        written = f"digest {digest[:12]}" if digest else "no dataset digest (written before digests were)"
        raise ConfigError(f"selection.teacher={path} was extracted from another data set (data {meta.get('data')!r}, "
                          f"split {meta.get('split')!r}, {written}) than this run's training set (digest "
                          f"{dataset.digest()[:12]}); {fix}")
    if not (np.isfinite(u).all() and np.isfinite(v).all()):
        raise ConfigError(f"selection.teacher={path} holds non-finite values (NaN/inf); {fix}")
    return tuple(np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12), dtype=np.float32)
                 for x in (u, v))
