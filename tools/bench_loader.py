"""Samples/s of a training set through a DataLoader: plan order (random indices) against sequential order.

    python tools/bench_loader.py --path data/digits/train --workers 0 2 --repeats 5
    python tools/bench_loader.py --config configs/fashion_mnist.yaml --workers 0 --repeats 5

--path reads ShardPairs (default augmentation, --image-size); --config the configured data set's training split.

A plan batch is B random indices, as a BatchPlan hands them out. Each (order, workers) pair gets one
loader with persistent workers and an untimed warm-up pass (opens the shards, fills the page cache),
then --repeats timed passes over --max-samples indices, alternating the orders pass by pass; the table
shows the median. On a shared machine the CPU rate (samples per CPU second, 0 workers only) is the
steadier measure of what an order costs. --decode-only leaves out the augmentation.
"""

import argparse
import statistics
import sys
import time

import numpy as np
from torch.utils.data import DataLoader, Dataset

from dist_cl.config import AugmentConfig, load_config
from dist_cl.data import build_dataset
from dist_cl.data.pairs import PairDataset
from dist_cl.data.shards import ShardPairs


class Decoded(Dataset):
    """Sample i as loaded (a decoded PIL image for shards) only: isolates access from the augmentation cost."""

    def __init__(self, pairs: PairDataset):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        return self.pairs.load(index)


def batches(order: np.ndarray, batch_size: int) -> list[list[int]]:
    return [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]


def samples_per_second(loader: DataLoader, num_samples: int) -> tuple[float, float]:
    """Per wall second, and per CPU second of this process (the work itself when there are no workers)."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in loader:
        pass
    return num_samples / (time.perf_counter() - wall), num_samples / (time.process_time() - cpu)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--path", help="shard directory (holding shardindex.json)")
    source.add_argument("--config", help="a run config: its training split, as the trainer builds it")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts to try")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--max-samples", type=int, default=4096, help="samples per timed pass (0: all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--open-shards", type=int, default=0, help="shards open per process; 0: as many as fit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--decode-only", action="store_true", help="time reading and decoding, no augmentation")
    args = parser.parse_args(argv)

    if args.config:
        ds = build_dataset(load_config(args.config, [f"seed={args.seed}"]), "train")
    else:
        ds = ShardPairs(args.path, AugmentConfig(), args.image_size, seed=args.seed, open_shards=args.open_shards)
    data = Decoded(ds) if args.decode_only else ds
    n = min(len(ds), args.max_samples) if args.max_samples else len(ds)
    orders = {
        "sequential": np.arange(n),
        "plan": np.random.default_rng(args.seed).permutation(len(ds))[:n],
    }
    where = args.config or f"{args.path} ({len(ds.shards)} shards, image {args.image_size})"
    print(f"{where}: {len(ds)} samples, {n} per pass, batch {args.batch_size}, {args.repeats} timed passes"
          f"{', decode only' if args.decode_only else ''}")
    print(f"{'workers':>7}  {'order':<10}  {'median/s':>9}  {'min/s':>8}  {'max/s':>8}  {'cpu/s':>8}  plan/seq")
    for workers in args.workers:
        loaders = {
            name: DataLoader(data, batch_sampler=batches(order, args.batch_size), num_workers=workers,
                             persistent_workers=workers > 0, collate_fn=list if args.decode_only else ds.collate)
            for name, order in orders.items()
        }
        runs = {name: [] for name in loaders}
        for loader in loaders.values():
            samples_per_second(loader, n)
        # Alternate the orders so that load from other processes hits both alike.
        for _ in range(args.repeats):
            for name, loader in loaders.items():
                runs[name].append(samples_per_second(loader, n))
        medians = {name: statistics.median(w for w, _ in r) for name, r in runs.items()}
        for name, r in runs.items():
            wall = [w for w, _ in r]
            cpu = f"{statistics.median(c for _, c in r):.0f}" if workers == 0 else "-"
            ratio = f"{medians['plan'] / medians['sequential']:.2f}" if name == "plan" else ""
            print(f"{workers:>7}  {name:<10}  {medians[name]:>9.0f}  {min(wall):>8.0f}  {max(wall):>8.0f}  "
                  f"{cpu:>8}  {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
