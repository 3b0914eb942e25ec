"""The training loop: ask the planner for an epoch's plan, train on it under DDP, report, evaluate, checkpoint.

It orchestrates components that each own one job (docs/DESIGN.md §3): the plan policy
(dist_cl.plan.planner), the step numerics (dist_cl.learn.step), the schedule (dist_cl.learn.optim), the reports
(dist_cl.report.training) and the checkpoint contents (dist_cl.runtime.checkpoint's component map).
Everything a step depends on is either in the checkpoint or derived from (seed, epoch, index), so a run killed
at any step and resumed ends with the weights of a run that was never interrupted.
"""

import datetime
import hashlib
import json
import logging
import time
from functools import partial

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

import dist_cl
from dist_cl.config import Config, ConfigError, config_differences, resume_warnings
from dist_cl.data import build_dataset, loader_options
from dist_cl.evaluate.metrics import evaluate
from dist_cl.learn.models import build_training_model, current_tau
from dist_cl.learn.optim import build_optimizer, set_lr
from dist_cl.learn.step import TrainCounters, TrainStep, check_finite_weights
from dist_cl.plan.bank import EmbeddingBank
from dist_cl.plan.figures import SelectionFigures
from dist_cl.plan.planner import EpochPlanner, bank_use
from dist_cl.plan.realised_lift import RealisedLift
from dist_cl.plan.sampler import PlanSampler
from dist_cl.report.training import TrainingReport
from dist_cl.runtime.checkpoint import RunCheckpoints, Stateful
from dist_cl.runtime.checkpoint_files import CheckpointError
from dist_cl.runtime.distributed import DistInfo, broadcast_buffers, check_same_on_all_ranks, mark_progress
from dist_cl.runtime.preemption import Preempted, StopRequest
from dist_cl.runtime.seeding import RankRNG, seed_rank

log = logging.getLogger("dist_cl")


