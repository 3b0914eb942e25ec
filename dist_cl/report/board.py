"""A run's TensorBoard, laid out to answer "did selection help?" across runs of different strategies.

- Scalars against the optimizer step in ``<run>/tb``; the evaluation and selection scalars also against
  epochs (``<run>/tb/by_epoch``, tags ``by_epoch/...``) and samples seen (``<run>/tb/by_samples``), so runs
  with different steps per epoch line up. Each axis has its own writer: TensorBoard's purge on resume
  (``purge_step``) counts in the writer's own x values.
- A resumed attempt hides what a killed one wrote after its checkpoint: every writer starts with
  ``purge_step`` just past where the checkpoint left off, so no step shows twice.
- The resolved config as text, the config keys that differ from the defaults as hparams with the final
  metrics, and at each evaluation an image grid of one selected batch with its labels.
- A run directory that stops taking writes mid-run (its permissions changed, its file system went read-only
  or full) ends the run with RunDirWriteError naming the file, not TensorBoard's traceback. TensorBoard
  writes from a thread of its own, which keeps the error for the next call from the run and would print its
  traceback first: the board's threads die quietly, and the next call raises the error by name.
"""

import functools
import math
import os
import threading
from pathlib import Path

import torch
import yaml
from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams, scalar
from torchvision.utils import make_grid

from dist_cl.config import ConfigError


class RunDirWriteError(ConfigError):
    """The run directory stopped taking the run's writes; the message names the file, the error and the fix."""


def write_error(err: OSError) -> RunDirWriteError:
    """``err``, a failed write of one of the run's files, as the error that names it and the way on."""
    where = os.fsdecode(err.filename) if err.filename is not None else "the run directory"
    return RunDirWriteError(f"cannot write {where} ({err.strerror or err}): run.dir stopped taking writes while "
                            "the run trained; make it writable again (or free space), then run the same command to "
                            "resume from its last checkpoint")


def _named(method):
    """``method``, with a write error of TensorBoard's (raised in its thread, kept for this call) named."""

    @functools.wraps(method)
    def writing(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except OSError as err:
            raise write_error(err) from err

    return writing


def _purge_step(done: int) -> int:
    """Where a writer's events of an earlier attempt stop counting: past ``done`` (what the checkpoint
    holds), or all of them for a run that starts from scratch."""
    return done + 1 if done else 0


def _add_scalars(writer: SummaryWriter, scalars: dict[str, float], step: int) -> None:
    """``scalars`` at ``step`` as one event, where ``add_scalar`` writes an event each: TensorBoard frames
    every event with checksums it computes in Python, on its writer thread, under the GIL the step needs."""
    summary = Summary(value=[value for tag, number in scalars.items() for value in scalar(tag, number).value])
    writer._get_file_writer().add_summary(summary, step)


class Board:
    def __init__(self, tb_dir: Path, first_step: int, epochs_done: int, batch_size: int):
        self.batch_size = batch_size
        self.excepthook = threading.excepthook
        threading.excepthook = self.writer_thread_died
        self.by_step = SummaryWriter(str(tb_dir), purge_step=_purge_step(first_step))
        self.by_epoch = SummaryWriter(str(tb_dir / "by_epoch"), purge_step=_purge_step(epochs_done))
        self.by_samples = SummaryWriter(str(tb_dir / "by_samples"), purge_step=_purge_step(first_step * batch_size))

    @_named
    def scalars(self, scalars: dict[str, float], step: int, epoch: int | None = None) -> None:
        """Against ``step``; also against epochs and samples seen where ``epoch`` (epochs completed) is given."""
        _add_scalars(self.by_step, scalars, step)
        if epoch is not None:
            axes = ((self.by_epoch, "by_epoch", epoch), (self.by_samples, "by_samples", step * self.batch_size))
            for writer, axis, x in axes:
                _add_scalars(writer, {f"{axis}/{tag}": value for tag, value in scalars.items()}, x)

    @_named
    def config(self, resolved: dict, step: int) -> None:
        self.by_step.add_text("config", "```yaml\n" + yaml.safe_dump(resolved, sort_keys=False) + "```", step)

    @_named
    def hparams(self, changed: dict, final: dict[str, float]) -> None:
        """``changed`` config keys (dotted) against the ``final`` scalar tags of this run, in the HPARAMS tab."""
        shown = {key: value if isinstance(value, int | float | str | bool) else str(value)
                 for key, value in changed.items()}
        writer = self.by_step._get_file_writer()
        for summary in hparams(shown, final):
            writer.add_summary(summary)

    @_named
    def batch(self, images: list[torch.Tensor], labels: list[str] | None, step: int) -> None:
        """One selected batch as a grid, row-major, with its labels as a table of the same shape."""
        columns = math.ceil(math.sqrt(len(images)))
        self.by_step.add_image("selection/batch", make_grid(images, nrow=columns, padding=2, pad_value=1.0), step)
        if labels is not None:
            rows = [labels[i:i + columns] for i in range(0, len(labels), columns)]
            table = "\n".join("| " + " | ".join(row) + " |" for row in rows)
            header = "| " + " | ".join([" "] * columns) + " |\n|" + "---|" * columns + "\n"
            self.by_step.add_text("selection/batch_labels", header + table, step)

    def writer_thread_died(self, args: threading.ExceptHookArgs) -> None:
        """Quiet where a TensorBoard writer thread failed to write: its error is raised by the next call."""
        if not (isinstance(args.exc_value, OSError) and type(args.thread).__module__.startswith("tensorboard.")):
            self.excepthook(args)

    @_named
    def close(self) -> None:
        """Close every writer, so that none is left with a thread to fail later, then raise the first error."""
        errors = []
        for writer in (self.by_step, self.by_epoch, self.by_samples):
            try:
                writer.close()
            except OSError as err:
                errors.append(err)
        threading.excepthook = self.excepthook
        if errors:
            raise errors[0]
