"""Compare batch-selection strategies on one config: train each (strategy, seed) with torchrun, then aggregate.

    python tools/compare_strategies.py                                   # digits, 4 strategies x 3 seeds
    python tools/compare_strategies.py --epochs 3 --out runs/compare-smoke
    python tools/compare_strategies.py --aggregate-only                  # tables and plot from existing runs
    python tools/compare_strategies.py --strategies sc_global-knn4:sc_global:selection.options.knn=4 \
        --out runs/compare-knob                                          # a labelled variant with its overrides
    python tools/compare_strategies.py ... -- loss.tau=0.2               # extra overrides for every run
    python tools/compare_strategies.py --composition EMB/train           # same-label share + lift of each plan
    python tools/compare_strategies.py --dry-run                         # each run's command; nothing trains

Every run goes to <out>/<label>-s<seed> (run.dir), its terminal output (every rank's) to console.log there
(the trainer writes train.log itself), its wall time, command and load average into run_info.json (beside the
trainer's record of the code and machine, dist_cl.report.run_info). A run
whose metrics.jsonl already holds the final epoch is skipped, so an interrupted comparison is resumed by
running the same command again (a run cut short is resumed from its checkpoint by launch/train.py; its
wall time then covers the last attempt only and is marked "resumed").

Aggregation (dist_cl.report.comparison) reads each run's metrics.jsonl alone: its evaluation lines (the
metrics at every evaluated epoch) and its epoch lines (training and selection seconds, selection/* figures of
every epoch), plus run_info.json and the probe where they exist. Runs of different code (commits, uncommitted
changes, or records that name none) are refused unless --mixed-commits allows them; the table then lists each
code state with its runs. It writes <out>/results.md (also printed) and
<out>/strategies.png (retrieval top-1 and kNN top-1 against epoch and against optimizer step, mean over seeds
with a min-max band).

A strategy entry is either a registered name (random, osgd, sc, sc_global, ...) or LABEL:STRATEGY[:K=V,K=V]
with dotted overrides for that entry only.
"""

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from dist_cl.config import TOOL_OUTPUTS
from dist_cl.report.comparison import (
    PROBE_NAME,
    Entry,
    MixedCodeError,
    check_one_code_state,
    collect,
    parse_entries,
    plot,
    results_table,
    run_dir,
)
from dist_cl.report.records import read_records
from dist_cl.report.run_info import update_run_info

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STRATEGIES = "random,osgd,sc,sc_global"


def finished(directory: Path, epochs: int) -> bool:
    return epochs in read_records(directory / "metrics.jsonl")


