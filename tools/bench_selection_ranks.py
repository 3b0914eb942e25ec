"""sc_global split over the ranks of a torchrun job: seconds per plan against the world size.

    torchrun --standalone --nproc_per_node=2 tools/bench_selection_ranks.py --sizes 100000 1000000
    python tools/bench_selection_ranks.py --sizes 100000 1000000          # one rank, for comparison

Every rank holds the same clustered embeddings (tools/clustered.py), as every rank holds
the same bank in training; the k-means assignment and the cells are dealt over the ranks
(dist_cl.runtime.distributed.distributed_map), the plan is checked identical on all ranks, and rank 0 prints
the median seconds of --repeats plans.
"""

import argparse
import statistics
import time
from functools import partial

import numpy as np
import torch.distributed as dist
from clustered import clustered_pairs

from dist_cl.cli.torchrun import run_distributed
from dist_cl.plan.sampler import BatchPlan
from dist_cl.runtime.distributed import DistInfo, check_same_on_all_ranks, distributed_map, exit_process
from dist_cl.selection import select_batches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--tau", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=3)
    return run_distributed(partial(bench, parser.parse_args(argv)))


def bench(args: argparse.Namespace, info: DistInfo) -> int:
    if info.is_main:
        print(f"{'ranks':>5} {'N':>8} {'d':>4} {'B':>4} {'seconds':>9} {'runs':>5}", flush=True)
    for n in args.sizes:
        u, v = clustered_pairs(n, args.dim, seed=0)
        seconds = []
        for repeat in range(args.repeats):
            dist.barrier()
            started = time.perf_counter()
            plan = select_batches("sc_global", u, v, args.batch_size, seed=repeat, tau=args.tau, map_fn=distributed_map)
            seconds.append(time.perf_counter() - started)
            check_same_on_all_ranks("plan", BatchPlan(np.asarray(plan), 0, "sc_global").digest())
        if info.is_main:
            print(f"{info.world_size:>5} {n:>8} {args.dim:>4} {args.batch_size:>4} {statistics.median(seconds):>9.2f} "
                  f"{args.repeats:>5}", flush=True)
    return 0


if __name__ == "__main__":
    exit_process(main())
