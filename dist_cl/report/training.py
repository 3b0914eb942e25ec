"""A training run's reports as its loop produces them: at its start the config file, run_info.json (the code and
machine, dist_cl.report.run_info), train.log and the banner (rank 0), then each step's progress bar and
train/* scalars, each epoch's record, each evaluation, and at its end the hparams record and the summary.
``RunMetrics`` (dist_cl.report.metrics_log) writes them.
"""

import logging
import time

import numpy as np
import torch.distributed as dist
from tqdm import tqdm

from dist_cl.config import Config, changed_keys, save_config
from dist_cl.learn.step import TrainCounters
from dist_cl.plan.figures import SelectionFigures
from dist_cl.plan.planner import random_epochs
from dist_cl.report.console import banner, close_log_file, open_log_file, summary
from dist_cl.report.metrics_log import EpochRecord, RunMetrics
from dist_cl.report.run_info import record_start
from dist_cl.runtime.distributed import DistInfo

log = logging.getLogger("dist_cl")


class TrainingReport:
    """The reports of one rank from where this attempt starts training (``counters``) to its end.

    ``sizes``: the training and held-out pairs and the model's parameters, for the banner.
    """

    def __init__(self, cfg: Config, info: DistInfo, counters: TrainCounters, sizes: tuple[int, int, int]):
        self.cfg, self.counters, self.is_main = cfg, counters, info.is_main
        self.started = time.perf_counter()
        self.log_file: logging.Handler | None = None
        if info.is_main:
            save_config(cfg, cfg.run_dir / "config.yaml")
            record_start(cfg.run_dir, counters.step, counters.epoch)
            self.log_file = open_log_file(cfg.run_dir)
            backend = dist.get_backend() if dist.is_initialized() else "none"
            for line in banner(cfg, info.world_size, info.device, backend, *sizes, random_epochs(cfg.selection)):
                log.info(line)
        self.metrics = RunMetrics(cfg.run_dir, info.is_main, cfg.run.log_every_steps, cfg.train.epochs,
                                  counters.epoch, counters.step, cfg.train.global_batch_size)
        self.metrics.config(cfg.to_dict(), changed_keys(cfg), counters.step)

    def progress_bar(self, total: int, done: int) -> tqdm:
        return self.metrics.progress_bar(total, done, self.counters.epoch)

    def samples_per_s(self, steps: int, seconds: float) -> float:
        return steps * self.cfg.train.global_batch_size / max(seconds, 1e-9)

    def step(self, bar: tqdm, losses: list, seconds: float, data_wait: float, lr: float, tau) -> None:
        """The progress bar's count after every step; every run.log_every_steps steps (as open_clip logs) its
        figures and the train/* scalars: the step's own data wait, and tau (``tau()``, a number) and the skipped steps
        only where they can change (no flat cards). Nothing is written to the terminal here: tqdm redraws the
        bar at its own pace."""
        bar.update()
        if self.counters.step % self.cfg.run.log_every_steps:
            return
        samples_s = self.samples_per_s(len(losses), seconds)
        loss = losses[-1] if losses else float("nan")
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{samples_s:.0f}", refresh=False)
        scalars = {"loss": loss, "lr": lr, "samples_per_s": samples_s, "data_time_s": data_wait}
        if self.cfg.loss.learnable_tau:
            scalars["tau"] = tau()
        if self.cfg.train.nonfinite == "skip":
            scalars["skipped_steps"] = self.counters.skipped_steps
        self.metrics.step(self.counters.step, scalars)

    def epoch(self, strategy: str, losses: list, data_time: float, seconds: float, lr: float,
              figures: SelectionFigures) -> float:
        """The epoch's record (log line, TensorBoard, metrics.jsonl) once ``counters`` is at its last step;
        its mean loss."""
        mean_loss = float(np.mean(losses)) if losses else float("nan")
        if figures.wait_seconds is not None:
            figures.share = figures.wait_seconds / (figures.wait_seconds + seconds)
        self.metrics.epoch(EpochRecord(epoch=self.counters.epoch + 1, strategy=strategy, step=self.counters.step,
                                       steps=len(losses), loss=mean_loss, train_seconds=seconds,
                                       data_seconds=data_time, samples_per_s=self.samples_per_s(len(losses), seconds),
                                       lr=lr, selection=figures))
        return mean_loss

    def evaluation(self, loss: float | None, metrics: dict[str, float], figures: SelectionFigures) -> None:
        if self.is_main:
            self.metrics.evaluation(self.counters.epoch, self.counters.step, loss, metrics, figures)

    def finish(self, last_checkpoint) -> None:
        """The hparams record, and rank 0's summary of the run (``last_checkpoint``: its newest, or None)."""
        self.metrics.hparams()
        if self.is_main:
            for line in summary(self.metrics.path, self.cfg.run_dir, self.counters.epoch, self.counters.step,
                                time.perf_counter() - self.started, last_checkpoint):
                log.info(line)

    def close(self) -> None:
        self.metrics.close()
        if self.log_file is not None:
            close_log_file(self.log_file)
