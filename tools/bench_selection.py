"""Benchmark batch-selection strategies: seconds, lift and peak memory on one table.

    python tools/bench_selection.py                       # clustered synthetic, N = 10k, 100k; B = 32, 256
    python tools/bench_selection.py --big                 # adds N = 1M (sc_global and random only)
    python tools/bench_selection.py --all                 # osgd_kb, sc, sc_c8 above N = 100k too
    python tools/bench_selection.py --embeddings e.npz    # real embeddings: arrays u, v of shape (N, d)
    python tools/bench_selection.py --sizes 1000000 --batch-sizes 256 --strategies sc_global --phases
                                                          # adds sc_global's seconds by phase (PHASES)

Every run is a fresh subprocess, so "peak MiB" is that process's peak resident memory above its
resident memory once the embeddings are loaded (the strategy's own footprint). Seconds are the median
of --repeats runs; lift (docs/DESIGN.md §4) is scored once, in float64, against a random partition.
"""

import argparse
import cProfile
import multiprocessing
import pstats
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from clustered import clustered_pairs, unit_rows

from dist_cl.config.strategies import STRATEGIES
from dist_cl.selection import lift, select_batches

VARIANTS = {
    "random": ("random", {}),
    "osgd_kb": ("osgd", {"k": None}),
    "sc": ("sc", {}),
    "sc_c8": ("sc", {"chunk_batches": 8}),
    "sc_global": ("sc_global", {}),
}
"""Table rows: label -> (strategy, options). osgd_kb gets an explicit k = min(1500, N // B), which forces
the chunked "kb" form; sc is the paper's chunks of 40 B, sc_c8 the same method on chunks of 8 B (the
size of an sc_global cell at B = 256), so chunking and the method can be told apart."""
PHASES = {
    "k-means cells": ("sc_global.py", "kmeans_cells"),
    "cell kNN": ("knn.py", "cross_knn"),
    "sparse affinity": ("sc_global.py", "sparse_loss_affinity"),
    "eigensolver": ("balanced.py", "diffusion_embedding"),
    "balancing": ("balanced.py", "balanced_spectral_partition"),
}
"""--phases rows: phase -> (file, function) whose cumulative profiled seconds it is, summed over the threads
that ran it (sc_global's cells run side by side, so the phases can add up to more than the wall time). Balancing
is the recursive bisection less its eigensolver."""
SLOW_AT_SCALE = {"osgd_kb": 100_000, "sc": 100_000, "sc_c8": 100_000}
"""Above this N a row runs only with --all: the chunked dense strategies take many minutes there."""


def _memory_mib(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident since the last reset) of this process, in MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def phase_seconds(profiles: list[cProfile.Profile]) -> dict[str, float]:
    """Seconds of each of PHASES in ``profiles`` (cumulative, so recursion counts once), over all of them."""
    cumulative = {(Path(file).name, function): stats[3]
                  for (file, _, function), stats in pstats.Stats(*profiles).stats.items()}
    seconds = {phase: cumulative.get(key, 0.0) for phase, key in PHASES.items()}
    seconds["balancing"] -= seconds["eigensolver"]
    return seconds


def profile_threads() -> list[cProfile.Profile]:
    """Profiles of this thread and of every thread it starts from now on (one each), enabled."""
    profiles = [cProfile.Profile()]

    def start_in_thread(*_):
        profiles.append(cProfile.Profile())
        profiles[-1].enable()  # replaces this hook for the rest of the thread

    threading.setprofile(start_in_thread)
    profiles[0].enable()
    return profiles


def _run_once(path: str, name: str, batch_size: int, tau: float, seed: int, options: dict, phases: bool,
              out) -> None:
    """Child process: load, select once, send back (seconds, peak MiB above the loaded state, plan, seconds
    by phase where ``phases``, profiled, else None)."""
    data = np.load(path)
    u, v = data["u"], data["v"]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM, so loading the file's transient buffers does not count
    baseline = _memory_mib("VmRSS")
    profiles = profile_threads() if phases else []
    start = time.perf_counter()
    plan = select_batches(name, u, v, batch_size, seed=seed, tau=tau, **options)
    seconds = time.perf_counter() - start
    for profile in profiles:
        profile.disable()
    out.send((seconds, _memory_mib("VmHWM") - baseline, plan, phases and phase_seconds(profiles)))


