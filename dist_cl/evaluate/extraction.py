"""A trained checkpoint's embeddings of its data splits, in memory and as .npy files under OUT/<split>/.

The work of tools/extract_embeddings.py, which tools/evaluate.py --checkpoint does too (with the same flags).
"""

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from dist_cl.config import Config, config_from_dict
from dist_cl.data import build_dataset
from dist_cl.evaluate.embed import embed_split
from dist_cl.evaluate.metrics import EVAL_EPOCH
from dist_cl.learn.models import build_model
from dist_cl.runtime.checkpoint_files import load_checkpoint
from dist_cl.runtime.distributed import DistInfo

log = logging.getLogger("dist_cl.extract")

SPLITS = ("train", "heldout")


def model_from_checkpoint(state: dict, cfg: Config, device: torch.device) -> torch.nn.Module:
    num_samples = len(build_dataset(cfg, "train"))  # the free-embedding model is sized by the training set
    model = build_model(cfg, num_samples)
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def write_split(out: Path, arrays: dict[str, np.ndarray], labels: np.ndarray | None, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    n = meta["num_samples"]
    arrays = {**arrays, "indices": np.arange(n, dtype=np.int64)}
    if labels is not None:
        arrays["labels"] = np.asarray(labels, dtype=np.int64)
    for stem, array in arrays.items():
        np.save(out / f"{stem}.npy", array)
    meta = {**meta, "shapes": {stem: list(array.shape) for stem, array in arrays.items()}}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def extract(
    checkpoint: str, out: Path | None, info: DistInfo, *, splits: tuple[str, ...] = SPLITS, output: str = "both",
    views: str = "auto", epoch: int = EVAL_EPOCH, batch_size: int = 256, chunk_size: int = 8192,
    overrides: list[str] | None = None, progress: bool = True,
) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
    """Embed ``splits`` of the checkpoint's data on every rank; rank 0 writes them under ``out`` if given.

    The model and the data are rebuilt from the config saved in the checkpoint, with dotted ``overrides``.
    Returns, on every rank, {split: {stem: array}} (with 'labels' where known; a split the data does not
    have, as synthetic data has no held-out split, is left out) and the checkpoint's path, step and config.
    """
    state, path = load_checkpoint(checkpoint)
    cfg = config_from_dict(state["meta"]["config"], overrides)
    model = model_from_checkpoint(state, cfg, info.device)
    results = {}
    for split in splits:
        dataset = build_dataset(cfg, split)
        if dataset is None:
            log.warning("data.name=%s has no %s split; skipped", cfg.data.name, split)
            continue
        arrays = embed_split(
            model, dataset, info, output=output, views=views, epoch=epoch, batch_size=batch_size,
            chunk_size=chunk_size, num_workers=cfg.data.num_workers,
            progress=progress and info.is_main and sys.stderr.isatty(),
        )
        if out is not None and info.is_main:
            meta = {
                "checkpoint": str(path.resolve()), "step": state["counters"]["step"],
                "epoch": state["counters"]["epoch"], "split": split,
                "num_samples": len(dataset), "dataset_digest": dataset.digest(), "output": output, "views": views,
                "augmentation_epoch": epoch,
                "world_size": info.world_size, "data": cfg.data.name, "backbone": cfg.model.backbone,
                "text_tower": cfg.model.text_tower,
            }
            write_split(out / split, arrays, dataset.labels, meta)
            log.info("wrote %d rows of %s to %s", len(dataset), split, out / split)
        if dataset.labels is not None:
            arrays["labels"] = np.asarray(dataset.labels, dtype=np.int64)
        results[split] = arrays
    return results, {"path": str(path.resolve()), "step": state["counters"]["step"], "config": cfg.to_dict()}


def add_extraction_args(parser: argparse.ArgumentParser) -> None:
    """The flags of ``extract`` that tools/extract_embeddings.py and tools/evaluate.py share."""
    parser.add_argument("--views", choices=["auto", "augmented", "clean"], default="auto",
                        help="augmented pairs, clean inputs, or auto: projections from augmented pairs, "
                             "backbone features from clean inputs (default)")
    parser.add_argument("--epoch", type=int, default=EVAL_EPOCH,
                        help="augmentation epoch of augmented views (default: the trainer's evaluation views)")
    parser.add_argument("--batch-size", type=int, default=256, help="forward batch size per rank")
    parser.add_argument("--chunk-size", type=int, default=8192,
                        help="rows embedded (over all ranks) between progress updates")
    parser.add_argument("overrides", nargs="*",
                        help="dotted config overrides, e.g. data.path=/new/shards data.num_workers=8")
