"""The paper's synthetic experiment (its Fig. 2): free unit embeddings trained on the batches a strategy picks.

N pairs (u_i, v_i) in R^d are the parameters themselves. Every step (= one epoch of the official script)
trains on the batches a selection strategy picks, with plain SGD (lr 0.5, unit-norm embeddings, tau = 1
as in krafton-ai/mini-batch-cl synthetic.py), and is measured by the full-batch loss. All seeds of one
strategy train together as one batched tensor. The command is tools/synthetic.py.
"""

import csv
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter

from dist_cl.learn.losses import batch_infonce
from dist_cl.runtime.seeding import Stream, derive_seed
from dist_cl.selection import select_batches
from dist_cl.selection.n_choose_b import all_batches

STRATEGIES = ("fixed", "random", "full", "ncb", "osgd", "sc")


@dataclass
class Settings:
    """One run of the experiment: every strategy at every embedding dimension, each with every seed."""

    n: int = 8
    """Number of pairs N."""
    b: int = 2
    """Batch size B."""
    dims: list[int] | None = None
    """Embedding dimensions d; None: the paper's 2N and N/2."""
    steps: int = 2000
    """Steps (epochs of the official script)."""
    seeds: int = 3
    lr: float = 0.5
    """SGD learning rate (official lr_full)."""
    tau: float = 1.0
    """Temperature (official: 1, plain unit vectors)."""
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
    report_steps: list[int] = field(default_factory=lambda: [100, 500, 2000])
    """Steps whose seed-mean loss the table shows (those past ``steps`` are left out)."""


def optimum(n: int, d: int, tau: float) -> tuple[str, float] | None:
    """Full-batch loss at the known minimiser, computed from its Gram matrix (u_i = v_i), or None.

    d >= N-1: simplex ETF (<u_i, u_j> = -1/(N-1)), the paper's Theorem; d = N/2: cross-polytope (u_i = +-e_k),
    the reference solution the official script compares against for that case.
    """
    if d >= n - 1:
        centred = np.eye(n) - 1.0 / n
        points, name = centred / np.linalg.norm(centred, axis=1, keepdims=True), "simplex ETF"
    elif 2 * d == n:
        points, name = np.kron(np.eye(d), [[1.0], [-1.0]]), "cross-polytope"
    else:
        return None
    gram_points = torch.from_numpy(points)
    return name, float(batch_infonce(gram_points, gram_points, tau))


def per_seed_plans(name: str, unit_u: torch.Tensor, unit_v: torch.Tensor, b: int, seeds, tau: float) -> torch.Tensor:
    """select_batches for every seed's embeddings -> (seeds, n_batches, B)."""
    plans = [select_batches(name, u.numpy(), v.numpy(), b, seed=s, tau=tau) for u, v, s in zip(unit_u, unit_v, seeds)]
    return torch.from_numpy(np.stack(plans))