def measure(path: str, name: str, batch_size: int, tau: float, seed: int, options: dict, timeout: float,
            phases: bool = False) -> tuple[float, float, np.ndarray, dict | None] | None:
    """One strategy run in a fresh process; None when it ran past ``timeout`` seconds."""
    receive, send = multiprocessing.Pipe(duplex=False)
    child = multiprocessing.get_context("spawn").Process(
        target=_run_once, args=(path, name, batch_size, tau, seed, options, phases, send))
    child.start()
    send.close()  # so a crashed child shows as end-of-file here instead of a wait until the timeout
    try:
        if not receive.poll(timeout):
            child.terminate()
            child.join()
            return None
        result = receive.recv()
    except EOFError:
        child.join()
        raise RuntimeError(f"{name} failed in its subprocess (exit code {child.exitcode}); see its traceback") from None
    child.join()
    return result


def bench(u: np.ndarray, v: np.ndarray, label: str, batch_sizes: list[int], strategies: list[str], args) -> None:
    n, d = u.shape
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "embeddings.npz")
        np.savez(path, u=u, v=v)
        for batch_size in batch_sizes:
            for row in strategies:
                name, options = VARIANTS[row][0], dict(VARIANTS[row][1])
                if n > SLOW_AT_SCALE.get(row, n) and not args.all:
                    print(f"{row:<10} {label:<10} {n:>8} {d:>4} {batch_size:>4}  "
                          f"skipped above N={SLOW_AT_SCALE[row]} (--all)")
                    continue
                if "k" in options:
                    options["k"] = min(1500, n // batch_size)
                runs = []
                for repeat in range(args.repeats if n <= args.repeat_max_n else 1):
                    result = measure(path, name, batch_size, args.tau, args.seed + repeat, options, args.timeout,
                                     args.phases)
                    if result is None:
                        break
                    runs.append(result)
                if not runs:
                    print(f"{row:<10} {label:<10} {n:>8} {d:>4} {batch_size:>4}  timed out after {args.timeout:.0f} s")
                    continue
                seconds = statistics.median(r[0] for r in runs)
                peak = max(r[1] for r in runs)
                plan_lift = lift(u, v, runs[0][2], args.tau, seed=args.seed + 10_000)
                print(f"{row:<10} {label:<10} {n:>8} {d:>4} {batch_size:>4} {seconds:>9.2f} {plan_lift:>7.3f} "
                      f"{peak:>9.0f} {len(runs):>5}", flush=True)
                if args.phases:
                    print_phases([r[3] for r in runs], seconds)


def print_phases(runs: list[dict[str, float]], wall: float) -> None:
    """Each phase's median seconds over the runs and its share of the median wall time."""
    for phase in runs[0]:
        seconds = statistics.median(run[phase] for run in runs)
        print(f"    {phase:<16} {seconds:>8.2f} s {100 * seconds / wall:>5.1f}% of the wall time")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embeddings", type=Path, help="npz file with arrays u and v (N, d); L2-normalised here")
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--big", action="store_true", help="also N = 1,000,000")
    parser.add_argument("--all", action="store_true", help="run osgd and sc above 100k too")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--tau", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell; seconds is their median")
    parser.add_argument("--repeat-max-n", type=int, default=20_000, help="larger N run once")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds before a run is abandoned")
    parser.add_argument("--strategies", nargs="+", default=list(VARIANTS), help="rows of VARIANTS to run")
    parser.add_argument("--phases", action="store_true",
                        help="profile each run and print sc_global's seconds by phase (PHASES; cProfile adds a little)")
    args = parser.parse_args(argv)

    strategies = []
    for row in args.strategies:
        if row not in VARIANTS:
            parser.error(f"unknown row {row!r}; choose from {', '.join(VARIANTS)}")
        if VARIANTS[row][0] in STRATEGIES:
            strategies.append(row)
        else:
            print(f"note: strategy {VARIANTS[row][0]!r} is not registered in dist_cl.selection; {row} skipped")
    print(f"{'strategy':<10} {'data':<10} {'N':>8} {'d':>4} {'B':>4} {'seconds':>9} {'lift':>7} "
          f"{'peak MiB':>9} {'runs':>5}")
    if args.embeddings:
        data = np.load(args.embeddings)
        u, v = unit_rows(data["u"].astype(np.float32)), unit_rows(data["v"].astype(np.float32))
        bench(u, v, args.embeddings.stem[:10], args.batch_sizes, strategies, args)
        return
    for n in args.sizes + ([1_000_000] if args.big else []):
        u, v = clustered_pairs(n, args.dim, seed=args.seed)
        bench(u, v, "clustered", args.batch_sizes, strategies, args)


if __name__ == "__main__":
    sys.exit(main())
