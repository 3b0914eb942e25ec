"""A comparison of batch-selection strategies from its runs' records: one summary per run (metrics.jsonl,
run_info.json, the probe), the verdict against a reference strategy, the tables and the plot.

A table is one code state's unless its caller allows more (``check_one_code_state``): runs of different commits,
or of different uncommitted changes, differ by more than their strategy. A run whose run_info.json names no
commit (recorded before it did) is in the state "unknown", itself one state: such runs cannot be told apart.

A comparison trains each entry (a strategy, or LABEL:STRATEGY with dotted overrides) with each seed into
``<out>/<label>-s<seed>``; tools/compare_strategies.py runs them and writes what this module aggregates.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dist_cl.report.records import read_records
from dist_cl.report.run_info import UNKNOWN, code_labels, read_run_info

PROBE_NAME = "probe.json"
"""The linear probe of a run's final checkpoint (tools/evaluate.py --json), in its run directory."""


@dataclass
class Entry:
    """One strategy of a comparison: its label (the name of its runs), a registered strategy, its own overrides."""

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
    ("i2t_r1", "image_to_text_r1", "held-out image→text R@1"),
    ("t2i_r1", "text_to_image_r1", "held-out text→image R@1"),
    ("zero_shot", "zero_shot_top1", "zero-shot top-1"),
)
"""Every metric a table may show; a table shows those its runs measured (``measured_metrics``)."""
DIAGNOSTICS = (  # epoch-line figures averaged over the loss-aware epochs (all epochs for random)
    ("lift", "selection/lift"), ("realised_lift", "selection/realised_lift"),
    ("pair_repeat", "selection/pair_repeat"), ("purity", "selection/label_purity"),
)


def summarise_run(directory: Path, epochs: int, batch_size: int) -> dict | None:
    metrics = read_records(directory / "metrics.jsonl")
    if epochs not in metrics:
        return None
    info = read_run_info(directory)
    epochs_trained = read_records(directory / "metrics.jsonl", kind="epoch").values()
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
        "run": directory.name,
        "code": code_labels(info),
        "epochs": sorted(metrics),
        "step": {e: r["step"] for e, r in metrics.items()},
        "final_step": final["step"],
        "samples": final["step"] * batch_size,
        "probe": read_probe(directory),
        "wall_s": info.get("wall_s", float("nan")),
        "cpu_s": info.get("child_cpu_s", float("nan")),
        "load": (float(np.mean([info["loadavg_before"][0], info["loadavg_after"][0]]))
                 if "loadavg_before" in info else float("nan")),  # a run the tool did not launch has none
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


@dataclass
class Comparison:
    """The summaries of a comparison's finished runs (summarise_run) by entry label, and the runs not finished."""

    entries: list[Entry]
    seeds: list[int]
    epochs: int
    batch_size: int
    runs: dict[str, list[dict]]
    missing: list[str]


def collect(out: Path, entries: list[Entry], seeds: list[int], epochs: int, batch_size: int) -> Comparison:
    runs: dict[str, list[dict]] = {}
    missing = []
    for entry in entries:
        for seed in seeds:
            summary = summarise_run(run_dir(out, entry.label, seed), epochs, batch_size)
            if summary is None:
                missing.append(f"{entry.label}-s{seed}")
            else:
                runs.setdefault(entry.label, []).append(summary)
    return Comparison(entries, seeds, epochs, batch_size, runs, missing)


class MixedCodeError(ValueError):
    """The runs of a comparison ran different code (commits, uncommitted changes, or one unknown)."""


def code_states(comparison: Comparison) -> dict[str, list[str]]:
    """Each code state of the finished runs (dist_cl.report.run_info.code_label) and the runs that ran it; a run
    resumed on other code is under each of its states."""
    states: dict[str, list[str]] = {}
    for _, rs in finished_entries(comparison):
        for r in rs:
            for state in r["code"]:
                states.setdefault(state, []).append(r["run"])
    return states


