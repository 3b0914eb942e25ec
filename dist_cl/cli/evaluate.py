"""``dist-cl-evaluate``: a trained model's positive-pair retrieval, kNN top-1 and linear probe, as a table and JSON.

    dist-cl-evaluate --embeddings runs/digits/embeddings --json runs/digits/eval.json
    torchrun --standalone --nproc_per_node=2 --no-python dist-cl-evaluate \\
        --checkpoint runs/digits/checkpoints/latest

``python tools/evaluate.py`` and ``torchrun ... tools/evaluate.py`` run the same command. --embeddings reads
what dist-cl-extract-embeddings wrote (DIR/train and DIR/heldout); --checkpoint embeds
both splits itself first (sharded over the ranks, with the same flags and dotted overrides as the extraction
tool; --out also keeps the embeddings). Metrics:

    retrieval_top1, retrieval_recall{k}   held-out positive pairs (u_i, v_i): the fraction whose partner is
                                          among the k nearest by inner product, mean of u->v and v->u, over
                                          all held-out pairs (the paper's retrieval task; the training pairs
                                          where the data has no held-out split)
    image_to_text_r{k}, text_to_image_r{k}
                                          image–caption pairs (model.text_tower): each direction alone,
                                          k = 1, 5, 10, as the trainer logs them
    knn_top1                              cosine kNN (--knn-k neighbours) on backbone features, train -> held-out
    probe_top1                            logistic regression on standardised frozen backbone features,
                                          fit on the training split, scored on the held-out split

With the default (--views auto, --epoch unchanged) retrieval_top1, retrieval_recall5 and knn_top1 are the
numbers the trainer logs in metrics.jsonl for the same checkpoint.
"""

import argparse
import json
import logging
import sys
from functools import partial
from pathlib import Path

from dist_cl.cli.torchrun import run_distributed
from dist_cl.evaluate.extraction import SPLITS, add_extraction_args, extract
from dist_cl.evaluate.offline import compute_metrics, format_table, load_split
from dist_cl.runtime.distributed import DistInfo, exit_process


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dist-cl-evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--embeddings", help="directory written by dist-cl-extract-embeddings (train/, heldout/)")
    source.add_argument("--checkpoint", help="checkpoint file, checkpoints/latest, checkpoints or run directory")
    parser.add_argument("--out", help="--checkpoint: also save the embeddings here, as dist-cl-extract-embeddings does")
    parser.add_argument("--json", help="write the metrics (and where they came from) to this JSON file")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10], help="retrieval recall@k (default: 1 5 10)")
    parser.add_argument("--knn-k", type=int, default=None,
                        help="kNN neighbours (default: eval.knn_k of the checkpoint's config, else 20)")
    parser.add_argument("--no-probe", action="store_true", help="skip the linear probe (slow on large sets)")
    parser.add_argument("--probe-c", type=float, default=1.0, help="inverse L2 strength of the probe")
    parser.add_argument("--probe-max-iter", type=int, default=1000, help="lbfgs iterations of the probe")
    add_extraction_args(parser)
    args = parser.parse_args(argv)
    if args.embeddings and args.overrides:
        parser.error("dotted overrides only apply with --checkpoint")
    if any(k < 1 for k in args.ks):
        parser.error(f"--ks {args.ks}: every k must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    if args.checkpoint:
        return run_distributed(partial(evaluate_checkpoint, args))
    root = Path(args.embeddings)
    splits = {split: load_split(root / split) for split in SPLITS}
    if all(s is None for s in splits.values()):
        print(f"error: {root} has neither train/ nor heldout/ embeddings; run dist-cl-extract-embeddings "
              f"--out {root}", file=sys.stderr)
        return 2
    meta = json.loads(next((root / s / "meta.json").read_text() for s in SPLITS if splits[s] is not None))
    source = {"embeddings": str(root.resolve()), "checkpoint": meta["checkpoint"], "step": meta["step"]}
    return report(args, splits, source, args.knn_k or 20, image_text=bool(meta.get("text_tower")))


def evaluate_checkpoint(args: argparse.Namespace, info: DistInfo) -> int:
    """Every rank embeds its share of both splits; rank 0 reports."""
    logging.getLogger("dist_cl").setLevel(logging.INFO if info.is_main else logging.WARNING)
    splits, state = extract(
        args.checkpoint, Path(args.out) if args.out else None, info, views=args.views, epoch=args.epoch,
        batch_size=args.batch_size, chunk_size=args.chunk_size, overrides=args.overrides,
    )
    if not info.is_main:
        return 0
    source = {"checkpoint": state["path"], "step": state["step"]}
    return report(args, splits, source, args.knn_k or state["config"]["eval"]["knn_k"],
                  image_text=bool(state["config"]["model"]["text_tower"]))


def report(args: argparse.Namespace, splits: dict, source: dict, knn_k: int, image_text: bool) -> int:
    """Print the metrics as a table, and write them to --json if asked."""
    metrics = compute_metrics(splits.get("train"), splits.get("heldout"), ks=tuple(args.ks), knn_k=knn_k,
                              probe=not args.no_probe, probe_c=args.probe_c, probe_max_iter=args.probe_max_iter,
                              image_text=image_text)
    print(f"{source['checkpoint']} (step {source['step']})")
    print(format_table(metrics))
    if args.json:
        record = {**source, "knn_k": knn_k, "metrics": metrics}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


def run() -> None:
    """The ``dist-cl-evaluate`` script: ``main``, then the end that gloo needs (``exit_process``, not sys.exit)."""
    exit_process(main())


if __name__ == "__main__":
    run()
