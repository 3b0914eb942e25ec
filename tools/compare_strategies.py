"""Compare batch-selection strategies on one config: train each (strategy, seed) with torchrun, then aggregate.

    python tools/compare_strategies.py                                   # digits, 4 strategies x 3 seeds
    python tools/compare_strategies.py --epochs 3 --out runs/compare-smoke
    python tools/compare_strategies.py --aggregate-only                  # tables and plot from existing runs
    python tools/compare_strategies.py --strategies sc_global-knn4:sc_global:selection.options.knn=4 \
        --out runs/compare-knob                                          # a labelled variant with its overrides
    python tools/compare_strategies.py ... -- loss.tau=0.2               # extra overrides for every run
    python tools/compare_strategies.py --composition EMB/train           # same-label share + lift of each plan

Every run goes to <out>/<label>-s<seed> (run.dir), its rank-0 log to train.log there and its wall time,
command and load average to run_info.json. A run whose metrics.jsonl already holds the final epoch is
skipped, so an interrupted comparison is resumed by running the same command again (a run cut short is
resumed from its checkpoint by launch/train.py; its wall time then covers the last attempt only and is
marked "resumed").

Aggregation reads metrics.jsonl (held-out retrieval top-1 and kNN top-1 at every evaluated epoch), the
TensorBoard scalars selection/seconds, selection/share and selection/lift of every epoch, and the per-epoch
training time from train.log. It writes <out>/results.md (also printed) and <out>/strategies.png
(retrieval top-1 and kNN top-1 against epoch and against optimizer step, mean over seeds with a min-max band).

A strategy entry is either a registered name (random, osgd, sc, sc_global, ...) or LABEL:STRATEGY[:K=V,K=V]
with dotted overrides for that entry only.
"""

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STRATEGIES = "random,osgd,sc,sc_global"
EPOCH_LINE = re.compile(
    r"epoch (\d+) step (\d+) \| data ([\d.]+)s total ([\d.]+)s \| .* \| selection ([\d.]+)s"
)


@dataclass
class Entry:
    label: str
    strategy: str
    overrides: list[str] = field(default_factory=list)


def parse_entry(text: str) -> Entry:
    parts = text.split(":")
    if len(parts) == 1:
        return Entry(parts[0], parts[0])
    if len(parts) in (2, 3):
        overrides = [o for o in parts[2].split(",") if o] if len(parts) == 3 else []
        return Entry(parts[0], parts[1], overrides)
    raise SystemExit(f"bad strategy entry {text!r}: use NAME or LABEL:STRATEGY[:key=value,key=value]")


def run_dir(out: Path, label: str, seed: int) -> Path:
    return out / f"{label}-s{seed}"


def read_metrics(path: Path) -> dict[int, dict]:
    """Evaluation records by epoch; a resumed run may repeat an epoch, the last record wins."""
    records = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                records[int(record["epoch"])] = record
    return records


def finished(directory: Path, epochs: int) -> bool:
    return epochs in read_metrics(directory / "metrics.jsonl")


def train(entry: Entry, seed: int, args, extra: list[str]) -> None:
    directory = run_dir(args.out, entry.label, seed)
    if finished(directory, args.epochs):
        print(f"[skip] {directory} already has epoch {args.epochs}", flush=True)
        return
    resumed = (directory / "checkpoints" / "latest").exists()
    directory.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
        str(ROOT / "launch" / "train.py"), "--config", str(args.config),
        f"selection.strategy={entry.strategy}", f"seed={seed}", f"train.epochs={args.epochs}",
        f"eval.every_epochs={args.eval_every}", f"run.dir={directory}", f"run.name={entry.label}-s{seed}",
        *extra, *entry.overrides,
    ]
    print(f"[run ] {entry.label} seed {seed}: {shlex.join(command)}", flush=True)
    load_before = os.getloadavg()
    started = time.perf_counter()
    cpu_before = os.times()
    with open(directory / "train.log", "a") as log:
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
    (directory / "run_info.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"[done] {entry.label} seed {seed}: rc {code}, {wall:.1f}s wall, {child_cpu:.1f}s CPU, "
          f"load {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}", flush=True)
    if code != 0:
        print(f"[fail] see {directory / 'train.log'}", flush=True)


