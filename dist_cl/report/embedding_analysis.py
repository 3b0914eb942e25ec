"""Analyses of saved embeddings (dist-cl-extract-embeddings output: u.npy, v.npy, labels.npy) for a comparison
of strategies: how each strategy's plans are composed on them, and where a model's full-batch loss puts its
softmax mass. tools/compare_strategies.py --composition and --mass print them.
"""

from pathlib import Path

import numpy as np
import yaml

from dist_cl.report.comparison import Entry
from dist_cl.selection import lift, select_batches
from dist_cl.selection.diagnostics import label_purity


def plan_composition(entries: list[Entry], seeds: list[int], directory: Path, batch_size: int, tau: float) -> str:
    """Batch composition of each strategy's plan on fixed embeddings (tools/extract_embeddings.py output):
    the lift, the share of same-label batch-mate pairs (false negatives for a class-level metric), and the
    share of samples whose nearest negatives (largest s_ij, j != i) share their batch."""
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