class Trainer:
    """Builds a run's components from its config, then ``resume``, ``fit`` and ``close`` (a collective)."""

    def __init__(self, cfg: Config, info: DistInfo):
        self.cfg, self.info, self.run_dir = cfg, info, cfg.run_dir
        # first: what follows runs collectives whose number and order depend on the config
        digest = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()
        check_same_on_all_ranks("config", digest)
        torch.manual_seed(cfg.seed)  # the initial weights: the same on every rank
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
        seed_rank(cfg.seed, info.rank)  # the per-rank streams, here and nowhere else (dist_cl.runtime.seeding)
        reads_bank, self.writes_bank = bank_use(cfg.selection)
        self.bank = EmbeddingBank(len(self.train_set) if reads_bank else 0, cfg.model.embed_dim, info.device)
        self.planner = EpochPlanner(cfg, self.train_set, self.model, self.bank, info)
        self.sampler = PlanSampler(None, info.rank, info.world_size)
        self.lift = RealisedLift(self.train_set, self.sampler, self.step_fn.score, cfg.seed,
                                 cfg.train.global_batch_size, cfg.run.log_every_steps)
        self.counters = TrainCounters()
        self.report: TrainingReport | None = None
        self.stop = StopRequest()
        # where the other ranks wait for rank 0's checkpoint write: longer than dist.timeout_s
        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=cfg.checkpoint.timeout_s))
        self.checkpoints = RunCheckpoints(self.run_dir / "checkpoints", cfg.checkpoint.keep,
                                          self.checkpoint_components(), info.is_main, group)

    # ---------------------------------------------------------------- checkpoints
    def checkpoint_components(self) -> dict[str, Stateful]:
        """What a checkpoint holds: everything a step depends on that is not derived from the run seed."""
        return {"model": self.model, "loss": self.step_fn.loss_fn, "optimizer": self.optimizer,
                "scaler": self.step_fn.scaler, "bank": self.bank, "sampler": self.sampler, "planner": self.planner,
                "counters": self.counters, "rng": RankRNG(self.info.rank, self.info.world_size, self.info.device)}

    def save_checkpoint(self) -> None:
        """A collective; refuses weights that are not finite (``check_finite_weights``)."""
        sampler, step = self.sampler, self.counters.step
        walked = sampler.plan is not None and sampler.cursor
        check_finite_weights(self.model, f"step {step - 1}" + (f" {sampler.plan.describe(sampler.cursor - 1)}"
                                                                 if walked else ""))
        mark_progress(f"checkpoint at step {step}")
        self.bank.sync()
        meta = {"config": self.cfg.to_dict(), "world_size": self.info.world_size, "version": dist_cl.__version__,
                "threads": torch.get_num_threads()}
        path = self.checkpoints.save(step, meta)
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
        self.checkpoints.check_room()
        self.report = TrainingReport(cfg, self.info, counters, (
            len(self.train_set), len(self.heldout_set) if self.heldout_set is not None else 0,
            sum(p.numel() for p in self.model.parameters())))
        if counters.step == 0 and cfg.eval.every_epochs:
            self.evaluate_and_report(None, SelectionFigures())
        trained = None
        while counters.epoch < cfg.train.epochs:
            figures = SelectionFigures()
            if self.sampler.plan is None:
                mark_progress(f"plan of epoch {counters.epoch}")
                plan, figures = self.planner.plan(counters.epoch, counters.step, trained)
                self.sampler.start(plan)
            loss = self.train_epoch(figures)
            trained = self.sampler.plan
            counters.next_epoch()
            self.sampler.load_state_dict(None)
            every = cfg.eval.every_epochs
            if every and (counters.epoch % every == 0 or counters.epoch == cfg.train.epochs):
                self.evaluate_and_report(loss, figures)
                if len(trained):
                    self.report.metrics.batch(self.train_set, trained.batches[0], counters.step)
            self.save_checkpoint()
            if counters.epoch < cfg.train.epochs and self.stop.agreed():
                raise Preempted(f"stopped at the end of epoch {counters.epoch} (step {counters.step})")
        saved = self.checkpoints.checkpointer.checkpoints()
        self.report.finish(saved[-1] if saved else None)

    def train_epoch(self, figures: SelectionFigures) -> float:
        """Train the rest of the sampler's plan; this epoch's mean loss."""
        counters, sampler = self.counters, self.sampler
        self.train_set.set_epoch(counters.epoch)
        bar = self.report.progress_bar(len(sampler.plan), sampler.cursor)
        losses, data_time, waited_before = [], 0.0, figures.wait_seconds or 0.0
        started = tick = time.perf_counter()
        self.step_fn.ddp.train()
        while not sampler.done:
            loader = DataLoader(self.train_set, batch_sampler=sampler, collate_fn=self.train_set.collate,
                                **loader_options(self.cfg.data.num_workers, self.info.device))
            for view_a, view_b, index in loader:
                waited = time.perf_counter() - tick
                data_time += waited
                loss, stop = self.train_one(view_a, view_b, index)
                if loss is not None:
                    losses.append(loss)
                self.report.step(bar, losses, time.perf_counter() - started, waited,
                                 self.optimizer.param_groups[0]["lr"], partial(current_tau, self.model))
                # before the checkpoint, so that one taken here already holds the re-selected rest
                reselected = self.planner.reselect(sampler.plan, sampler.cursor, counters.step, figures)
                if reselected is not None:
                    sampler.start(reselected, sampler.cursor)
                self.checkpoint_after_step(stop)
                tick = time.perf_counter()
                if reselected is not None:
                    break  # this loader walks the old plan
        bar.close()
        reselecting = (figures.wait_seconds or 0.0) - waited_before  # added by planner.reselect
        figures.realised_lift = self.lift.take()
        return self.report.epoch(sampler.plan.strategy, losses, data_time,
                                 time.perf_counter() - started - reselecting, self.optimizer.param_groups[0]["lr"],
                                 figures)

    def train_one(self, view_a, view_b, index) -> tuple[float | None, bool]:
        """One step at the sampler's cursor: its loss (None if skipped), and whether every rank stops after it."""
        counters, sampler = self.counters, self.sampler
        mark_progress(f"step {counters.step}", frequent=True)
        reference = self.lift.reference_loss(counters.epoch, counters.step)  # before the update, where due
        set_lr(self.optimizer, self.cfg.train, counters.epoch, sampler.cursor, len(sampler.plan))
        result = self.step_fn(view_a, view_b, index,
                              lambda: f"step {counters.step} {sampler.plan.describe(sampler.cursor)}",
                              score=reference is not None, stop_requested=self.stop.requested)
        self.lift.add(result.score, reference)
        counters.skipped_steps += result.skipped
        if result.loss is None:
            counters.count_nonfinite(len(sampler.plan), self.cfg.train.max_skipped_fraction)
        elif self.writes_bank:
            self.bank.update(index, result.u, result.v, counters.step)
        sampler.advance()
        counters.step += 1
        return result.loss, result.stop

    def checkpoint_after_step(self, stop: bool) -> None:
        """Save every checkpoint.every_steps steps, and where some rank was asked to stop, then stop."""
        every, step = self.cfg.checkpoint.every_steps, self.counters.step
        # the epoch's last step is saved by fit() at the epoch's end, where a stop asked for in it is honoured:
        # saving it here too would write the same file twice (a kill between the second write's renames would
        # leave neither), and stopping here would leave the resumed run an epoch without steps to record
        if self.sampler.done:
            return
        if stop or (every and step % every == 0):
            self.save_checkpoint()
        if stop:
            raise Preempted(f"stopped after step {step} (epoch {self.counters.epoch})")

    def evaluate_and_report(self, loss: float | None, figures: SelectionFigures) -> None:
        """Evaluate the model (a collective) and log the metrics with the epoch's ``loss`` and ``figures``."""
        mark_progress(f"evaluation at step {self.counters.step}")
        broadcast_buffers(self.model)
        cfg = self.cfg
        metrics = evaluate(self.model, self.train_set, self.heldout_set, rank=self.info.rank,
                           world_size=self.info.world_size, device=self.info.device, knn_k=cfg.eval.knn_k,
                           tau=current_tau(self.model), train_pairs=cfg.eval.train_pairs, probe=cfg.eval.probe,
                           corruptions=cfg.eval.corruptions, corruption_samples=cfg.eval.corruption_samples,
                           num_workers=cfg.data.num_workers)
        self.report.evaluation(loss, metrics, figures)

    def close(self) -> None:
        self.planner.close()
        if self.report is not None:
            self.report.close()