def read_scalars(directory: Path) -> dict[str, dict[int, float]]:
    """TensorBoard scalars selection/* by step (last write wins)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    tb = directory / "tb"
    if not tb.is_dir():
        return out
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    for tag in acc.Tags().get("scalars", []):
        if tag.startswith("selection/"):
            out[tag] = {e.step: e.value for e in acc.Scalars(tag)}
    return out


def read_epoch_times(directory: Path) -> dict[int, tuple[int, float, float]]:
    """epoch -> (step at its end, training seconds, selection seconds) from rank 0's log."""
    times = {}
    log = directory / "train.log"
    if log.is_file():
        for match in EPOCH_LINE.finditer(log.read_text(errors="replace")):
            epoch, step, _, total, selection = match.groups()
            times[int(epoch)] = (int(step), float(total), float(selection))
    return times


def summarise_run(directory: Path, epochs: int, batch_size: int) -> dict | None:
    metrics = read_metrics(directory / "metrics.jsonl")
    if epochs not in metrics:
        return None
    info_path = directory / "run_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    scalars = read_scalars(directory)
    lift = list(scalars.get("selection/lift", {}).values())
    loss_aware_steps = set(scalars.get("selection/lift", {}))
    sel = scalars.get("selection/seconds", {})
    share = scalars.get("selection/share", {})
    times = read_epoch_times(directory)
    final = metrics[epochs]
    return {
        "epochs": sorted(metrics),
        "retrieval": {e: r["retrieval_top1"] for e, r in metrics.items()},
        "knn": {e: r.get("knn_top1", float("nan")) for e, r in metrics.items()},
        "fbl": {e: r.get("full_batch_loss", float("nan")) for e, r in metrics.items()},
        "step": {e: r["step"] for e, r in metrics.items()},
        "final_step": final["step"],
        "samples": final["step"] * batch_size,
        "wall_s": info.get("wall_s", float("nan")),
        "cpu_s": info.get("child_cpu_s", float("nan")),
        "load": float(np.mean([info["loadavg_before"][0], info["loadavg_after"][0]])) if info else float("nan"),
        "resumed": info.get("resumed", False),
        "train_s": sum(t[1] for t in times.values()) if times else float("nan"),
        "selection_total_s": sum(sel.values()) if sel else 0.0,
        # per loss-aware epoch (the epochs that wrote a lift); the random warm-up epochs cost ~0
        "selection_s": float(np.mean([sel[s] for s in loss_aware_steps if s in sel])) if loss_aware_steps else
        (float(np.mean(list(sel.values()))) if sel else 0.0),
        "share": float(np.mean([share[s] for s in loss_aware_steps if s in share])) if loss_aware_steps else
        (float(np.mean(list(share.values()))) if share else 0.0),
        "lift": float(np.mean(lift)) if lift else float("nan"),
        "loss_aware_epochs": len(loss_aware_steps),
    }


def mean_std(values) -> str:
    values = np.asarray([v for v in values if v == v], dtype=float)
    if len(values) == 0:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"


