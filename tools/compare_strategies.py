"""Compare batch-selection strategies on one config: train each (strategy, seed) with torchrun, then aggregate.

    python tools/compare_strategies.py                                   # digits, 4 strategies x 3 seeds
    python tools/compare_strategies.py --epochs 3 --out runs/compare-smoke
    python tools/compare_strategies.py --aggregate-only                  # tables and plot from existing runs
    python tools/compare_strategies.py --strategies sc_global-knn4:sc_global:selection.options.knn=4 \
        --out runs/compare-knob                                          # a labelled variant with its overrides
    python tools/compare_strategies.py ... -- loss.tau=0.2               # extra overrides for every run
    python tools/compare_strategies.py --composition EMB/train           # same-label share + lift of each plan

Every run goes to <out>/<label>-s<seed> (run.dir), its terminal output (every rank's) to console.log there
(the trainer writes train.log itself), its wall time, command and load average to run_info.json. A run
whose metrics.jsonl already holds the final epoch is skipped, so an interrupted comparison is resumed by
running the same command again (a run cut short is resumed from its checkpoint by launch/train.py; its
wall time then covers the last attempt only and is marked "resumed").

Aggregation reads each run's metrics.jsonl alone: its evaluation lines (the metrics at every evaluated
epoch) and its epoch lines (training and selection seconds, selection/* figures of every epoch), plus
run_info.json and the probe where they exist. It writes <out>/results.md (also printed) and <out>/strategies.png
(retrieval top-1 and kNN top-1 against epoch and against optimizer step, mean over seeds with a min-max band).

A strategy entry is either a registered name (random, osgd, sc, sc_global, ...) or LABEL:STRATEGY[:K=V,K=V]
with dotted overrides for that entry only.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dist_cl.config import TOOL_OUTPUTS

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STRATEGIES = "random,osgd,sc,sc_global"
PROBE_NAME = "probe.json"


@dataclass
class Entry:
    label: str
    strategy: str
    overrides: list[str] = field(default_factory=list)


def parse_entry(text: str) -> Entry:
    parts = text.split(":", 2)
    if len(parts) == 1:
        return Entry(parts[0], parts[0])
    overrides = [o for o in parts[2].split(",") if o] if len(parts) == 3 else []
    if any("=" not in o for o in overrides):
        raise SystemExit(f"bad strategy entry {text!r}: use NAME or LABEL:STRATEGY[:key=value,key=value]")
    return Entry(parts[0], parts[1], overrides)


def parse_entries(text: str) -> list[Entry]:
    """``--strategies``: entries and their overrides share the comma, so a piece with '=' before any ':'
    (``loss.hcl_beta=1.0``) is one more override of the labelled entry before it, anything else a new entry."""
    entries: list[Entry] = []
    labelled = False  # whether the last entry was written LABEL:STRATEGY[...], the only kind overrides follow
    for piece in (p for p in text.split(",") if p):
        if "=" in piece and (":" not in piece or piece.index("=") < piece.index(":")):
            if not labelled:
                raise SystemExit(f"bad strategy entry {piece!r}: overrides follow a LABEL:STRATEGY:key=value entry")
            entries[-1].overrides.append(piece)
        else:
            entries.append(parse_entry(piece))
            labelled = ":" in piece
    return entries


def run_dir(out: Path, label: str, seed: int) -> Path:
    return out / f"{label}-s{seed}"


def read_metrics(path: Path, kind: str = "eval") -> dict[int, dict]:
    """metrics.jsonl records of ``kind`` ('eval' or 'epoch') by epoch; a resumed run may repeat an epoch,
    the last record wins."""
    records = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if record.get("kind", "eval") == kind:
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
    (directory / "run_info.json").write_text(json.dumps(info, indent=1) + "\n")
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


def read_probe(directory: Path) -> float:
    path = directory / PROBE_NAME
    return json.loads(path.read_text())["metrics"].get("probe_top1", float("nan")) if path.is_file() else float("nan")


METRICS = (  # (key in a run summary, metrics.jsonl field, table heading)
    ("train_fbl", "train_full_batch_loss", "train full-batch loss"),
    ("train_r1", "train_retrieval_top1", "train R@1"),
    ("retrieval", "retrieval_top1", "held-out R@1"),
    ("knn", "knn_top1", "kNN top-1"),
    ("fbl", "full_batch_loss", "held-out full-batch loss"),
    ("corrupted_s1", "corrupted_r1/s1", "corrupted R@1, severity 1"),
    ("corrupted_s5", "corrupted_r1/s5", "corrupted R@1, severity 5"),
)
DIAGNOSTICS = (  # epoch-line figures averaged over the loss-aware epochs (all epochs for random)
    ("lift", "selection/lift"), ("realised_lift", "selection/realised_lift"),
    ("pair_repeat", "selection/pair_repeat"), ("purity", "selection/label_purity"),
)


def summarise_run(directory: Path, epochs: int, batch_size: int) -> dict | None:
    metrics = read_metrics(directory / "metrics.jsonl")
    if epochs not in metrics:
        return None
    info_path = directory / "run_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    epochs_trained = read_metrics(directory / "metrics.jsonl", kind="epoch").values()
    loss_aware = [r for r in epochs_trained  # runs from before the records named their strategy: lift written
                  if r.get("strategy", "random" if "selection/lift" not in r else None) != "random"]
    final = metrics[epochs]

    def per_epoch_mean(field: str) -> float:
        """Mean over the loss-aware epochs (not a random plan's: warm-up's), all epochs for random."""
        kept = [r[field] for r in (loss_aware or epochs_trained) if field in r]
        return float(np.mean(kept)) if kept else float("nan")

    summary = {key: {e: r.get(field, float("nan")) for e, r in metrics.items()} for key, field, _ in METRICS}
    summary.update({key: per_epoch_mean(field) for key, field in DIAGNOSTICS})
    train_seconds = [r["train_seconds"] for r in epochs_trained]
    return {
        **summary,
        "epochs": sorted(metrics),
        "step": {e: r["step"] for e, r in metrics.items()},
        "final_step": final["step"],
        "samples": final["step"] * batch_size,
        "probe": read_probe(directory),
        "wall_s": info.get("wall_s", float("nan")),
        "cpu_s": info.get("child_cpu_s", float("nan")),
        "load": float(np.mean([info["loadavg_before"][0], info["loadavg_after"][0]])) if info else float("nan"),
        "resumed": info.get("resumed", False),
        "train_s": sum(train_seconds) if train_seconds else float("nan"),
        "epoch_s": float(np.median(train_seconds)) if train_seconds else float("nan"),
        # per loss-aware epoch; the random warm-up epochs cost ~0
        "selection_s": per_epoch_mean("selection/seconds"),
        "share": per_epoch_mean("selection/share"),
        "loss_aware_epochs": len(loss_aware),
    }


def measured_mean(runs: list[dict], key: str, spec: str) -> str:
    """The mean of ``key`` over the runs that measured it ("-" if none did): a run written by an older version
    of the trainer may lack a field the others have."""
    values = [r[key] for r in runs if r[key] == r[key]]
    return format(float(np.mean(values)), spec) if values else "-"


def mean_std(values) -> str:
    values = np.asarray([v for v in values if v == v], dtype=float)
    if len(values) == 0:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"


def curve(runs: list[dict], key: str) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray]:
    """Epochs every run evaluated, the seed-mean step at each, and the per-seed values (seeds, epochs)."""
    common = sorted(set.intersection(*[set(r["epochs"]) for r in runs]))
    steps = np.array([[r["step"][e] for e in common] for r in runs]).mean(axis=0)
    values = np.array([[r[key][e] for e in common] for r in runs], dtype=float)
    return common, steps, values.mean(axis=0), values


def against_reference(runs: list[dict], reference: list[dict]) -> tuple[str, str]:
    """The issue's two tests of "converges faster" on the training full-batch loss, at equal optimizer steps
    (the reference's seed-mean curve interpolated linearly between its evaluations):

    - below the reference at every evaluation from the first third of the reference's steps on, by more than
      the seed spread (the larger sample std of the two there; the reference's at its nearest evaluation):
      "yes", or the first evaluation that fails;
    - the steps it takes to reach the reference's final loss (seed means), as a share of the reference's.
    """
    _, steps, mean, values = curve(runs, "train_fbl")
    _, ref_steps, ref_mean, ref_values = curve(reference, "train_fbl")
    sample_std = lambda x: x.std(ddof=1) if len(x) > 1 else 0.0  # noqa: E731
    in_range = [i for i, step in enumerate(steps) if ref_steps[-1] / 3 <= step <= ref_steps[-1]]
    verdict = "yes" if in_range else f"n/a (ends at step {steps[-1]:.0f})"
    for i in in_range:
        step = steps[i]
        nearest = int(np.abs(ref_steps - step).argmin())
        spread = max(sample_std(values[:, i]), sample_std(ref_values[:, nearest]))
        at_reference = float(np.interp(step, ref_steps, ref_mean))
        if not mean[i] < at_reference - spread:
            verdict = f"no (step {step:.0f}: {mean[i]:.3f} vs {at_reference:.3f}, spread {spread:.3f})"
            break
    reached = [step for step, m in zip(steps, mean) if m <= ref_mean[-1]]
    share = f"{reached[0] / ref_steps[-1]:.2f}" if reached else "never"
    return verdict, share


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
    reference = runs.get(args.reference)
    lines = [f"Final epoch {args.epochs}; mean ± std (sample std) over seeds {','.join(map(str, seeds))}; "
             f"global batch {args.batch_size}. Train full-batch loss: symmetric InfoNCE over the training pairs "
             "at fixed evaluation views (the paper's objective); train R@1: positive-pair retrieval among them; "
             "held-out R@1 / full-batch loss: the same on the held-out pairs; probe: linear probe on frozen "
             "backbone features (tools/evaluate.py on the final checkpoint).", ""]
    lines += [
        "| strategy | seeds | " + " | ".join(name for _, _, name in METRICS) + " | probe top-1 | steps |",
        "|---|---|" + "---|" * (len(METRICS) + 2),
    ]
    for entry in entries:
        rs = runs.get(entry.label, [])
        if rs:
            lines.append(f"| {entry.label} | {len(rs)} | "
                         + " | ".join(mean_std(r[key][args.epochs] for r in rs) for key, _, _ in METRICS)
                         + f" | {mean_std(r['probe'] for r in rs)} | {np.mean([r['final_step'] for r in rs]):.0f} |")
    lines += ["", f"Training full-batch loss against `{args.reference}` at equal optimizer steps, and selection "
              "diagnostics (means over the loss-aware epochs; lift: the plan's loss over a random partition's on "
              "the bank; realised: trained batches over random batches under the same model at the same steps; "
              "pair repeat: batch-mate pairs already batch-mates in the previous epoch; purity: same-label "
              "batch-mate pairs). Seconds: median training seconds per epoch, selection seconds per loss-aware "
              "epoch and its share of the epoch's wall time (from the runs' logs).", "",
              "| strategy | below reference from 1/3 on, beyond seed spread | steps to reference's final loss | "
              "lift | realised lift | pair repeat | purity | s / epoch | selection s | selection share | "
              "wall s | load |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for entry in entries:
        rs = runs.get(entry.label, [])
        if not rs:
            continue
        verdict, share = against_reference(rs, reference) if reference and entry.label != args.reference else ("-", "-")
        resumed = " (resumed)" if any(r["resumed"] for r in rs) else ""
        cells = [measured_mean(rs, key, ".3f") for key, _ in DIAGNOSTICS]
        cells += [measured_mean(rs, "epoch_s", ".1f"), measured_mean(rs, "selection_s", ".3f"),
                  measured_mean(rs, "share", ".3f"), measured_mean(rs, "wall_s", ".0f") + resumed,
                  measured_mean(rs, "load", ".1f")]
        lines.append(f"| {entry.label} | {verdict} | {share} | " + " | ".join(cells) + " |")
    epochs = sorted(set().union(*[set(r["epochs"]) for rs in runs.values() for r in rs])) if runs else []
    epochs = [e for e in epochs if e % args.table_every == 0 or e == args.epochs or e in args.table_epochs]
    for key, _, name in METRICS:
        if not any(value == value for rs in runs.values() for r in rs for value in r[key].values()):
            continue  # not measured in these runs (e.g. corrupted views without eval.corruptions)
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
    lines += ["", "Per seed at the final epoch (train full-batch loss / held-out R@1 / kNN top-1):", ""]
    for entry in entries:
        rs = runs.get(entry.label, [])
        if rs:
            lines.append(f"- {entry.label}: " + ", ".join(
                f"{r['train_fbl'][args.epochs]:.3f} / {r['retrieval'][args.epochs]:.3f} / {r['knn'][args.epochs]:.3f}"
                for r in rs))
    if missing:
        lines += ["", f"Missing or unfinished runs: {', '.join(missing)}"]
    text = "\n".join(lines) + "\n"

    panels = (("train_fbl", "train full-batch loss", "step"), ("retrieval", "held-out R@1", "epoch"),
              ("knn", "kNN top-1", "epoch"), ("train_r1", "train R@1", "epoch"))
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for entry in entries:
        rs = runs.get(entry.label, [])
        if not rs:
            continue
        for ax, (key, name, x_axis) in zip(axes.ravel(), panels):
            common, steps, mean, values = curve(rs, key)
            x = steps if x_axis == "step" else np.array(common)
            (line,) = ax.plot(x, mean, marker="o", ms=3, label=f"{entry.label} (n={len(rs)})")
            ax.fill_between(x, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.2)
            ax.set_ylabel(name)
            ax.set_xlabel("optimizer step (global batches)" if x_axis == "step" else "epoch")
            ax.grid(alpha=0.3)
    if any(runs.values()):  # nothing finished yet: no curves to name
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
    the lift, the share of same-label batch-mate pairs (false negatives for a class-level metric), and the
    share of samples whose nearest negatives (largest s_ij, j != i) share their batch."""
    import yaml

    from dist_cl.selection import lift, select_batches
    from dist_cl.selection.diagnostics import label_purity

    u, v = np.load(directory / "u.npy"), np.load(directory / "v.npy")
    labels = np.load(directory / "labels.npy")
    u, v = u / np.linalg.norm(u, axis=1, keepdims=True), v / np.linalg.norm(v, axis=1, keepdims=True)
    s = u @ v.T
    np.fill_diagonal(s, -np.inf)
    nearest = np.argsort(-s, axis=1)[:, :5]
    lines = [f"Plans on the embeddings in {directory} (B = {batch_size}, tau = {tau}), mean over seeds "
             f"{','.join(map(str, seeds))}:", "",
             "| strategy | batches | lift | same-label pairs in a batch | nearest negative in the batch | "
             "5 nearest in the batch |", "|---|---|---|---|---|---|"]
    for entry in entries:
        options = {o.split("=", 1)[0].removeprefix("selection.options."): yaml.safe_load(o.split("=", 1)[1])
                   for o in entry.overrides if o.startswith("selection.options.")}
        rows = []
        for seed in seeds:
            plan = select_batches(entry.strategy, u, v, batch_size, seed=seed, tau=tau, **options)
            batch_of = np.full(len(u), -1)
            batch_of[plan] = np.arange(len(plan))[:, None]
            members = plan.ravel()
            together = batch_of[nearest[members]] == batch_of[members][:, None]
            rows.append((len(plan), lift(u, v, plan, tau=tau, seed=seed), label_purity(plan, labels),
                         together[:, 0].mean(), together.mean()))
        n, *means = np.mean(rows, axis=0)
        lines.append(f"| {entry.label} | {n:.0f} | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    return "\n".join(lines) + "\n"


def softmax_mass(directories: list[Path], tau: float, nearest: int = 10) -> str:
    """Where each trained model's full-batch loss puts its softmax mass (tools/extract_embeddings.py output of
    the training split, one directory per model): per anchor u_i over all v_j, the share of the positive, of
    its ``nearest`` nearest negatives, of the rest, and of same-label negatives; plus mean cosines."""
    lines = [f"Softmax mass of the full-batch loss (u -> v, tau = {tau}), mean over anchors:", "",
             f"| embeddings | loss u->v | positive | {nearest} nearest negatives | other negatives | same-label "
             "negatives | cos positive | cos same-label | cos other-label |", "|---|---|---|---|---|---|---|---|---|"]
    for directory in directories:
        u, v = (np.load(directory / f"{side}.npy").astype(np.float64) for side in ("u", "v"))
        labels = np.load(directory / "labels.npy")
        cos = u @ v.T
        s = cos / tau
        negative = ~np.eye(len(s), dtype=bool)
        same = (labels[:, None] == labels[None, :]) & negative
        log_z = np.logaddexp.reduce(s, axis=1)
        ranked = np.sort(np.where(negative, s, -np.inf), axis=1)[:, ::-1]

        def share(logits: np.ndarray, log_z: np.ndarray = log_z) -> float:
            return float(np.mean(np.exp(np.logaddexp.reduce(logits, axis=1) - log_z)))

        lines.append(f"| {directory} | {np.mean(log_z - np.diag(s)):.3f} | {np.mean(np.exp(np.diag(s) - log_z)):.3f} | "
                     f"{share(ranked[:, :nearest]):.3f} | {share(ranked[:, nearest:-1]):.3f} | "
                     f"{share(np.where(same, s, -np.inf)):.3f} | {np.mean(np.diag(cos)):.3f} | "
                     f"{cos[same].mean():.3f} | {cos[negative & ~same].mean():.3f} |")
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
    if args.mass:
        print(softmax_mass(args.mass, base.loss.tau))
        return 0
    if args.composition:
        print(composition(entries, seeds, args.composition, args.batch_size, base.loss.tau))
        return 0
    if not args.aggregate_only:
        started = time.perf_counter()
        for entry in entries:
            for seed in seeds:
                train(entry, seed, args, extra)
                probe(entry, seed, args)
        print(f"[all ] {time.perf_counter() - started:.1f}s wall", flush=True)
    text = aggregate(entries, seeds, args)
    print(text)
    print(f"wrote {args.table} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
