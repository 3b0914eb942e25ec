"""What a run prints: the terminal (rank 0 in full, other ranks their warnings) and the run directory's
train.log, which keeps every line of rank 0, the ones the terminal leaves out included.

Lines go through tqdm, so they never break the progress bar. Per-epoch lines are throttled on the terminal
(``run.print_every_s``): a run of 500 short epochs would otherwise print a line every few milliseconds.
"""

import datetime
import logging
import math
import sys
import time
from pathlib import Path

from tqdm import tqdm

from dist_cl.report.records import read_records

THROTTLED = {"throttled": True}
"""``log.info(..., extra=THROTTLED)``: a line the terminal shows at most once every ``run.print_every_s``."""

LOGGER = logging.getLogger("dist_cl")


class ConsoleHandler(logging.Handler):
    """Writes through ``tqdm.write``: above an open progress bar, not into it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


class Throttle(logging.Filter):
    """Lets a THROTTLED record through at most once every ``seconds``; every other record always."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds, self.last = seconds, -math.inf

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "throttled", False):
            return True
        now = time.monotonic()
        if now - self.last < self.seconds:
            return False
        self.last = now
        return True


def _formatter(rank: int) -> logging.Formatter:
    return logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s")


def setup_console(rank: int, print_every_s: float) -> None:
    """The terminal handler of this process: INFO on rank 0, WARNING elsewhere. Replaces an earlier one, so
    repeated in-process runs (tests) print each line once."""
    handler = ConsoleHandler(logging.INFO if rank == 0 else logging.WARNING)
    handler.setFormatter(_formatter(rank))
    handler.addFilter(Throttle(print_every_s))
    LOGGER.handlers = [h for h in LOGGER.handlers if not isinstance(h, ConsoleHandler)] + [handler]
    LOGGER.setLevel(logging.DEBUG)


def open_log_file(run_dir: Path) -> logging.Handler:
    """Append rank 0's every line, DEBUG included, to ``<run_dir>/train.log``; close it with ``close_log_file``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(_formatter(0))
    LOGGER.addHandler(handler)
    return handler


def close_log_file(handler: logging.Handler) -> None:
    LOGGER.removeHandler(handler)
    handler.close()


def banner(cfg, world_size: int, device, backend: str, n_train: int, n_heldout: int, n_params: int,
           random_epochs: int) -> list[str]:
    """The startup lines of rank 0: what is trained, on what, how, and where it goes; ``random_epochs``,
    the leading epochs a loss-aware strategy trains on random batches."""
    selection = cfg.selection
    options = f" {selection.options}" if selection.options else ""
    warmup = f" (random for the first {random_epochs} epoch(s))" if random_epochs else ""
    teacher = f" on the teacher's embeddings in {selection.teacher}" if selection.teacher else ""
    return [
        f"run {cfg.run.name} in {cfg.run_dir} | seed {cfg.seed} | {world_size} rank(s) on {device.type} ({backend})",
        f"data {cfg.data.name}: {n_train} training pairs, {n_heldout} held out | model {cfg.model.backbone} "
        f"({n_params / 1e6:.2f}M parameters) | loss {cfg.loss.name}, tau {cfg.loss.tau}",
        f"selection {selection.strategy}{options}{teacher}{warmup} | global batch {cfg.train.global_batch_size} "
        f"({cfg.train.global_batch_size // world_size} a rank) | {cfg.train.epochs} epochs, {cfg.train.optimizer} "
        f"lr {cfg.train.lr:g}",
        f"watch: tensorboard --logdir {cfg.run_dir / 'tb'}",
    ]


def duration(seconds: float) -> str:
    """h:mm:ss, as the ETA and the summary show a wall time."""
    return str(datetime.timedelta(seconds=round(seconds)))


def best_of(evaluations: list[dict]) -> dict[str, tuple[float, int]]:
    """Each metric's best value over ``evaluations`` (metrics.jsonl's eval records) and the epoch it came at:
    the lowest for a loss, the highest for anything else."""
    best: dict[str, tuple[float, int]] = {}
    for record in evaluations:
        for key, value in record.items():
            if key in ("kind", "epoch", "step", "loss", "train_pairs") or key.startswith("selection/"):
                continue
            if not isinstance(value, int | float) or value != value:
                continue
            lower = "loss" in key
            if key not in best or (value < best[key][0] if lower else value > best[key][0]):
                best[key] = (value, record["epoch"])
    return best


def summary(metrics_path: Path, run_dir: Path, epochs: int, steps: int, seconds: float,
            checkpoint: Path | None) -> list[str]:
    """The end-of-run lines: what ran, the final and best evaluation (over every attempt: read from
    metrics.jsonl), and where the outputs are."""
    evaluations = list(read_records(metrics_path).values())
    lines = [f"done: {epochs} epochs, {steps} steps; this attempt took {duration(seconds)}"]
    if evaluations:
        final, best = evaluations[-1], best_of(evaluations)
        lines.append(f"final (epoch {final['epoch']}): " + " ".join(
            f"{key} {final[key]:.4f}" for key in best))
        lines.append("best: " + " ".join(f"{key} {value:.4f} (epoch {epoch})" for key, (value, epoch) in best.items()))
    lines.append(f"outputs in {run_dir}: checkpoint {checkpoint.name if checkpoint else '-'}, metrics.jsonl, "
                 f"train.log; TensorBoard: tensorboard --logdir {run_dir / 'tb'}")
    return lines