def aggregate(entries: list[Entry], seeds: list[int], args) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs: dict[str, list[dict]] = {}
    missing = []
    for entry in entries:
        for seed in seeds:
            summary = summarise_run(run_dir(args.out, entry.label, seed), args.epochs, args.batch_size)
            if summary is None:
                missing.append(f"{entry.label}-s{seed}")
            else:
                runs.setdefault(entry.label, []).append(summary)
    lines = [f"Final epoch {args.epochs}; mean ± std (sample std) over seeds {','.join(map(str, seeds))}; "
             f"global batch {args.batch_size}. wall s: the torchrun command (start-up, training, every evaluation, "
             "checkpoints); CPU s: user+system of all its processes; load: 1-min load average around the run; "
             "train s: sum of the epochs' training loops; selection s and share: mean over the loss-aware "
             "epochs (after selection.warmup_epochs); lift: plan loss / random-partition loss, same epochs.", ""]
    lines += [
        "| strategy | seeds | retrieval top-1 | kNN top-1 | held-out full-batch loss | steps | samples seen | "
        "wall s | CPU s | load | train s | selection s / loss-aware epoch | selection share | lift |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in entries:
        rs = runs.get(entry.label, [])
        if not rs:
            continue
        resumed = " (resumed)" if any(r["resumed"] for r in rs) else ""
        lifts = [r["lift"] for r in rs if r["lift"] == r["lift"]]
        lift = f"{np.mean(lifts):.3f}" if lifts else "-"
        lines.append(
            f"| {entry.label} | {len(rs)} | {mean_std(r['retrieval'][args.epochs] for r in rs)} | "
            f"{mean_std(r['knn'][args.epochs] for r in rs)} | {mean_std(r['fbl'][args.epochs] for r in rs)} | "
            f"{np.mean([r['final_step'] for r in rs]):.0f} | "
            f"{np.mean([r['samples'] for r in rs]):.0f} | {np.mean([r['wall_s'] for r in rs]):.1f}{resumed} | "
            f"{np.mean([r['cpu_s'] for r in rs]):.1f} | {np.mean([r['load'] for r in rs]):.1f} | "
            f"{np.mean([r['train_s'] for r in rs]):.1f} | {np.mean([r['selection_s'] for r in rs]):.3f} | "
            f"{np.mean([r['share'] for r in rs]):.3f} | {lift} |"
        )
    # per evaluated epoch
    epochs = sorted(set().union(*[set(r["epochs"]) for rs in runs.values() for r in rs])) if runs else []
    epochs = [e for e in epochs if e % args.table_every == 0 or e == args.epochs or e in args.table_epochs]
    for key, name in (("retrieval", "Held-out retrieval top-1"), ("knn", "kNN top-1"),
                      ("fbl", "Held-out full-batch InfoNCE (360 pairs)")):
        lines += ["", f"{name} per evaluated epoch (mean over seeds; step in brackets):", "",
                  "| strategy | " + " | ".join(f"ep {e}" for e in epochs) + " |",
                  "|---|" + "---|" * len(epochs)]
        for entry in entries:
            rs = runs.get(entry.label, [])
            if not rs:
                continue
            cells = []
            for e in epochs:
                vals = [r[key][e] for r in rs if e in r[key]]
                steps = [r["step"][e] for r in rs if e in r["step"]]
                cells.append(f"{np.mean(vals):.3f} [{np.mean(steps):.0f}]" if vals else "-")
            lines.append(f"| {entry.label} | " + " | ".join(cells) + " |")
    if missing:
        lines += ["", f"Missing or unfinished runs: {', '.join(missing)}"]
    text = "\n".join(lines) + "\n"

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharey="row")
    for entry in entries:
        rs = runs.get(entry.label, [])
        if not rs:
            continue
        common = sorted(set.intersection(*[set(r["epochs"]) for r in rs]))
        for row, (key, name) in enumerate((("retrieval", "held-out retrieval top-1"), ("knn", "kNN top-1"))):
            vals = np.array([[r[key][e] for e in common] for r in rs])
            steps = np.array([[r["step"][e] for e in common] for r in rs]).mean(axis=0)
            mean = vals.mean(axis=0)
            for col, x in enumerate((np.array(common), steps)):
                ax = axes[row, col]
                (line,) = ax.plot(x, mean, marker="o", ms=3, label=f"{entry.label} (n={len(rs)})")
                ax.fill_between(x, vals.min(axis=0), vals.max(axis=0), color=line.get_color(), alpha=0.2)
                ax.set_ylabel(name)
                ax.set_xlabel("epoch" if col == 0 else "optimizer step (global batches)")
                ax.grid(alpha=0.3)
    axes[0, 0].set_title("against epoch (equal epochs)")
    axes[0, 1].set_title("against step (equal steps)")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"{Path(args.config).name}: mean over seeds {','.join(map(str, seeds))}, band = min-max")
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=110)
    args.table.parent.mkdir(parents=True, exist_ok=True)
    args.table.write_text(text)
    return text