def epoch_batches(name: str, xu: torch.Tensor, xv: torch.Tensor, b: int, seeds, epoch: int, tau: float,
                  fixed_plan: torch.Tensor) -> Iterator[torch.Tensor]:
    """Batches (seeds, m, B) of each SGD update of one epoch, as the official script picks them.

    fixed/random/sc: N/B updates on the batches of a partition (fixed drawn once, random reshuffled and sc
    re-clustered every epoch); the batches share no pair, so the N/B sequential updates equal one update
    on the sum of their losses, which is how they are yielded. osgd: N/B updates, each on the
    highest-loss batch of all N-choose-B at the current embeddings. full: one update on the full batch.
    ncb: one update on the mean over all N-choose-B batches (Theorem 1's objective; the official NcB).
    """
    n_seeds, n = xu.shape[:2]
    unit_u, unit_v = F.normalize(xu, dim=-1), F.normalize(xv, dim=-1)
    if name == "fixed":
        yield fixed_plan
    elif name in ("random", "sc", "ncb"):
        yield per_seed_plans(name, unit_u, unit_v, b, [derive_seed(s, Stream.PLAN, epoch) for s in seeds], tau)
    elif name == "full":
        yield torch.arange(n).expand(n_seeds, 1, n)
    elif name == "osgd":
        candidates = torch.from_numpy(all_batches(n, b))
        for _ in range(n // b):
            u, v = embed(xu, tau), embed(xv, tau)
            yield candidates[batch_infonce(u[:, candidates], v[:, candidates], 1.0).argmax(-1)][:, None]


def embed(x: torch.Tensor, tau: float) -> torch.Tensor:
    """Unit norm, then / sqrt(tau): logits are plain inner products (tau folded in, docs/DESIGN.md §1)."""
    return F.normalize(x, dim=-1) / tau**0.5


def train(names: list[str], n: int, b: int, d: int, seeds, steps: int, lr: float, tau: float) -> dict:
    """Full-batch loss (steps, seeds) after each step, per strategy; one init per seed for all strategies.

    All strategies and seeds train as one (strategies * seeds, N, d) tensor; each strategy's update at a
    given position in the epoch is one term of a summed loss, so one backward pass serves them all.
    """
    init = torch.stack([torch.randn(2, n, d, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
                        for s in seeds])
    xu = init[:, 0].repeat(len(names), 1, 1).requires_grad_(True)
    xv = init[:, 1].repeat(len(names), 1, 1).requires_grad_(True)
    rows = torch.arange(len(seeds))[:, None, None]
    own = [slice(i * len(seeds), (i + 1) * len(seeds)) for i in range(len(names))]
    fixed_plan = per_seed_plans("fixed", init[:, 0], init[:, 1], b, seeds, tau)
    curve = np.empty((steps, len(xu)))
    for epoch in range(steps):
        schedules = [epoch_batches(name, xu.detach()[part], xv.detach()[part], b, seeds, epoch, tau, fixed_plan)
                     for name, part in zip(names, own)]
        for updates in itertools.zip_longest(*schedules):
            u, v = embed(xu, tau), embed(xv, tau)
            loss = sum(reduce(name, batch_infonce(u[part][rows, batches], v[part][rows, batches], 1.0))
                       for name, part, batches in zip(names, own, updates) if batches is not None)
            grad_u, grad_v = torch.autograd.grad(loss, (xu, xv))
            with torch.no_grad():
                xu -= lr * grad_u
                xv -= lr * grad_v
        with torch.no_grad():
            curve[epoch] = batch_infonce(embed(xu, tau), embed(xv, tau), 1.0).numpy()
    return {name: curve[:, part] for name, part in zip(names, own)}


def reduce(name: str, losses: torch.Tensor) -> torch.Tensor:
    """An update's objective from its batch losses (seeds, m): the ncb mean, else the sum (disjoint batches)."""
    return losses.mean(-1).sum() if name == "ncb" else losses.sum()


def first_step_within(curve: np.ndarray, target: float, tol: float = 1e-3) -> int | None:
    """First step (1-based) from which the seed-mean loss stays within tol of target."""
    outside = np.flatnonzero(curve.mean(1) - target >= tol)
    if len(outside) == len(curve):
        return None
    return int(outside[-1]) + 2 if len(outside) else 1


def run(settings: Settings, out: Path) -> list[dict]:
    """Train every strategy; write losses.csv, losses.png, table.md (with the time taken) and TensorBoard
    curves under ``out``; return the table's rows (setting, strategy, the loss at each report step, the optimum)."""
    out.mkdir(parents=True, exist_ok=True)
    n, b, tau, seeds = settings.n, settings.b, settings.tau, list(range(settings.seeds))
    dims = settings.dims or [2 * n, n // 2]
    report_steps = [s for s in settings.report_steps if s <= settings.steps] or [settings.steps]
    rows, curves, start, start_cpu = [], {}, time.perf_counter(), time.process_time()
    for d in dims:
        best = optimum(n, d, tau)
        setting = f"N{n}_B{b}_d{d}"
        for name, curve in train(settings.strategies, n, b, d, seeds, settings.steps, settings.lr, tau).items():
            curves[setting, name] = curve
        for name in settings.strategies:
            curve = curves[setting, name]
            with SummaryWriter(out / "tensorboard" / setting / name) as writer:
                for step, losses in enumerate(curve, start=1):
                    writer.add_scalar("full_batch_loss/mean", losses.mean(), step)
                    for seed, loss in zip(seeds, losses):
                        writer.add_scalar(f"full_batch_loss/seed{seed}", loss, step)
            rows.append({"setting": setting, "strategy": name,
                         **{f"step{s}": float(curve[s - 1].mean()) for s in report_steps},
                         "optimum": best[1] if best else None, "optimum_kind": best[0] if best else "unknown",
                         "within_1e-3_from_step": first_step_within(curve, best[1]) if best else None})
    wall_s, cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
    write_csv(out / "losses.csv", curves, seeds)
    plot(out / "losses.png", curves, {r["setting"]: r["optimum"] for r in rows})
    table = format_table(rows, report_steps)
    timing = f"wall time {wall_s:.1f} s, process CPU time {cpu_s:.1f} s (training, selection and logging)"
    (out / "table.md").write_text(f"{table}\n\n{timing}\n")
    return rows


def write_csv(path: Path, curves: dict, seeds) -> None:
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["setting", "strategy", "seed", "step", "full_batch_loss"])
        for (setting, name), curve in curves.items():
            for step, losses in enumerate(curve, start=1):
                out.writerows([setting, name, seed, step, f"{loss:.8f}"] for seed, loss in zip(seeds, losses))


def plot(path: Path, curves: dict, optima: dict) -> None:
    """Seed-mean gap to the optimum (log scale) per setting; the raw loss where no optimum is known."""
    settings = list(dict.fromkeys(setting for setting, _ in curves))
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        best = optima[setting]
        for (s, name), curve in curves.items():
            if s == setting:
                mean = curve.mean(1)
                ax.plot(np.arange(1, len(mean) + 1), mean - best if best is not None else mean, label=name)
        ax.set(title=setting, xlabel="step (epoch)", xscale="log",
               ylabel="full-batch loss - optimum" if best is not None else "full-batch loss")
        if best is not None:
            ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(rows: list[dict], report_steps) -> str:
    header = ["setting", "strategy", *[f"step {s}" for s in report_steps], "optimum", "within 1e-3 from step"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        optimum_cell = f"{r['optimum']:.5f} ({r['optimum_kind']})" if r["optimum"] is not None else "unknown"
        cells = [r["setting"], r["strategy"], *[f"{r[f'step{s}']:.5f}" for s in report_steps], optimum_cell,
                 str(r["within_1e-3_from_step"] if r["within_1e-3_from_step"] is not None else "never")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)