def train(entry: Entry, seed: int, args, extra: list[str]) -> None:
    directory = run_dir(args.out, entry.label, seed)
    if finished(directory, args.epochs):
        print(f"[skip] {directory} already has epoch {args.epochs}", flush=True)
        return
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
        str(ROOT / "launch" / "train.py"), "--config", str(args.config),
        f"selection.strategy={entry.strategy}", f"seed={seed}", f"train.epochs={args.epochs}",
        f"eval.every_epochs={args.eval_every}", f"run.dir={directory}", f"run.name={entry.label}-s{seed}",
        *extra, *entry.overrides,
    ]
    if args.dry_run:
        print(shlex.join(command), flush=True)
        return
    resumed = (directory / "checkpoints" / "latest").exists()
    directory.mkdir(parents=True, exist_ok=True)
    print(f"[run ] {entry.label} seed {seed}: {shlex.join(command)}", flush=True)
    load_before = os.getloadavg()
    started = time.perf_counter()
    cpu_before = os.times()
    with open(directory / "console.log", "a") as log:  # the trainer keeps rank 0's lines in train.log itself
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    wall = time.perf_counter() - started
    cpu_after = os.times()
    child_cpu = (cpu_after.children_user - cpu_before.children_user
                 + cpu_after.children_system - cpu_before.children_system)
    info = {
        "label": entry.label, "strategy": entry.strategy, "seed": seed, "command": shlex.join(command),
        "returncode": code, "wall_s": wall, "child_cpu_s": child_cpu, "resumed": resumed,
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    update_run_info(directory, info)
    print(f"[done] {entry.label} seed {seed}: rc {code}, {wall:.1f}s wall, {child_cpu:.1f}s CPU, "
          f"load {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}", flush=True)
    if code != 0:
        print(f"[fail] see {directory / 'console.log'}", flush=True)


def probe(entry: Entry, seed: int, args) -> None:
    """Linear probe of the final checkpoint (tools/evaluate.py), once per finished run."""
    directory = run_dir(args.out, entry.label, seed)
    if (directory / PROBE_NAME).is_file() or not finished(directory, args.epochs):
        return
    command = [sys.executable, str(ROOT / "tools" / "evaluate.py"), "--checkpoint", str(directory), "--json",
               str(directory / PROBE_NAME)]
    with open(directory / "probe.log", "w") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    print(f"[prob] {entry.label} seed {seed}: rc {code}", flush=True)


def aggregate(entries: list[Entry], seeds: list[int], args) -> str:
    """results.md and strategies.png from the runs' records (dist_cl.report.comparison)."""
    runs = collect(args.out, entries, seeds, args.epochs, args.batch_size)
    if not args.mixed_commits:
        check_one_code_state(runs)
    text = results_table(runs, args.reference, args.table_every, args.table_epochs)
    plot(runs, args.plot, f"{Path(args.config).name}: mean over seeds {','.join(map(str, seeds))}, band = min-max")
    args.table.parent.mkdir(parents=True, exist_ok=True)
    args.table.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", default=DEFAULT_STRATEGIES,
                        help="comma list of NAME or LABEL:STRATEGY[:key=value,...] (default %(default)s)")
    parser.add_argument("--seeds", default="0,1,2", help="comma list (default %(default)s)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--eval-every", type=int, default=5, help="eval.every_epochs (default %(default)s)")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "digits.yaml")
    parser.add_argument("--nproc", type=int, default=2, help="processes per run (default %(default)s)")
    parser.add_argument("--out", type=Path, default=TOOL_OUTPUTS / "compare",
                        help="where the runs and tables go (default %(default)s; runs/tools/ holds no trainer run)")
    parser.add_argument("--table", type=Path, help="markdown output (default <out>/results.md)")
    parser.add_argument("--plot", type=Path, help="PNG output (default <out>/strategies.png)")
    parser.add_argument("--table-every", type=int, default=5,
                        help="per-epoch tables show epochs divisible by this, and the last (default %(default)s)")
    parser.add_argument("--table-epochs", default="", help="extra epochs for the per-epoch tables, comma list")
    parser.add_argument("--composition", type=Path,
                        help="only print each strategy's batch composition on embeddings saved by "
                             "tools/extract_embeddings.py (a directory with u.npy, v.npy, labels.npy)")
    parser.add_argument("--reference", default="random",
                        help="the label the training full-batch loss is compared against (default %(default)s)")
    parser.add_argument("--mass", type=Path, nargs="+",
                        help="only print where the full-batch loss of each model puts its softmax mass, from "
                             "embeddings of the training split saved by tools/extract_embeddings.py")
    parser.add_argument("--aggregate-only", action="store_true", help="do not train; aggregate what exists")
    parser.add_argument("--mixed-commits", action="store_true",
                        help="aggregate runs of different code (commits, uncommitted changes, or no commit "
                             "recorded) into one table, which lists each code state with its runs")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the command of each run still to train, one a line; train nothing")
    parser.add_argument("overrides", nargs="*", help="extra dotted overrides for every run (or after --)")
    args = parser.parse_args(argv)
    extra = args.overrides + extra
    args.table_epochs = {int(e) for e in args.table_epochs.split(",") if e}
    args.config = args.config.resolve()  # a path from where the tool was started; the runs start in ROOT
    args.out = args.out if args.out.is_absolute() else ROOT / args.out
    args.table = args.table or args.out / "results.md"
    args.plot = args.plot or args.out / "strategies.png"
    from dist_cl.config import load_config

    entries = parse_entries(args.strategies)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    for entry in entries:  # reject a bad strategy or override before hours of training
        load_config(args.config, [f"selection.strategy={entry.strategy}", *extra, *entry.overrides])
    base = load_config(args.config, extra)
    args.batch_size = base.train.global_batch_size
    if args.mass or args.composition:  # the analyses import selection, and so torch: not for training runs
        from dist_cl.report.embedding_analysis import plan_composition, softmax_mass

        print(softmax_mass(args.mass, base.loss.tau) if args.mass else
              plan_composition(entries, seeds, args.composition, args.batch_size, base.loss.tau))
        return 0
    if not args.aggregate_only:
        started = time.perf_counter()
        for entry in entries:
            for seed in seeds:
                train(entry, seed, args, extra)
                if not args.dry_run:
                    probe(entry, seed, args)
        if args.dry_run:
            return 0
        print(f"[all ] {time.perf_counter() - started:.1f}s wall", flush=True)
    try:
        text = aggregate(entries, seeds, args)
    except MixedCodeError as err:
        print(f"error: {err}\nAggregate one code state's runs (move the others to another --out), or pass "
              "--mixed-commits to tabulate them together with this list.", file=sys.stderr)
        return 2
    print(text)
    print(f"wrote {args.table} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