def code_listing(states: dict[str, list[str]]) -> list[str]:
    return [f"- {state}: {', '.join(runs)}" + (" (run_info.json names no commit: recorded before it did)"
                                                if state == UNKNOWN else "") for state, runs in states.items()]


def check_one_code_state(comparison: Comparison) -> None:
    """Raises MixedCodeError, naming each state's runs, where the finished runs ran more than one."""
    states = code_states(comparison)
    if len(states) > 1:
        raise MixedCodeError(f"these runs ran {len(states)} different code states, and one table of them would "
                             "mix code changes into the strategies' differences:\n" + "\n".join(code_listing(states)))


def code_lines(comparison: Comparison) -> list[str]:
    """The table's first lines (and a blank one): the code its runs ran, each run named where they ran more than
    one state."""
    states = code_states(comparison)
    if not states:
        return []
    if len(states) > 1:
        return ["Code: these runs ran different code, each state with its runs (a table aggregated on purpose):",
                "", *code_listing(states), ""]
    [(state, runs)] = states.items()
    if state == UNKNOWN:
        return [f"Code: unknown for all {len(runs)} runs: their run_info.json names no commit (recorded before "
                "it did), so they may have run different code.", ""]
    return [f"Code: {state} for all {len(runs)} runs (their run_info.json).", ""]


def results_table(comparison: Comparison, reference_label: str, table_every: int, table_epochs: set[int]) -> str:
    """Markdown: the code its runs ran (``code_lines``), the final epoch's metrics, the verdict against
    ``reference_label`` with the selection diagnostics, each metric per evaluated epoch (every
    ``table_every``-th, the last and ``table_epochs``), and each seed's final numbers."""
    final, runs = comparison.epochs, comparison.runs
    lines = code_lines(comparison) + final_metrics(comparison) + [""] + verdicts(comparison, reference_label)
    epochs = sorted(set().union(*[set(r["epochs"]) for rs in runs.values() for r in rs])) if runs else []
    epochs = [e for e in epochs if e % table_every == 0 or e == final or e in table_epochs]
    for key, _, name in measured_metrics(comparison):
        lines += [""] + per_epoch(comparison, key, name, epochs)
    lines += ["", "Per seed at the final epoch (train full-batch loss / held-out R@1 / kNN top-1):", ""]
    for label, rs in finished_entries(comparison):
        lines.append(f"- {label}: " + ", ".join(
            f"{r['train_fbl'][final]:.3f} / {r['retrieval'][final]:.3f} / {r['knn'][final]:.3f}" for r in rs))
    if comparison.missing:
        lines += ["", f"Missing or unfinished runs: {', '.join(comparison.missing)}"]
    return "\n".join(lines) + "\n"


def measured_metrics(comparison: Comparison) -> list[tuple[str, str, str]]:
    """The METRICS some run of ``comparison`` measured (corrupted views only with eval.corruptions, the
    image-text recalls and zero-shot only on image-caption pairs)."""
    runs = [r for rs in comparison.runs.values() for r in rs]
    return [m for m in METRICS if any(value == value for r in runs for value in r[m[0]].values())]


def finished_entries(comparison: Comparison) -> list[tuple[str, list[dict]]]:
    """(label, run summaries) of the entries with a finished run, in the order of the entries."""
    return [(e.label, comparison.runs[e.label]) for e in comparison.entries if comparison.runs.get(e.label)]


