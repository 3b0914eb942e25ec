"""Data sets that yield (view_a, view_b, index) with a dense integer index; built from the config."""

import multiprocessing

import torch

from dist_cl.config import Config
from dist_cl.data.pairs import PairDataset

WORKER_PRELOAD = ["torch", "dist_cl.data.digits", "dist_cl.data.fashion_mnist", "dist_cl.data.shards"]
"""What the forkserver imports once, so that each loader worker forks with it instead of importing torch
and the data modules afresh: every pass over the data (each evaluation makes several) starts new workers."""
multiprocessing.set_forkserver_preload(WORKER_PRELOAD)


def loader_options(num_workers: int, device: torch.device | str) -> dict:
    """DataLoader arguments of every pass over the data (training, bank refresh, evaluation).

    Workers are started by a forkserver, not forked: when a loader starts, the planner thread and the
    FAISS/BLAS/OpenMP thread pools are live, and a forked child inherits their locks as they were (a
    deadlock when it next takes one). Workers are not persistent: each loader's workers get the dataset
    as it is then, with the augmentation epoch set (``WORKER_PRELOAD`` makes starting them cheap). Pinned
    batches make the copies to CUDA asynchronous. Each loader has a generator of its own: one drawing its
    seed from the global stream would shift what dropout draws after it, so a resumed run, which starts one
    loader more, would diverge (augmentations are seeded by sample, not by the loader).
    """
    return dict(num_workers=num_workers, pin_memory=torch.device(device).type == "cuda",
                multiprocessing_context="forkserver" if num_workers else None, generator=torch.Generator())


def build_dataset(cfg: Config, split: str) -> PairDataset | None:
    """The ``train`` or ``heldout`` split of the configured data; None where the data has no held-out split."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r} must be 'train' or 'heldout'")
    d = cfg.data
    if d.name == "digits":
        from dist_cl.data.digits import DigitsPairs, digits_split

        images, labels = digits_split(d.holdout_fraction, d.split_seed, split)
        return DigitsPairs(images, labels, d.augment, seed=cfg.seed)
    if d.name == "synthetic":
        from dist_cl.data.synthetic import SyntheticPairs

        return SyntheticPairs(d.num_samples, seed=cfg.seed) if split == "train" else None
    if d.name == "shards":
        from dist_cl.data.shards import ShardPairs, split_dir

        directory = split_dir(d.path, split)
        return ShardPairs(directory, d.augment, d.image_size, seed=cfg.seed) if directory else None
    if d.name == "captions":
        from dist_cl.data.captions import CaptionPairs
        from dist_cl.data.shards import split_dir
        from dist_cl.data.tokenizer import CaptionTokenizer

        # the workers tokenise: open_clip's import (seconds) is made once, by the forkserver
        multiprocessing.set_forkserver_preload([*WORKER_PRELOAD, "dist_cl.data.captions", "open_clip"])
        tokenizer = CaptionTokenizer(cfg.model.text_tower, cfg.model.text_cfg.get("context_length"))
        directory = split_dir(d.path, split)
        return CaptionPairs(directory, d.augment, d.image_size, cfg.seed, tokenizer) if directory else None
    if d.name == "fashion_mnist":
        from dist_cl.data.fashion_mnist import DEFAULT_PATH, FashionMnistPairs, fashion_mnist_split

        subset = d.subset if split == "train" else d.heldout_subset
        images, labels = fashion_mnist_split(d.path or DEFAULT_PATH, split, subset, d.split_seed)
        return FashionMnistPairs(images, labels, d.augment, d.image_size, seed=cfg.seed)
    raise ValueError(f"data.name={d.name!r} has no loader yet")
