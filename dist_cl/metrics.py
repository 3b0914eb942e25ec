"""What a run reports, in one place: the progress bar, TensorBoard, metrics.jsonl and the log lines.

metrics.jsonl has one line per trained epoch (``"kind": "epoch"``: step count, train and selection
seconds, samples/s, selection figures) and one per evaluation (``"kind": "eval"``: the metrics of
dist_cl.evaluation), so a run's numbers can be aggregated without reading its logs. Every line has the
epochs completed (``epoch``) and the optimizer step (``step``); only rank 0 writes.
"""

import dataclasses
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

log = logging.getLogger("dist_cl")


@dataclass
class SelectionFigures:
    """How an epoch's plan was made and what it is like; TensorBoard ``selection/<field>`` (docs/DESIGN.md §4).

    A field is None where it does not apply (e.g. no lift for a plan that ignores the bank).
    """

    seconds: float | None = None
    """Selection time: preparing the bank snapshot plus computing the plan (and any re-selection)."""
    prepare_seconds: float | None = None
    """Of which the training loop spent completing and copying the bank."""
    wait_seconds: float | None = None
    """Time training waited for the plan (less than ``seconds`` when computed ahead)."""
    share: float | None = None
    """wait_seconds / (wait_seconds + the epoch's training seconds)."""
    lift: float | None = None
    """Plan loss over a random partition's, on the bank the plan was made from (>1: harder)."""
    bank_staleness: float | None = None
    """Mean age in steps of the bank rows at the plan's first step."""
    realised_lift: float | None = None
    """Loss of the batches trained over random batches', scored by the model of the same steps."""
    pair_repeat: float | None = None
    """Share of batch-mate pairs that were batch-mates in the previous epoch's plan too."""
    label_purity: float | None = None
    """Mean share of a batch in its most common class (diagnostic only; selection never reads labels)."""

    def scalars(self) -> dict[str, float]:
        return {f"selection/{k}": v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_scalars(cls, scalars: dict) -> "SelectionFigures":
        """The inverse of ``scalars`` (a plan computed ahead is checkpointed with them)."""
        return cls(**{k.removeprefix("selection/"): v for k, v in scalars.items()})


@dataclass
class EpochRecord:
    """One trained epoch, as metrics.jsonl and the epoch log line report it."""

    epoch: int
    """Epochs completed, this one included (the same count the evaluation lines use)."""
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


class RunMetrics:
    """Reports of one rank: rank 0 writes TensorBoard (``<run>/tb``) and metrics.jsonl, the others nothing."""

    def __init__(self, run_dir: Path, is_main: bool, log_every_steps: int):
        self.is_main = is_main
        self.log_every_steps = log_every_steps
        self.path = run_dir / "metrics.jsonl"
        self.writer = SummaryWriter(str(run_dir / "tb")) if is_main else None

    def progress_bar(self, total: int, done: int, epoch: int) -> tqdm:
        """The epoch's bar, on rank 0's terminal only."""
        return tqdm(total=total, initial=done, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True,
                    disable=not (self.is_main and sys.stderr.isatty()))

    def step(self, step: int, scalars: dict[str, float]) -> None:
        """``train/<name>`` scalars of ``step``, every ``run.log_every_steps`` steps."""
        if self.writer is not None and step % self.log_every_steps == 0:
            for name, value in scalars.items():
                self.writer.add_scalar(f"train/{name}", value, step)

    def epoch(self, record: EpochRecord) -> None:
        figures = record.selection
        log.info("epoch %d step %d | data %.2fs total %.2fs | %.0f samples/s | lr %.3e | loss %.4f | selection "
                 "%.2fs (waited %.2fs)", record.epoch - 1, record.step, record.data_seconds, record.train_seconds,
                 record.samples_per_s, record.lr, record.loss, figures.seconds or 0.0, figures.wait_seconds or 0.0)
        if self.writer is not None:
            for tag, value in figures.scalars().items():
                self.writer.add_scalar(tag, value, record.step)
        fields = {k: v for k, v in dataclasses.asdict(record).items() if k != "selection"}
        self.append({"kind": "epoch", **fields, **figures.scalars()})

    def evaluation(self, epoch: int, step: int, loss: float | None, metrics: dict[str, float],
                   figures: SelectionFigures) -> None:
        """Evaluation ``metrics`` after ``epoch`` epochs; training-set metrics go beside train/loss
        (train/full_batch_loss is the paper's objective), the others under eval/."""
        if self.writer is not None:
            for key, value in metrics.items():
                tag = f"train/{key.removeprefix('train_')}" if key.startswith("train_") else f"eval/{key}"
                self.writer.add_scalar(tag, value, step)
        self.append({"kind": "eval", "epoch": epoch, "step": step, "loss": loss, **metrics, **figures.scalars()})
        log.info("eval epoch %d step %d | %s", epoch, step, " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    def append(self, record: dict) -> None:
        if self.is_main:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
