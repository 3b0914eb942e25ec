"""The training loop: ask the planner for an epoch's plan, train on it under DDP, report, evaluate, checkpoint.

It orchestrates components that each own one job (docs/DESIGN.md §3): the plan policy
(dist_cl.plan.planner), the step numerics (dist_cl.learn.step), the schedule (dist_cl.learn.optim), the reports
(dist_cl.report.metrics_log) and the checkpoint contents (dist_cl.runtime.checkpoint's component map).
Everything a step depends on is either in the checkpoint or derived from (seed, epoch, index), so a run killed
at any step and resumed ends with the weights of a run that was never interrupted.
"""

import dataclasses
import datetime
import hashlib
import json
import logging
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

import dist_cl
from dist_cl.config import Config, ConfigError, changed_keys, config_differences, resume_warnings, save_config
from dist_cl.data import build_dataset, loader_options
from dist_cl.evaluate.metrics import evaluate
from dist_cl.learn.losses import batch_options
from dist_cl.learn.models import build_training_model
from dist_cl.learn.optim import build_optimizer, set_lr
from dist_cl.learn.step import NonFiniteError, TrainStep
from dist_cl.plan.bank import EmbeddingBank
from dist_cl.plan.figures import SelectionFigures
from dist_cl.plan.planner import EpochPlanner, left_out_warning, random_epochs, warmup_warning
from dist_cl.plan.sampler import PlanSampler
from dist_cl.report.console import banner, close_log_file, open_log_file, summary
from dist_cl.report.metrics_log import EpochRecord, RunMetrics
from dist_cl.runtime.checkpoint import CheckpointError, RunCheckpoints
from dist_cl.runtime.distributed import DistInfo, broadcast_buffers, check_same_on_all_ranks, mark_progress
from dist_cl.runtime.preemption import Preempted, StopRequest
from dist_cl.runtime.seeding import RankRNG, derive_seed

log = logging.getLogger("dist_cl")


class SkippedStepsError(NonFiniteError):
    """train.nonfinite=skip skipped more than train.max_skipped_fraction of an epoch's steps."""


@dataclasses.dataclass
class TrainCounters:
    """Where training is: epochs completed, optimizer steps taken, steps skipped (a checkpoint component)."""

    epoch: int = 0
    step: int = 0
    skipped_steps: int = 0
    """Steps without an update: non-finite ones skipped under train.nonfinite=skip, and fp16 overflows."""
    epoch_nonfinite: int = 0
    """Steps of this epoch skipped as non-finite (what train.max_skipped_fraction caps)."""

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step, self.skipped_steps = state["epoch"], state["step"], state["skipped_steps"]
        self.epoch_nonfinite = state.get("epoch_nonfinite", 0)  # absent from older checkpoints


