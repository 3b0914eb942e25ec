"""``dist-cl-extract-embeddings``: embed a data split with a trained checkpoint and save the rows as .npy files.

    torchrun --standalone --nproc_per_node=2 --no-python dist-cl-extract-embeddings \\
        --checkpoint runs/digits/checkpoints/latest --out runs/digits/embeddings
    dist-cl-extract-embeddings --checkpoint runs/digits --out emb --split heldout --output projection

``python tools/extract_embeddings.py`` and ``torchrun ... tools/extract_embeddings.py`` run the same command.

--checkpoint is a checkpoint file (step-XXXXXXXX.pt), the ``latest`` pointer in a checkpoints directory, a
checkpoints directory or a run directory (both: its newest checkpoint that verifies). The model and the data
are rebuilt from the config saved in the checkpoint; dotted overrides change it (e.g. data.path=/new/shards
when the shards moved, data.num_workers=8).

Every rank embeds a share of the split (dist_cl.evaluate.embed.embed_indices); rank 0 writes, under OUT/<split>/:

    u.npy, v.npy      projections (n, model.embed_dim): tower a on view a, tower b on view b
    backbone.npy      backbone features (n, the backbone's output width) of tower a
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
import logging
import sys
from functools import partial
from pathlib import Path

from dist_cl.cli.torchrun import run_distributed
from dist_cl.evaluate.extraction import SPLITS, add_extraction_args, extract
from dist_cl.runtime.distributed import DistInfo, exit_process


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dist-cl-extract-embeddings", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint file, checkpoints/latest, a checkpoints directory or a run directory")
    parser.add_argument("--out", required=True, help="output directory; each split goes to OUT/<split>/")
    parser.add_argument("--split", choices=["train", "heldout", "both"], default="both")
    parser.add_argument("--output", choices=["projection", "backbone", "both"], default="both")
    add_extraction_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run_distributed(partial(extract_splits, parse_args(sys.argv[1:] if argv is None else argv)))


def extract_splits(args: argparse.Namespace, info: DistInfo) -> int:
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s [rank {info.rank}] %(levelname)s %(message)s")
    logging.getLogger("dist_cl").setLevel(logging.INFO if info.is_main else logging.WARNING)
    extract(args.checkpoint, Path(args.out), info, splits=SPLITS if args.split == "both" else (args.split,),
            output=args.output, views=args.views, epoch=args.epoch, batch_size=args.batch_size,
            chunk_size=args.chunk_size, overrides=args.overrides)
    return 0


def run() -> None:
    """The ``dist-cl-extract-embeddings`` script: ``main``, then the end that gloo needs (``exit_process``)."""
    exit_process(main())


if __name__ == "__main__":
    run()
