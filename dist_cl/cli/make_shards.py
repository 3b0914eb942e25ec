"""``dist-cl-make-shards``: write indexed shards from digits, Fashion-MNIST, an image folder, an .npz or
images with captions, or the Noto emoji with their CLDR captions; or index img2dataset's captioned shards
where they lie.

    dist-cl-make-shards --source digits --split train --out data/digits/train --samples-per-shard 256
    dist-cl-make-shards --source fashion-mnist --split heldout --out data/fashion-mnist/heldout
    dist-cl-make-shards --source folder --input imagenet/train --out data/in1k/train
    dist-cl-make-shards --source npz --input cifar_train.npz --out data/cifar/train
    dist-cl-make-shards --source captions --input photos/ --out data/photos/train
    dist-cl-make-shards --source emoji --split heldout --out data/emoji/heldout
    dist-cl-make-shards --index-captions data/laion_100k

Sample i goes to shard i // samples-per-shard under key %09d with members .png/.jpg (image), .cls (label,
where known) and .idx (i). Resumable: a rerun with the same arguments keeps finished shards and writes the
rest. A finished output (it has shardindex.json) or one begun with other arguments is only replaced with
--force. Each shard gets an offsets table beside it (``<shard>.offsets.npy``). ``--source captions`` writes
img2dataset's layout (``00000.tar``: KEY.jpg|png|webp, KEY.txt, KEY.json) from images with ``NAME.txt``
captions beside them, ``--source emoji`` the same from Debian's emoji font and CLDR data
(dist_cl.data.emoji); ``--index-captions DIR`` adds the tables and index to img2dataset's own output and
writes nothing else. The writer is dist_cl.data.shard_writer; ``python tools/make_shards.py`` runs this
same command.
"""

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from dist_cl.config import ConfigError
from dist_cl.data.shard_writer import (
    ShardWriteError,
    Source,
    caption_folder_source,
    digits_source,
    fashion_mnist_source,
    folder_source,
    index_captions,
    make_shards,
    npz_source,
)
from dist_cl.data.shards import INDEX_NAME, ShardError


def build_source(args: argparse.Namespace) -> Source:
    if args.source == "digits":
        return digits_source(args.split, args.holdout_fraction, args.split_seed)
    if args.source == "emoji":
        from dist_cl.data.emoji import emoji_source

        return emoji_source(args.split, args.holdout_fraction, args.split_seed)
    if args.source == "fashion-mnist":
        from dist_cl.data.fashion_mnist import DEFAULT_PATH

        return fashion_mnist_source(Path(args.input or DEFAULT_PATH), args.split, args.subset, args.split_seed)
    if args.input is None:
        raise ShardWriteError(f"--source {args.source} needs --input")
    if args.source == "npz":
        return npz_source(Path(args.input))
    if args.source == "captions":
        return caption_folder_source(Path(args.input), args.mode)
    return folder_source(Path(args.input), args.mode)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dist-cl-make-shards", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=["digits", "fashion-mnist", "folder", "npz", "captions", "emoji"],
                        default="digits")
    parser.add_argument("--input", help="folder: directory of class sub-folders; npz: file with images[, labels]; "
                        "fashion-mnist: folder of the IDX files (default /usr/share/datasets/fashion-mnist); "
                        "captions: directory of images, each with NAME.txt (and optional NAME.json, NAME.cls)")
    parser.add_argument("--out", help="output directory for the shards and shardindex.json")
    parser.add_argument("--index-captions", metavar="DIR", help="index img2dataset's webdataset output folder "
                        "where it lies (offsets tables and shardindex.json beside its tars), instead of writing")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--split", choices=["train", "heldout"], default="train",
                        help="digits, fashion-mnist, emoji: which split")
    parser.add_argument("--holdout-fraction", type=float, default=0.2,
                        help="digits: as data.holdout_fraction; emoji: the fraction of each group held out")
    parser.add_argument("--split-seed", type=int, default=0, help="digits, fashion-mnist, emoji: as data.split_seed")
    parser.add_argument("--subset", type=int, default=0,
                        help="fashion-mnist: a stratified sample of this many, as data.subset / data.heldout_subset")
    parser.add_argument("--mode", choices=["RGB", "L"], default="RGB", help="folder: image mode samples are read in")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output directory")
    args = parser.parse_args(argv)
    if (args.out is None) == (args.index_captions is None):
        parser.error("pass --out to write shards, or --index-captions DIR to index img2dataset's output")
    if args.index_captions is not None:
        return run_command(lambda: index_captions(Path(args.index_captions), args.mode), args.index_captions)
    if args.samples_per_shard <= 0:
        parser.error(f"--samples-per-shard={args.samples_per_shard} must be positive")
    if args.subset < 0 or (args.subset and args.source != "fashion-mnist"):
        parser.error(f"--subset={args.subset}: a non-negative sample size, for --source fashion-mnist only")
    params = {k: v for k, v in vars(args).items() if k not in ("out", "force", "index_captions")}
    return run_command(
        lambda: make_shards(build_source(args), Path(args.out), args.samples_per_shard, params, args.force), args.out
    )


def run_command(write: Callable[[], dict], out: str) -> int:
    """Run ``write`` (it returns the index it wrote); a user error is one line on stderr and exit status 2."""
    try:
        index = write()
    except (ShardWriteError, ShardError, ConfigError) as exc:
        print(f"make_shards: error: {exc}", file=sys.stderr)
        return 2
    total = sum(shard["nsamples"] for shard in index["shardlist"])
    empty = index["dist_cl"].get("empty_shards")
    print(f"{total} samples in {len(index['shardlist'])} shards -> {Path(out) / INDEX_NAME}"
          + (f" ({len(empty)} empty shards left out: {', '.join(empty)})" if empty else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