class Trainer:
    def __init__(self, cfg: Config, info: DistInfo):
        self.cfg, self.info, self.run_dir = cfg, info, cfg.run_dir
        # first: what follows runs collectives whose number and order depend on the config
        digest = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()
        check_same_on_all_ranks("config", digest)
        torch.manual_seed(cfg.seed)
        self.train_set = build_dataset(cfg, "train")
        self.heldout_set = build_dataset(cfg, "heldout")
        if cfg.eval.corruptions and self.heldout_set is None:
            raise ConfigError(f"eval.corruptions=true corrupts the held-out images, and data.path={cfg.data.path!r} "
                              "has no held-out split: write one with tools/make_shards.py --split heldout --out "
                              "<data.path>/heldout, or set eval.corruptions=false")
        self.model = build_training_model(cfg, len(self.train_set), getattr(self.train_set, "channels",
                                                                            cfg.model.in_chans), info.device)
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.step_fn = TrainStep(cfg, self.model, self.optimizer, info.rank, info.world_size, info.device,
                                 len(self.train_set))
        self.bank = EmbeddingBank(len(self.train_set), cfg.model.embed_dim, info.device)
        self.planner = EpochPlanner(cfg.selection, cfg.seed, cfg.train.global_batch_size, self.train_set,
                                    self.model, self.bank, info, cfg.data.num_workers, cfg.loss.name,
                                    batch_options(cfg.loss))
        self.sampler = PlanSampler(None, info.rank, info.world_size)
        warnings = (left_out_warning(len(self.train_set), cfg.train.global_batch_size, cfg.selection.strategy),
                    warmup_warning(cfg.selection, cfg.train.epochs))
        for warning in warnings:
            if warning and info.is_main:
                log.warning(warning)
        self.counters = TrainCounters()
        self.metrics: RunMetrics | None = None
        self.log_file: logging.Handler | None = None
        self.stop = StopRequest()
        # where the other ranks wait for rank 0's checkpoint write: longer than dist.timeout_s
        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=cfg.checkpoint.timeout_s))
        self.checkpoints = RunCheckpoints(self.run_dir / "checkpoints", cfg.checkpoint.keep, {
            "model": self.model, "loss": self.step_fn.loss_fn, "optimizer": self.optimizer,
            "scaler": self.step_fn.scaler, "bank": self.bank,
            "sampler": self.sampler, "next_plan": self.planner, "counters": self.counters,
            "rng": RankRNG(cfg.seed, info.rank, info.world_size, info.device),
        }, info.is_main, group)

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> None:
        """A collective. Weights that overflowed in an update from finite gradients are refused, so the
        newest checkpoint on disk is always one that training can continue from."""
        state = self.model.state_dict()
        bad = [name for name, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            walked = self.sampler.plan is not None and self.sampler.cursor
            where = self.describe_batch(self.sampler.cursor - 1) if walked else ""
            shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
            raise NonFiniteError(f"non-finite weights or buffers ({shown}) after the update of step "
                                 f"{self.counters.step - 1} {where}; not saving them over the last good checkpoint; "
                                 "lower train.lr or set train.grad_clip")
        mark_progress(f"checkpoint at step {self.counters.step}")
        self.bank.sync()
        self.planner.wait()  # rank 0 saves the plan computed ahead: every rank waits for it here, not in the barrier
        meta = {"config": self.cfg.to_dict(), "world_size": self.info.world_size, "version": dist_cl.__version__,
                "threads": torch.get_num_threads()}
        path = self.checkpoints.save(self.counters.step, meta)
        if path is not None:
            log.debug("saved checkpoint %s", path)  # train.log only: one a step would flood the terminal

    def resume(self, which: str) -> bool:
        """Load ``which`` ('auto', 'latest' or a path) on every rank, as rank 0 resolves it (a collective);
        'auto' resumes only where rank 0 finds a checkpoint."""
        loaded = self.checkpoints.load_agreed(which)
        if loaded is None:
            return False
        state, path, problems = loaded
        for problem in problems:
            log.warning("skipped checkpoint %s", problem)
        differences = config_differences(state["meta"]["config"], self.cfg.to_dict())
        if differences:
            raise CheckpointError(f"checkpoint {path} was made with an incompatible config "
                                  f"({'; '.join(differences)}); resume with the original config or start a new run.dir")
        self.checkpoints.restore(state)
        plan = self.sampler.plan
        for warning in resume_warnings(state["meta"], self.cfg, self.info.world_size, torch.get_num_threads(),
                                       self.counters.epoch + (self.sampler.cursor / len(plan) if plan else 0.0)):
            log.warning(warning)
        log.info("resumed from %s at epoch %d step %d", path, self.counters.epoch, self.counters.step)
        return True

    # ---------------------------------------------------------------- training
    def fit(self) -> None:
        cfg, counters = self.cfg, self.counters
        if counters.epoch >= cfg.train.epochs:
            log.info("run already complete at epoch %d/%d (step %d) in %s: raise train.epochs to train on, or set a "
                     "new run.dir to start again", counters.epoch, cfg.train.epochs, counters.step, self.run_dir)
            return
        started = time.perf_counter()
        if self.info.is_main:
            save_config(cfg, self.run_dir / "config.yaml")
            self.log_file = open_log_file(self.run_dir)
            backend = dist.get_backend() if dist.is_initialized() else "none"
            for line in banner(cfg, self.info.world_size, self.info.device, backend, len(self.train_set),
                               len(self.heldout_set) if self.heldout_set is not None else 0,
                               sum(p.numel() for p in self.model.parameters()), random_epochs(cfg.selection)):
                log.info(line)
        self.metrics = RunMetrics(self.run_dir, self.info.is_main, cfg.run.log_every_steps, cfg.train.epochs,
                                  counters.epoch, counters.step, cfg.train.global_batch_size)
        self.metrics.config(cfg.to_dict(), changed_keys(cfg), counters.step)
        if counters.step == 0 and cfg.eval.every_epochs:
            self.evaluate(None, SelectionFigures())
        while counters.epoch < cfg.train.epochs:
            figures = SelectionFigures()
            if self.sampler.plan is None:
                mark_progress(f"plan of epoch {counters.epoch}")
                plan, figures = self.planner.plan(counters.epoch, counters.step)
                self.sampler.start(plan)
                first_step = counters.step + len(plan)
                self.planner.plan_ahead(counters.epoch, counters.step, first_step, cfg.train.epochs)
            loss = self.train_epoch(figures)
            counters.epoch += 1
            counters.epoch_nonfinite = 0
            trained = self.sampler.plan
            self.planner.finish(trained)
            self.sampler.load_state_dict(None)
            every = cfg.eval.every_epochs
            if every and (counters.epoch % every == 0 or counters.epoch == cfg.train.epochs):
                self.evaluate(loss, figures)
                if len(trained):
                    self.metrics.batch(self.train_set, trained.batches[0], counters.step)
            self.save_checkpoint()
            if counters.epoch < cfg.train.epochs and self.stop.agreed():
                raise Preempted(f"stopped at the end of epoch {counters.epoch} (step {counters.step})")
        self.metrics.hparams()
        if self.info.is_main:
            saved = self.checkpoints.checkpointer.checkpoints()
            for line in summary(self.metrics.path, self.run_dir, counters.epoch, counters.step,
                                time.perf_counter() - started, saved[-1] if saved else None):
                log.info(line)

    def train_epoch(self, figures: SelectionFigures) -> float:
        """Train the rest of the sampler's plan; this epoch's mean loss."""
        cfg, counters, sampler = self.cfg, self.counters, self.sampler
        self.train_set.set_epoch(counters.epoch)
        bar = self.metrics.progress_bar(len(sampler.plan), sampler.cursor, counters.epoch)
        losses, scored, data_time, reselect_time = [], [], 0.0, 0.0
        started = tick = time.perf_counter()
        self.step_fn.ddp.train()
        while not sampler.done:
            loader = DataLoader(self.train_set, batch_sampler=sampler,
                                **loader_options(cfg.data.num_workers, self.info.device))
            for view_a, view_b, index in loader:
                waited = time.perf_counter() - tick
                data_time += waited
                loss, lift_pair, stop = self.train_one(view_a, view_b, index)
                if loss is not None:
                    losses.append(loss)
                    if lift_pair is not None:
                        scored.append(lift_pair)
                self.report_step(bar, losses, time.perf_counter() - started, waited)
                # before the checkpoint, so that one taken here already holds the re-selected rest
                reselected = self.planner.reselection_due(sampler.plan, sampler.cursor)
                if reselected:
                    began = time.perf_counter()
                    sampler.start(self.planner.reselect(sampler.plan, sampler.cursor, counters.step, figures),
                                  sampler.cursor)
                    reselect_time += time.perf_counter() - began
                # the epoch's last step is saved by fit() at the epoch's end; saving it here too would write
                # the same file twice, and a kill between the second write's renames would leave neither
                periodic = cfg.checkpoint.every_steps and counters.step % cfg.checkpoint.every_steps == 0
                if stop or (periodic and not sampler.done):
                    self.save_checkpoint()
                if stop:
                    raise Preempted(f"stopped after step {counters.step} (epoch {counters.epoch})")
                tick = time.perf_counter()
                if reselected:
                    break  # this loader walks the old plan
        bar.close()
        return self.report_epoch(losses, scored, data_time, time.perf_counter() - started - reselect_time, figures)

    def report_step(self, bar, losses: list, seconds: float, data_wait: float) -> None:
        """The progress bar after every step, the train/* scalars every run.log_every_steps steps: the step's
        own data wait, and tau and the skipped steps only where they can change (no flat cards)."""
        samples_s = len(losses) * self.cfg.train.global_batch_size / max(seconds, 1e-9)
        loss, lr = losses[-1] if losses else float("nan"), self.optimizer.param_groups[0]["lr"]
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{samples_s:.0f}")
        bar.update()
        scalars = {"loss": loss, "lr": lr, "samples_per_s": samples_s, "data_time_s": data_wait}
        if self.cfg.loss.learnable_tau:
            scalars["tau"] = float(self.model.temperature())
        if self.cfg.train.nonfinite == "skip":
            scalars["skipped_steps"] = self.counters.skipped_steps
        self.metrics.step(self.counters.step, scalars)

    def train_one(self, view_a, view_b, index) -> tuple[float | None, tuple[float, float] | None, bool]:
        """One step at the sampler's cursor: (its loss or None if skipped, at the steps that log
        selection/realised_lift the scoring losses of its batch and of a random global batch, both before
        the update, else None, whether every rank stops after it)."""
        counters, sampler = self.counters, self.sampler
        mark_progress(f"step {counters.step}")
        scoring = (counters.step + 1) % self.cfg.run.log_every_steps == 0
        random_loss = self.random_batch_loss() if scoring else None
        set_lr(self.optimizer, self.cfg.train, counters.epoch, sampler.cursor, len(sampler.plan))
        result = self.step_fn(view_a, view_b, index,
                              lambda: f"step {counters.step} {self.describe_batch(sampler.cursor)}", score=scoring,
                              stop_requested=self.stop.requested)
        counters.skipped_steps += result.skipped
        if result.loss is not None:
            self.bank.update(index, result.u, result.v, counters.step)
        else:
            self.check_skipped(len(sampler.plan))
        sampler.advance()
        counters.step += 1
        return result.loss, (result.score, random_loss) if result.score is not None else None, result.stop

    def check_skipped(self, epoch_steps: int) -> None:
        """Count a non-finite step skipped; stop the run once more than train.max_skipped_fraction of this
        epoch's ``epoch_steps`` were. Every rank takes the same decision: the skip is a reduced flag."""
        counters, cap = self.counters, self.cfg.train.max_skipped_fraction
        counters.epoch_nonfinite += 1
        if counters.epoch_nonfinite > cap * epoch_steps:
            raise SkippedStepsError(
                f"train.nonfinite=skip skipped {counters.epoch_nonfinite} of the {epoch_steps} steps of epoch "
                f"{counters.epoch} (the last at step {counters.step}), more than train.max_skipped_fraction={cap}: "
                "the weights are diverging or the data holds broken samples; lower train.lr, set "
                "train.grad_clip, or check the data (the skipped batches are in the warnings above)")

    @torch.no_grad()
    def random_batch_loss(self) -> float:
        """This rank's scoring loss (``TrainStep.score``) of a random global batch, under the model as it is
        before this step's update: the reference of selection/realised_lift. A collective (the loss gathers)."""
        rng = np.random.default_rng(derive_seed(self.cfg.seed, self.counters.epoch, self.counters.step))
        batch = rng.choice(len(self.train_set), self.cfg.train.global_batch_size, replace=False)
        samples = [self.train_set[int(i)] for i in self.sampler.local_slice(batch)]
        view_a, view_b = (torch.stack(views) for views in list(zip(*samples))[:2])
        return self.step_fn.score(view_a, view_b)

    def describe_batch(self, cursor: int) -> str:
        """Global batch ``cursor`` of this epoch's plan, for error messages."""
        batch = self.sampler.plan.batches[cursor]
        shown = ", ".join(map(str, batch[:16])) + (", ..." if len(batch) > 16 else "")
        return f"(epoch {self.counters.epoch}, global batch {cursor}, indices [{shown}])"

    def report_epoch(self, losses: list, scored: list, data_time: float, seconds: float,
                     figures: SelectionFigures) -> float:
        """Write the epoch's record (log line, TensorBoard, metrics.jsonl); its mean loss."""
        mean_loss = float(np.mean(losses)) if losses else float("nan")
        if scored:
            trained, random_losses = np.mean(scored, axis=0)
            figures.realised_lift = float(trained / random_losses)
        if figures.wait_seconds is not None:
            figures.share = figures.wait_seconds / (figures.wait_seconds + seconds)
        samples_s = len(losses) * self.cfg.train.global_batch_size / max(seconds, 1e-9)
        self.metrics.epoch(EpochRecord(epoch=self.counters.epoch + 1, strategy=self.sampler.plan.strategy,
                                       step=self.counters.step, steps=len(losses),
                                       loss=mean_loss, train_seconds=seconds, data_seconds=data_time,
                                       samples_per_s=samples_s, lr=self.optimizer.param_groups[0]["lr"],
                                       selection=figures))
        return mean_loss

    def evaluate(self, loss: float | None, figures: SelectionFigures) -> None:
        mark_progress(f"evaluation at step {self.counters.step}")
        broadcast_buffers(self.model)
        cfg = self.cfg
        metrics = evaluate(self.model, self.train_set, self.heldout_set, rank=self.info.rank,
                           world_size=self.info.world_size, device=self.info.device, knn_k=cfg.eval.knn_k,
                           tau=float(self.model.temperature()), train_pairs=cfg.eval.train_pairs,
                           corruptions=cfg.eval.corruptions, corruption_samples=cfg.eval.corruption_samples,
                           num_workers=cfg.data.num_workers)
        if self.info.is_main:
            self.metrics.evaluation(self.counters.epoch, self.counters.step, loss, metrics, figures)

    def close(self) -> None:
        self.planner.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.log_file is not None:
            close_log_file(self.log_file)
