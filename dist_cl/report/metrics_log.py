"""What a run reports, in one place: the progress bar, TensorBoard, metrics.jsonl and the log lines.

metrics.jsonl has one line per trained epoch (``"kind": "epoch"``: step count, train and selection
seconds, samples/s, selection figures) and one per evaluation (``"kind": "eval"``: the metrics of
dist_cl.evaluate.metrics), so a run's numbers can be aggregated without reading its logs. Every line has the
epochs completed (``epoch``) and the optimizer step (``step``); only rank 0 writes.
"""

import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from dist_cl.data.pairs import PairDataset
from dist_cl.plan.figures import SelectionFigures
from dist_cl.report.board import Board, write_error
from dist_cl.report.console import THROTTLED, duration

log = logging.getLogger("dist_cl")


@dataclass
class EpochRecord:
    """One trained epoch, as metrics.jsonl and the epoch log line report it."""

    epoch: int
    """Epochs completed, this one included (the same count the evaluation lines use)."""
    strategy: str
    """The strategy of the epoch's plan (random during selection.warmup_epochs)."""
    step: int
    steps: int
    """Optimizer steps taken in this epoch by this attempt (a resumed epoch counts from the resume)."""
    loss: float
    train_seconds: float
    data_seconds: float
    """Of which waiting for the data loader."""
    samples_per_s: float
    lr: float
    selection: SelectionFigures


def tag(key: str) -> str:
    """An evaluation metric's TensorBoard tag: training-set metrics beside train/loss (train/full_batch_loss is
    the paper's objective), the others under eval/."""
    return f"train/{key.removeprefix('train_')}" if key.startswith("train_") else f"eval/{key}"


class RunMetrics:
    """Reports of one rank: rank 0 writes TensorBoard (dist_cl.report.board) and metrics.jsonl, the others nothing."""

    def __init__(self, run_dir: Path, is_main: bool, log_every_steps: int, epochs: int, epochs_done: int,
                 first_step: int, batch_size: int):
        """``epochs``: the run's total; ``epochs_done`` and ``first_step``: where this attempt starts."""
        self.is_main = is_main
        self.log_every_steps = log_every_steps
        self.epochs, self.epochs_done, self.started = epochs, epochs_done, time.perf_counter()
        self.path = run_dir / "metrics.jsonl"
        self.board = Board(run_dir / "tb", first_step, epochs_done, batch_size) if is_main else None
        self.changed: dict = {}
        self.last_evaluation: dict[str, float] = {}

    def progress_bar(self, total: int, done: int, epoch: int) -> tqdm:
        """Epoch ``epoch``'s bar (0-based: the bar of the first is "epoch 1/E"), on rank 0's terminal only."""
        return tqdm(total=total, initial=done, desc=f"epoch {epoch + 1}/{self.epochs}", leave=False,
                    dynamic_ncols=True, disable=not (self.is_main and sys.stderr.isatty()))

    def step(self, step: int, scalars: dict[str, float]) -> None:
        """``train/<name>`` scalars of ``step``, every ``run.log_every_steps`` steps."""
        if self.board is not None and step % self.log_every_steps == 0:
            self.board.scalars({f"train/{name}": value for name, value in scalars.items()}, step)

    def epoch(self, record: EpochRecord) -> None:
        """The epoch's line (on the terminal at most every run.print_every_s, the first of a process and the
        last of the run always), its selection scalars and its metrics.jsonl record."""
        figures, done = record.selection, record.epoch - self.epochs_done
        eta = (time.perf_counter() - self.started) / max(done, 1) * (self.epochs - record.epoch)
        hardness = ", ".join(f"{name} {value:.3f}" for name, value in (
            ("lift", figures.lift), ("realised lift", figures.realised_lift)) if value is not None)
        log.info("epoch %d/%d step %d | loss %.4f | lr %.3e | %.0f samples/s, data %.2fs of %.2fs | %s%s | "
                 "selection %.2fs (waited %.2fs) | ETA %s", record.epoch, self.epochs, record.step, record.loss,
                 record.lr, record.samples_per_s, record.data_seconds, record.train_seconds, record.strategy,
                 f" ({hardness})" if hardness else "", figures.seconds or 0.0, figures.wait_seconds or 0.0,
                 duration(eta), extra={} if record.epoch == self.epochs else THROTTLED)
        if self.board is not None:
            self.board.scalars(figures.scalars(), record.step, record.epoch)
        fields = {k: v for k, v in dataclasses.asdict(record).items() if k != "selection"}
        self.append({"kind": "epoch", **fields, **figures.scalars()})

    def evaluation(self, epoch: int, step: int, loss: float | None, metrics: dict[str, float],
                   figures: SelectionFigures) -> None:
        """Evaluation ``metrics`` after ``epoch`` epochs (their tags: ``tag``)."""
        self.last_evaluation = metrics
        if self.board is not None:
            self.board.scalars({tag(key): value for key, value in metrics.items()}, step, epoch)
        self.append({"kind": "eval", "epoch": epoch, "step": step, "loss": loss, **metrics, **figures.scalars()})
        log.info("eval epoch %d/%d step %d | %s", epoch, self.epochs, step,
                 " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    def append(self, record: dict) -> None:
        if self.is_main:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as err:
                raise write_error(err) from err

    def config(self, resolved: dict, changed: dict, step: int) -> None:
        """The resolved config as text, and the keys that differ from the defaults for hparams."""
        self.changed = changed
        if self.board is not None:
            self.board.config(resolved, step)

    def batch(self, dataset, indices, step: int) -> None:
        """One selected global batch as images with their labels; nothing for data without images."""
        if self.board is None or not hasattr(dataset, "raw") or type(dataset).raw is PairDataset.raw:
            return
        images = [dataset.raw(int(i)) for i in indices]
        classes = getattr(dataset, "classes", None)
        labels = None if dataset.labels is None else [
            classes[dataset.labels[i]] if classes else str(dataset.labels[i]) for i in indices]
        if hasattr(dataset, "caption"):  # image–caption pairs: the batch's other half is its captions
            labels = [dataset.caption(int(i)) for i in indices]
        self.board.batch(images, labels, step)

    def hparams(self) -> None:
        """At the end of a run: the changed config keys against the last evaluation's metrics."""
        if self.board is not None and self.last_evaluation:
            self.board.hparams(self.changed, {tag(key): value for key, value in self.last_evaluation.items()})

    def close(self) -> None:
        if self.board is not None:
            self.board.close()