def final_metrics(comparison: Comparison) -> list[str]:
    final = comparison.epochs
    lines = [f"Final epoch {final}; mean ± std (sample std) over seeds {','.join(map(str, comparison.seeds))}; "
             f"global batch {comparison.batch_size}. Train full-batch loss: symmetric InfoNCE over the training "
             "pairs at fixed evaluation views (the paper's objective); train R@1: positive-pair retrieval among "
             "them; held-out R@1 / full-batch loss: the same on the held-out pairs; probe: linear probe on frozen "
             "backbone features (tools/evaluate.py on the final checkpoint).", ""]
    metrics = measured_metrics(comparison)
    lines += [
        "| strategy | seeds | " + " | ".join(name for _, _, name in metrics) + " | probe top-1 | steps |",
        "|---|---|" + "---|" * (len(metrics) + 2),
    ]
    for label, rs in finished_entries(comparison):
        lines.append(f"| {label} | {len(rs)} | "
                     + " | ".join(mean_std(r[key][final] for r in rs) for key, _, _ in metrics)
                     + f" | {mean_std(r['probe'] for r in rs)} | {np.mean([r['final_step'] for r in rs]):.0f} |")
    return lines


def verdicts(comparison: Comparison, reference_label: str) -> list[str]:
    reference = comparison.runs.get(reference_label)
    lines = [f"Training full-batch loss against `{reference_label}` at equal optimizer steps, and selection "
             "diagnostics (means over the loss-aware epochs; lift: the plan's loss over a random partition's on "
             "the bank; realised: trained batches over random batches under the same model at the same steps; "
             "pair repeat: batch-mate pairs already batch-mates in the previous epoch; purity: same-label "
             "batch-mate pairs). Seconds: median training seconds per epoch, selection seconds per loss-aware "
             "epoch and its share of the epoch's wall time (from the runs' logs).", "",
             "| strategy | below reference from 1/3 on, beyond seed spread | steps to reference's final loss | "
             "lift | realised lift | pair repeat | purity | s / epoch | selection s | selection share | "
             "wall s | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, rs in finished_entries(comparison):
        verdict, share = against_reference(rs, reference) if reference and label != reference_label else ("-", "-")
        resumed = " (resumed)" if any(r["resumed"] for r in rs) else ""
        cells = [measured_mean(rs, key, ".3f") for key, _ in DIAGNOSTICS]
        cells += [measured_mean(rs, "epoch_s", ".1f"), measured_mean(rs, "selection_s", ".3f"),
                  measured_mean(rs, "share", ".3f"), measured_mean(rs, "wall_s", ".0f") + resumed,
                  measured_mean(rs, "load", ".1f")]
        lines.append(f"| {label} | {verdict} | {share} | " + " | ".join(cells) + " |")
    return lines


def per_epoch(comparison: Comparison, key: str, name: str, epochs: list[int]) -> list[str]:
    lines = [f"{name} per evaluated epoch (mean over seeds; step in brackets):", "",
             "| strategy | " + " | ".join(f"ep {e}" for e in epochs) + " |", "|---|" + "---|" * len(epochs)]
    for label, rs in finished_entries(comparison):
        cells = []
        for e in epochs:
            vals = [r[key][e] for r in rs if e in r[key]]
            steps = [r["step"][e] for r in rs if e in r["step"]]
            cells.append(f"{np.mean(vals):.3f} [{np.mean(steps):.0f}]" if vals else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def plot(comparison: Comparison, path: Path, title: str) -> None:
    """Train full-batch loss against step, and held-out R@1, kNN top-1, train R@1 against epoch: the mean
    over seeds with a min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("train_fbl", "train full-batch loss", "step"), ("retrieval", "held-out R@1", "epoch"),
              ("knn", "kNN top-1", "epoch"), ("train_r1", "train R@1", "epoch"))
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for label, rs in finished_entries(comparison):
        for ax, (key, name, x_axis) in zip(axes.ravel(), panels):
            common, steps, mean, values = curve(rs, key)
            x = steps if x_axis == "step" else np.array(common)
            (line,) = ax.plot(x, mean, marker="o", ms=3, label=f"{label} (n={len(rs)})")
            ax.fill_between(x, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.2)
            ax.set_ylabel(name)
            ax.set_xlabel("optimizer step (global batches)" if x_axis == "step" else "epoch")
            ax.grid(alpha=0.3)
    if comparison.runs:  # nothing finished yet: no curves to name
        axes[0, 0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


