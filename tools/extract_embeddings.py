"""Embed a data split with a trained checkpoint and save the rows as .npy files (one row per sample).

    torchrun --standalone --nproc_per_node=2 tools/extract_embeddings.py \\
        --checkpoint runs/digits/checkpoints/latest --out runs/digits/embeddings
    python tools/extract_embeddings.py --checkpoint runs/digits --out emb --split heldout --output projection

--checkpoint is a checkpoint file (step-XXXXXXXX.pt), the ``latest`` pointer in a checkpoints directory, a
checkpoints directory or a run directory (both: its newest checkpoint that verifies). The model and the data
are rebuilt from the config saved in the checkpoint; dotted overrides change it (e.g. data.path=/new/shards
when the shards moved, data.num_workers=8).

Every rank embeds a share of the split (dist_cl.embed.embed_indices); rank 0 writes, under OUT/<split>/:

    u.npy, v.npy      projections (n, model.embed_dim): tower a on view a, tower b on view b
    backbone.npy      backbone features (n, num_features) of tower a
    indices.npy       the sample index of each row (0..n-1, in order)
    labels.npy        the label of each row, where the data has labels
    meta.json         checkpoint, step, epoch, split, views, shapes

--views: ``augmented`` embeds the two augmented views of each sample (augmentation epoch --epoch, by
default the one the trainer evaluates on), ``clean`` the un-augmented input through both towers (u == v
with a shared tower). The default ``auto`` takes projections from augmented pairs (what positive-pair
retrieval needs) and backbone features from clean inputs (what kNN and linear probes use), the
choice the trainer's own evaluation makes.

Exactly one row per sample whatever the world size. All rows are gathered in memory on every rank and
written as single .npy files: sharded output for data sets whose embeddings do not fit in memory
(n x dim x 4 bytes) is not implemented.
"""

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dist_cl.checkpoint import Checkpointer, CheckpointError, upgrade
from dist_cl.config import Config, ConfigError, config_from_dict
from dist_cl.data import build_dataset
from dist_cl.distributed import DistInfo, close_distributed, exit_process, init_distributed
from dist_cl.embed import embed_indices
from dist_cl.evaluation import EVAL_EPOCH
from dist_cl.models import build_model

log = logging.getLogger("dist_cl.extract")

SPLITS = ("train", "heldout")


def load_checkpoint(path: str | Path) -> tuple[dict, Path]:
    """(state, file) for a checkpoint file, a ``latest`` pointer, a checkpoints directory or a run directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"--checkpoint {path} does not exist; pass a checkpoint file, <run>/checkpoints/latest "
                              "or a run directory")
    if path.is_dir():
        directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        which = "latest"
    elif path.name == "latest":
        directory, which = path.parent, "latest"
    else:
        directory, which = path.parent, str(path)
    state, found, problems = Checkpointer(directory, keep=1).load(which)
    for problem in problems:
        log.warning("skipped checkpoint %s", problem)
    return upgrade(state), found


def config_from_checkpoint(state: dict, overrides: list[str] | None = None) -> Config:
    """The run's Config from the dict saved in ``state["meta"]["config"]``, with dotted overrides, validated again."""
    return config_from_dict(state["meta"]["config"], overrides)


def model_from_checkpoint(state: dict, cfg: Config, device: torch.device) -> torch.nn.Module:
    num_samples = len(build_dataset(cfg, "train"))  # the free-embedding model is sized by the training set
    model = build_model(cfg, num_samples)
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def embed_split(
    model, dataset, info: DistInfo, *, output: str, views: str, epoch: int, batch_size: int,
    chunk_size: int, num_workers: int, progress: bool,
) -> dict[str, np.ndarray]:
    """Arrays by file stem ('u', 'v', 'backbone'), one row per sample of ``dataset`` in index order.

    The split is embedded chunk by chunk (each chunk sharded over the ranks) so that rank 0 can show progress.
    """
    n = len(dataset)
    dataset.set_epoch(epoch)
    wanted = []  # (stems, embed_indices output, augmented)
    if output in ("projection", "both"):
        wanted.append((("u", "v"), "projection", views != "clean"))
    if output in ("backbone", "both"):
        wanted.append((("backbone", None), "backbone", views == "augmented"))
    parts: dict[str, list[torch.Tensor]] = {}
    bar = tqdm(total=n * len(wanted), desc="embedding", unit="rows", disable=not progress, dynamic_ncols=True)
    for stems, kind, augmented in wanted:
        for start in range(0, n, chunk_size):
            indices = np.arange(start, min(start + chunk_size, n))
            a, b = embed_indices(
                model, dataset, indices, rank=info.rank, world_size=info.world_size, device=info.device,
                batch_size=batch_size, augmented=augmented, output=kind, num_workers=num_workers,
                side_b=stems[1] is not None,
            )
            for stem, rows in zip(stems, (a, b)):
                if stem is not None:
                    parts.setdefault(stem, []).append(rows)
            bar.update(len(indices))
    bar.close()
    return {stem: torch.cat(chunks).numpy() for stem, chunks in parts.items()}


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

    Returns, on every rank, {split: {stem: array}} (with 'labels' where known; a split the data does not
    have, as synthetic data has no held-out split, is left out) and the checkpoint's path, step and config.
    """
    state, path = load_checkpoint(checkpoint)
    cfg = config_from_checkpoint(state, overrides)
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
                "checkpoint": str(path.resolve()), "step": state["counters"]["step"], "epoch": state["counters"]["epoch"],
                "split": split,
                "num_samples": len(dataset), "output": output, "views": views, "augmentation_epoch": epoch,
                "world_size": info.world_size, "data": cfg.data.name, "backbone": cfg.model.backbone,
            }
            write_split(out / split, arrays, dataset.labels, meta)
            log.info("wrote %d rows of %s to %s", len(dataset), split, out / split)
        if dataset.labels is not None:
            arrays["labels"] = np.asarray(dataset.labels, dtype=np.int64)
        results[split] = arrays
    return results, {"path": str(path.resolve()), "step": state["counters"]["step"], "config": cfg.to_dict()}


def add_extraction_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared with tools/evaluate.py, which can extract from a checkpoint itself."""
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


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint file, checkpoints/latest, a checkpoints directory or a run directory")
    parser.add_argument("--out", required=True, help="output directory; each split goes to OUT/<split>/")
    parser.add_argument("--split", choices=["train", "heldout", "both"], default="both")
    parser.add_argument("--output", choices=["projection", "backbone", "both"], default="both")
    add_extraction_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    info = init_distributed()
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s [rank {info.rank}] %(levelname)s %(message)s")
    logging.getLogger("dist_cl").setLevel(logging.INFO if info.is_main else logging.WARNING)
    try:
        extract(args.checkpoint, Path(args.out), info, splits=SPLITS if args.split == "both" else (args.split,),
                output=args.output, views=args.views, epoch=args.epoch, batch_size=args.batch_size,
                chunk_size=args.chunk_size, overrides=args.overrides)
    except (ConfigError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        close_distributed()
    return 0


if __name__ == "__main__":
    exit_process(main())