def composition(entries: list[Entry], seeds: list[int], directory: Path, batch_size: int, tau: float) -> str:
    """Batch composition of each strategy's plan on fixed embeddings (tools/extract_embeddings.py output):
    the share of same-label pairs in a batch (false negatives for a class-level metric) and the lift."""
    import yaml

    from dist_cl.selection import lift, select_batches

    u, v = np.load(directory / "u.npy"), np.load(directory / "v.npy")
    labels = np.load(directory / "labels.npy")
    u, v = u / np.linalg.norm(u, axis=1, keepdims=True), v / np.linalg.norm(v, axis=1, keepdims=True)
    lines = [f"Plans on the embeddings in {directory} (B = {batch_size}, tau = {tau}), mean over seeds "
             f"{','.join(map(str, seeds))}:", "",
             "| strategy | batches | same-label pairs in a batch | lift |", "|---|---|---|---|"]
    for entry in entries:
        options = {o.split("=", 1)[0].removeprefix("selection.options."): yaml.safe_load(o.split("=", 1)[1])
                   for o in entry.overrides if o.startswith("selection.options.")}
        shares, lifts, sizes = [], [], []
        for seed in seeds:
            plan = select_batches(entry.strategy, u, v, batch_size, seed=seed, tau=tau, **options)
            same = (labels[plan][:, :, None] == labels[plan][:, None, :]).sum(axis=(1, 2)) - batch_size
            shares.append(float(np.mean(same / (batch_size * (batch_size - 1)))))
            lifts.append(lift(u, v, plan, tau=tau, seed=seed))
            sizes.append(len(plan))
        lines.append(f"| {entry.label} | {np.mean(sizes):.0f} | {np.mean(shares):.3f} | {np.mean(lifts):.3f} |")
    return "\n".join(lines) + "\n"


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
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    parser.add_argument("--table", type=Path, help="markdown output (default <out>/results.md)")
    parser.add_argument("--plot", type=Path, help="PNG output (default <out>/strategies.png)")
    parser.add_argument("--table-every", type=int, default=5,
                        help="per-epoch tables show epochs divisible by this, and the last (default %(default)s)")
    parser.add_argument("--table-epochs", default="", help="extra epochs for the per-epoch tables, comma list")
    parser.add_argument("--composition", type=Path,
                        help="only print each strategy's batch composition on embeddings saved by "
                             "tools/extract_embeddings.py (a directory with u.npy, v.npy, labels.npy)")
    parser.add_argument("--aggregate-only", action="store_true", help="do not train; aggregate what exists")
    parser.add_argument("overrides", nargs="*", help="extra dotted overrides for every run (or after --)")
    args = parser.parse_args(argv)
    extra = args.overrides + extra
    args.table_epochs = {int(e) for e in args.table_epochs.split(",") if e}
    args.out = args.out if args.out.is_absolute() else ROOT / args.out
    args.table = args.table or args.out / "results.md"
    args.plot = args.plot or args.out / "strategies.png"
    from dist_cl.config import load_config

    entries = [parse_entry(s) for s in args.strategies.split(",") if s]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    for entry in entries:  # reject a bad strategy or override before hours of training
        load_config(args.config, [f"selection.strategy={entry.strategy}", *extra, *entry.overrides])
    base = load_config(args.config, extra)
    args.batch_size = base.train.global_batch_size
    if args.composition:
        print(composition(entries, seeds, args.composition, args.batch_size, base.loss.tau))
        return 0
    if not args.aggregate_only:
        started = time.perf_counter()
        for entry in entries:
            for seed in seeds:
                train(entry, seed, args, extra)
        print(f"[all ] {time.perf_counter() - started:.1f}s wall", flush=True)
    text = aggregate(entries, seeds, args)
    print(text)
    print(f"wrote {args.table} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
