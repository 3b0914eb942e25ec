"""The training loop: select a batch plan, train on it under DDP, log, evaluate, checkpoint, resume.

It orchestrates; the method (losses, selection, metrics) lives in its own modules. Everything a step
depends on is either in the checkpoint or derived from (seed, epoch, index), so a run killed at any
step and resumed ends with the weights of a run that was never interrupted.
"""

import datetime
import hashlib
import json
import logging
import math
import random
import sys
import time
from concurrent.futures import Future

import numpy as np
import torch
import torch.distributed as dist
from timm.optim import create_optimizer_v2
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import dist_cl
from dist_cl.bank import EmbeddingBank
from dist_cl.checkpoint import Checkpointer, CheckpointError
from dist_cl.config import FREE_FORM, Config, ConfigError, save_config
from dist_cl.data import build_dataset, loader_options
from dist_cl.distributed import DistInfo, check_same_on_all_ranks
from dist_cl.embed import embed_indices
from dist_cl.evaluation import evaluate
from dist_cl.losses import build_loss
from dist_cl.models import build_model
from dist_cl.planning import BackgroundPlanner, PlanRequest, compute_plan, resolved, select_everywhere
from dist_cl.sampler import BatchPlan, PlanSampler
from dist_cl.selection import STRATEGIES
from dist_cl.selection.diagnostics import label_purity, pair_repeat

log = logging.getLogger("dist_cl")

RESUMABLE_CHANGES = ("train.epochs", "eval.", "checkpoint.", "run.", "dist.", "data.num_workers")
"""Config keys that may differ between a checkpoint and the run resuming it."""


class NonFiniteError(FloatingPointError):
    """A non-finite loss or gradient; the message names the step and the batch."""


def derive_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def lr_factor(progress: float, warmup: float, total: float) -> float:
    """Linear warm-up to 1, then cosine decay to 0; ``progress`` in (fractional) epochs.

    Measured in epochs rather than steps because strategies differ in batches per epoch (osgd keeps q of
    every k), and derived from (epoch, cursor) alone, so the schedule needs no state of its own.
    """
    if progress < warmup:
        return progress / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (progress - warmup) / max(total - warmup, 1e-12))))


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key not in FREE_FORM:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(saved: dict, current: dict) -> list[str]:
    """Keys whose change makes a checkpoint unusable, with both values."""
    a, b = _flatten(saved), _flatten(current)
    return [
        f"{key}: checkpoint {a.get(key)!r} vs now {b.get(key)!r}"
        for key in sorted(set(a) | set(b))
        if a.get(key) != b.get(key) and not key.startswith(RESUMABLE_CHANGES)
    ]


class Trainer:
    def __init__(self, cfg: Config, info: DistInfo):
        self.cfg = cfg
        self.info = info
        self.run_dir = cfg.run_dir
        torch.manual_seed(cfg.seed)
        self.train_set = build_dataset(cfg, "train")
        self.heldout_set = build_dataset(cfg, "heldout")
        n = len(self.train_set)
        if cfg.train.global_batch_size > n:
            raise ConfigError(
                f"train.global_batch_size={cfg.train.global_batch_size} is larger than the {n} training samples; "
                "lower it or use more data"
            )
        channels = getattr(self.train_set, "channels", cfg.model.in_chans)
        if cfg.model.backbone != "free" and channels != cfg.model.in_chans:
            raise ConfigError(f"model.in_chans={cfg.model.in_chans} but the data has {channels}-channel images; "
                              f"set model.in_chans={channels}")
        self.model = build_model(cfg, n).to(info.device)
        if cfg.model.sync_bn and info.device.type == "cuda":
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        elif cfg.model.sync_bn:
            log.warning("model.sync_bn=true needs CUDA (torch's SyncBatchNorm has no CPU kernel); on %s each "
                        "rank's BatchNorm keeps normalising over its own slice of the batch", info.device)
        self.ddp = self.model if getattr(self.model, "averages_own_gradients", False) else DistributedDataParallel(
            self.model, device_ids=[info.device.index] if info.device.type == "cuda" else None
        )
        self.loss_fn = build_loss(cfg.loss.name, info.rank, info.world_size)
        t = cfg.train
        self.optimizer = create_optimizer_v2(
            self.model, opt={"sgd": "momentum"}.get(t.optimizer, t.optimizer),  # timm's "sgd" is Nesterov
            lr=t.lr, weight_decay=t.weight_decay,
            **({"momentum": t.momentum} if t.optimizer in ("sgd", "lars") else {}),
        )
        for group in self.optimizer.param_groups:
            group["base_lr"] = group["lr"]
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[t.amp]
        if self.amp_dtype is not None and info.device.type != "cuda":
            log.warning("train.amp=%s needs CUDA; training in float32 on %s", t.amp, info.device)
            self.amp_dtype = None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype is torch.float16)
        self.bank = EmbeddingBank(n, cfg.model.embed_dim, info.device)
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint.keep)
        self.writer: SummaryWriter | None = None
        self.epoch = 0
        self.step = 0
        self.skipped_steps = 0
        self.sampler: PlanSampler | None = None
        self.previous_plan: BatchPlan | None = None
        """The last epoch's plan, for selection/pair_repeat (not checkpointed: a diagnostic)."""
        self.next_plan: Future | None = None
        """The next epoch's (plan, figures), computed ahead by the planner under selection.overlap."""
        self.planner = BackgroundPlanner(info.device) if cfg.selection.overlap else None
        self.checkpoint_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(
            seconds=cfg.checkpoint.timeout_s))
        """Where the other ranks wait for rank 0's checkpoint write: longer than dist.timeout_s."""
        torch.manual_seed(derive_seed(cfg.seed, info.rank))
        np.random.seed(derive_seed(cfg.seed, info.rank) % 2**32)
        random.seed(derive_seed(cfg.seed, info.rank))

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "sampler": self.sampler.state_dict() if self.sampler is not None else None,
            "next_plan": self.next_plan_state(),
            "bank": self.bank.state_dict(),
            "config": self.cfg.to_dict(),
            "world_size": self.info.world_size,
            "version": dist_cl.__version__,
        }

    def save_checkpoint(self) -> None:
        """A collective: every rank syncs the bank and hands its RNG state to rank 0, which writes.

        Weights that overflowed in an update from finite gradients are refused, so the newest checkpoint
        on disk is always one that training can continue from.
        """
        norms = torch._foreach_norm([p.detach() for p in self.model.parameters()])
        if not torch.isfinite(torch.stack(norms)).all():
            where = self.describe_batch(self.sampler.cursor - 1) if self.sampler and self.sampler.cursor else ""
            raise NonFiniteError(f"non-finite weights after the update of step {self.step - 1} {where}; not saving "
                                 f"them over the last good checkpoint; lower train.lr or set train.grad_clip")
        self.bank.sync()
        if self.next_plan is not None:
            self.next_plan.result()  # rank 0 saves it: every rank waits for it here, not in the barrier
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        if self.info.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.info.device)
        rngs = [None] * self.info.world_size
        dist.all_gather_object(rngs, rng)
        if self.info.is_main:
            state = self.state_dict()
            state["rng"] = rngs
            path = self.checkpointer.save(state, self.step)
            log.info("saved checkpoint %s", path)
        dist.barrier(group=self.checkpoint_group)

    def resume(self, which: str) -> bool:
        """Load ``which`` ('auto', 'latest' or a path); 'auto' resumes only where a checkpoint exists."""
        if which == "auto":
            if not self.checkpointer.checkpoints():
                return False
            which = "latest"
        state, path, problems = self.checkpointer.load(which)
        for problem in problems:
            log.warning("skipped checkpoint %s", problem)
        differences = config_differences(state["config"], self.cfg.to_dict())
        if differences:
            raise CheckpointError(
                f"checkpoint {path} was made with an incompatible config ({'; '.join(differences)}); "
                "resume with the original config or start a new run.dir"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.bank.load_state_dict(state["bank"])
        self.epoch, self.step, self.skipped_steps = state["epoch"], state["step"], state["skipped_steps"]
        self.sampler = None
        if state["sampler"] is not None:
            plan = BatchPlan.from_state_dict(state["sampler"]["plan"])
            self.sampler = PlanSampler(plan, self.info.rank, self.info.world_size, state["sampler"]["cursor"])
        if state.get("next_plan") is not None:
            self.next_plan = resolved(BatchPlan.from_state_dict(state["next_plan"]["plan"]),
                                      state["next_plan"]["figures"])
        if state["world_size"] == self.info.world_size:
            rng = state["rng"][self.info.rank]
            torch.set_rng_state(rng["torch"])
            np.random.set_state(rng["numpy"])
            random.setstate(rng["python"])
            if "cuda" in rng and self.info.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.info.device)
        else:
            log.warning("resuming on %d ranks from %d: per-rank RNG streams restart (plans and bank are kept)",
                        self.info.world_size, state["world_size"])
        log.info("resumed from %s at epoch %d step %d", path, self.epoch, self.step)
        return True

    # ---------------------------------------------------------------- selection
    def plan_request(self, epoch: int, first_step: int, copy_bank: bool = False) -> PlanRequest:
        """What the plan for ``epoch`` is computed from: the bank as it is now (a collective).

        The plan starts at global step ``first_step``. ``copy_bank`` for a plan computed while training
        goes on writing the bank (N x d twice: 1 GB at N = 1M, d = 128, so not when computed at once).
        A loss-aware strategy waits ``selection.warmup_epochs`` epochs (in either embeddings mode): until
        then the plan is random.
        """
        cfg = self.cfg
        started = time.perf_counter()
        name = cfg.selection.strategy
        if STRATEGIES[name].reads_embeddings and self.epoch < cfg.selection.warmup_epochs:
            name = "random"  # warm-up: the bank is not filled yet, or the embeddings not yet worth selecting on
        request = dict(epoch=epoch, strategy=name, batch_size=cfg.train.global_batch_size,
                       seed=derive_seed(cfg.seed, epoch) if STRATEGIES[name].per_epoch else cfg.seed,
                       num_samples=len(self.train_set),
                       options=cfg.selection.options if name == cfg.selection.strategy else {})
        if STRATEGIES[name].reads_embeddings:
            self.refresh_bank(self.epoch)
            u, v = self.bank.u.numpy(), self.bank.v.numpy()
            request.update(u=u.copy() if copy_bank else u, v=v.copy() if copy_bank else v,
                           tau=float(self.model.temperature()),
                           staleness=self.bank.staleness(first_step))
        return PlanRequest(**request, prepare_seconds=time.perf_counter() - started)

    def take_plan(self) -> tuple[BatchPlan, dict]:
        """This epoch's global batches, identical on every rank: the one computed ahead, or one made now."""
        started = time.perf_counter()
        if self.next_plan is not None:
            plan, figures = self.next_plan.result()
            # the bank snapshot was taken on this thread, the rest overlapped the previous epoch
            waited = figures["selection/prepare_seconds"] + time.perf_counter() - started
            figures = {**figures, "selection/wait_seconds": waited}
            self.next_plan = None
        else:
            plan, figures = compute_plan(self.plan_request(self.epoch, self.step), device=self.info.device)
            figures["selection/wait_seconds"] = time.perf_counter() - started
        if plan.epoch != self.epoch:
            raise RuntimeError(f"the plan computed ahead is for epoch {plan.epoch}, not {self.epoch}")
        check_same_on_all_ranks("batch plan", plan.digest())
        return plan, {**figures, **self.plan_diagnostics(plan)}

    def plan_diagnostics(self, plan: BatchPlan) -> dict:
        """selection/label_purity where there are labels; selection/pair_repeat where this plan and the last
        epoch's are both partitions."""
        figures = {}
        if self.train_set.labels is not None:
            figures["selection/label_purity"] = label_purity(plan.batches, self.train_set.labels)
        previous = self.previous_plan
        if previous is not None and STRATEGIES[plan.strategy].partition and STRATEGIES[previous.strategy].partition:
            figures["selection/pair_repeat"] = pair_repeat(plan.batches, previous.batches, len(self.train_set))
        return figures

    def plan_ahead(self) -> None:
        """Start computing the next epoch's plan on the planner, from the bank as it is now."""
        if self.planner is not None and self.epoch + 1 < self.cfg.train.epochs:
            first_step = self.step + len(self.sampler.plan) - self.sampler.cursor
            self.next_plan = self.planner.submit(self.plan_request(self.epoch + 1, first_step, copy_bank=True))

    def next_plan_state(self) -> dict | None:
        """The plan computed ahead, waited for: a checkpoint must resume with it, not recompute it from a
        bank that training has moved on."""
        if self.next_plan is None:
            return None
        plan, figures = self.next_plan.result()
        return {"plan": plan.state_dict(), "figures": figures}

    def refresh_bank(self, epoch: int) -> None:
        """Make the bank complete: everything (refresh mode) or only rows never written (training mode)."""
        self.bank.sync()
        if self.cfg.selection.embeddings == "refresh":
            indices = torch.arange(len(self.train_set))
        else:
            indices = self.bank.missing()
        if len(indices) == 0:
            return
        self.train_set.set_epoch(epoch)
        u, v = embed_indices(
            self.model, self.train_set, indices.numpy(), rank=self.info.rank, world_size=self.info.world_size,
            device=self.info.device, augmented=True, num_workers=self.cfg.data.num_workers,
        )
        self.bank.fill(indices, u, v, self.step)

    # ---------------------------------------------------------------- training
    def train_step(self, view_a, view_b, index) -> float | None:
        """One optimizer step on this rank's slice of the global batch; None if skipped.

        One host sync: the step's finite flags and loss value, read together after the backward pass.
        """
        device = self.info.device
        self.set_lr()
        view_a, view_b = view_a.to(device, non_blocking=True), view_b.to(device, non_blocking=True)
        # a skipped step must not leave its NaNs in BatchNorm's running statistics either
        buffers = [b.clone() for b in self.model.buffers()] if self.cfg.train.nonfinite == "skip" else None
        u, v, loss = self.forward_loss(self.ddp, view_a, view_b)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.train.grad_clip or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        finite_loss, finite_grad, value = self.step_outcome(loss, grad_norm)
        overflow = not finite_grad and self.amp_dtype is torch.float16
        if not finite_loss or (not finite_grad and not overflow):
            if buffers is not None and not finite_loss:
                torch._foreach_copy_(list(self.model.buffers()), buffers)
            if self.scaler.is_enabled():
                self.scaler.update()  # closes the step unscale_ opened; the non-finite grads lower the scale
            return self.fault("loss" if not finite_loss else "gradient")
        self.scaler.step(self.optimizer)  # under fp16, skips the update where the gradients overflowed
        self.scaler.update()
        if overflow:
            self.skipped_steps += 1
        self.bank.update(index, u, v, self.step)
        return value

    def forward_loss(self, model, view_a, view_b) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(u, v, loss of the global batch) of ``model`` (the DDP wrapper, or the bare model to score)."""
        with torch.autocast(self.info.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            u, v, tau = model(view_a, view_b)
            loss = self.loss_fn(u, v, tau)  # float32 with autocast off (dist_cl.losses)
        return u, v, loss

    @torch.no_grad()
    def random_batch_loss(self) -> float:
        """This rank's loss on a random global batch, under the model as it is before this step's update and
        in train mode like the trained batch, BatchNorm's running statistics left as they were: the
        reference of selection/realised_lift. A collective (the loss gathers)."""
        cfg = self.cfg
        rng = np.random.default_rng(derive_seed(cfg.seed, self.epoch, self.step))
        batch = rng.choice(len(self.train_set), cfg.train.global_batch_size, replace=False)
        samples = [self.train_set[int(i)] for i in self.sampler.local_slice(batch)]
        view_a, view_b = (torch.stack(views).to(self.info.device) for views in list(zip(*samples))[:2])
        buffers = [b.clone() for b in self.model.buffers()]
        _, _, loss = self.forward_loss(self.model, view_a, view_b)
        torch._foreach_copy_(list(self.model.buffers()), buffers)
        return loss.item()

    def set_lr(self) -> float:
        """The schedule's lr for the step at the sampler's cursor (half a step in, so none is zero)."""
        progress = self.epoch + (self.sampler.cursor + 0.5) / len(self.sampler.plan)
        factor = lr_factor(progress, self.cfg.train.warmup_epochs, self.cfg.train.epochs)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        return self.optimizer.param_groups[0]["lr"]

    def step_outcome(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> tuple[bool, bool, float]:
        """(loss finite on every rank, gradients finite, this rank's loss) in one device-to-host copy.

        The flags are reduced on the device, so every rank takes the same branch. Under fp16 the gradient
        flag is GradScaler's overflow test: unscale_ leaves a gradient inf or NaN exactly where it found one.
        """
        flags = torch.stack([torch.isfinite(loss.detach()), torch.isfinite(grad_norm)]).to(torch.float32)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        finite_loss, finite_grad, value = torch.cat([flags, loss.detach().float().reshape(1)]).tolist()
        return bool(finite_loss), bool(finite_grad), value

    def describe_batch(self, cursor: int) -> str:
        batch = self.sampler.plan.batches[cursor]
        shown = ", ".join(map(str, batch[:16])) + (", ..." if len(batch) > 16 else "")
        return f"(epoch {self.epoch}, global batch {cursor}, indices [{shown}])"

    def fault(self, what: str) -> None:
        message = f"non-finite {what} at step {self.step} {self.describe_batch(self.sampler.cursor)}"
        if self.cfg.train.nonfinite == "error":
            raise NonFiniteError(message + "; lower train.lr, set train.grad_clip, or train.nonfinite=skip")
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_steps += 1
        log.warning("skipped: %s", message)
        return None

    def train_epoch(self, figures: dict) -> float:
        cfg, info = self.cfg, self.info
        self.train_set.set_epoch(self.epoch)
        bar = tqdm(total=len(self.sampler.plan), initial=self.sampler.cursor, desc=f"epoch {self.epoch}",
                   disable=not (info.is_main and sys.stderr.isatty()), dynamic_ncols=True, leave=False)
        losses, started, data_time, tick = [], time.perf_counter(), 0.0, time.perf_counter()
        reselect_seconds = 0.0
        scored: list[tuple[float, float]] = []  # (trained, random) batch losses at the logged steps
        self.ddp.train()
        while self.sampler.cursor < len(self.sampler.plan):
            loader = DataLoader(self.train_set, batch_sampler=self.sampler,
                                **loader_options(cfg.data.num_workers, info.device))
            for view_a, view_b, index in loader:
                data_time += time.perf_counter() - tick
                log_step = (self.step + 1) % cfg.run.log_every_steps == 0
                random_loss = self.random_batch_loss() if log_step else None
                loss = self.train_step(view_a, view_b, index)
                if log_step and loss is not None:
                    scored.append((loss, random_loss))
                self.sampler.cursor += 1
                self.step += 1
                if loss is not None:
                    losses.append(loss)
                elapsed = time.perf_counter() - started
                samples_per_s = len(losses) * cfg.train.global_batch_size / max(elapsed, 1e-9)
                lr = self.optimizer.param_groups[0]["lr"]
                bar.set_postfix(loss=f"{losses[-1] if losses else float('nan'):.4f}", lr=f"{lr:.2e}",
                                samples_s=f"{samples_per_s:.0f}")
                bar.update()
                if self.writer is not None and self.step % cfg.run.log_every_steps == 0:
                    self.writer.add_scalar("train/loss", losses[-1] if losses else float("nan"), self.step)
                    self.writer.add_scalar("train/lr", lr, self.step)
                    self.writer.add_scalar("train/samples_per_s", samples_per_s, self.step)
                    self.writer.add_scalar("train/data_time_s", data_time, self.step)
                    self.writer.add_scalar("train/tau", float(self.model.temperature()), self.step)
                    self.writer.add_scalar("train/skipped_steps", self.skipped_steps, self.step)
                # before the checkpoint, so that one taken here already holds the re-selected rest
                reselected = self.reselect_due()
                if reselected:
                    reselect_seconds += self.reselect_rest()
                if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0:
                    self.save_checkpoint()
                tick = time.perf_counter()
                if reselected:
                    break  # this loader walks the old plan
        bar.close()
        epoch_seconds = time.perf_counter() - started - reselect_seconds
        mean_loss = float(np.mean(losses)) if losses else float("nan")
        if scored:
            trained, random_losses = np.mean(scored, axis=0)
            figures["selection/realised_lift"] = float(trained / random_losses)
        if reselect_seconds:
            figures["selection/seconds"] = figures.get("selection/seconds", 0.0) + reselect_seconds
            figures["selection/wait_seconds"] = figures.get("selection/wait_seconds", 0.0) + reselect_seconds
        log.info(
            "epoch %d step %d | data %.2fs total %.2fs | %.0f samples/s | lr %.3e | loss %.4f | selection %.2fs "
            "(waited %.2fs)",
            self.epoch, self.step, data_time, epoch_seconds,
            len(losses) * cfg.train.global_batch_size / max(epoch_seconds, 1e-9),
            self.optimizer.param_groups[0]["lr"], mean_loss, figures.get("selection/seconds", 0.0),
            figures.get("selection/wait_seconds", 0.0),
        )
        if "selection/wait_seconds" in figures:
            waited = figures["selection/wait_seconds"]
            figures["selection/share"] = waited / (waited + epoch_seconds)
        return mean_loss

    def reselect_due(self) -> bool:
        """selection.every_steps: time to re-partition the rest of a loss-aware epoch plan."""
        every, cursor, plan = self.cfg.selection.every_steps, self.sampler.cursor, self.sampler.plan
        return bool(every) and plan.strategy == self.cfg.selection.strategy and cursor % every == 0 \
            and cursor < len(plan)

    def reselect_rest(self) -> float:
        """Re-partition the samples of the batches not trained yet this epoch, by the bank as it is now
        (a collective); the seconds it took. The epoch still covers each of its samples once."""
        started = time.perf_counter()
        cfg, plan, cursor = self.cfg, self.sampler.plan, self.sampler.cursor
        rest = np.sort(plan.batches[cursor:].ravel())
        self.refresh_bank(self.epoch)
        chosen = select_everywhere(cfg.selection.strategy, self.bank.u.numpy()[rest], self.bank.v.numpy()[rest],
                                   cfg.train.global_batch_size, seed=derive_seed(cfg.seed, self.epoch, cursor),
                                   tau=float(self.model.temperature()), device=self.info.device,
                                   **cfg.selection.options)
        plan.batches = np.concatenate([plan.batches[:cursor], rest[chosen]])
        check_same_on_all_ranks("batch plan", plan.digest())
        return time.perf_counter() - started

    def log_eval(self, loss: float | None, figures: dict) -> None:
        self.broadcast_buffers()
        metrics = evaluate(self.model, self.train_set, self.heldout_set, rank=self.info.rank,
                           world_size=self.info.world_size, device=self.info.device, knn_k=self.cfg.eval.knn_k,
                           tau=float(self.model.temperature()), train_pairs=self.cfg.eval.train_pairs,
                           corruptions=self.cfg.eval.corruptions, corruption_samples=self.cfg.eval.corruption_samples,
                           num_workers=self.cfg.data.num_workers)
        if self.writer is None:
            return
        for key, value in metrics.items():
            # training-set metrics beside train/loss: train/full_batch_loss is the paper's objective
            tag = f"train/{key.removeprefix('train_')}" if key.startswith("train_") else f"eval/{key}"
            self.writer.add_scalar(tag, value, self.step)
        record = {"epoch": self.epoch, "step": self.step, "loss": loss, **metrics, **figures}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        log.info("eval epoch %d step %d | %s", self.epoch, self.step,
                 " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    def broadcast_buffers(self) -> None:
        """Rank 0's buffers (BatchNorm statistics) on every rank, as in the checkpoint. DDP broadcasts them
        at the start of each forward, so after the last step every rank holds its own update; evaluating
        with those made the logged metrics of a multi-rank run differ from its checkpoint's."""
        for buffer in self.model.buffers():
            dist.broadcast(buffer, src=0)

    def fit(self) -> None:
        cfg = self.cfg
        if self.info.is_main:
            save_config(cfg, self.run_dir / "config.yaml")
            self.writer = SummaryWriter(str(self.run_dir / "tb"))
        check_same_on_all_ranks("config", hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest())
        if self.step == 0 and cfg.eval.every_epochs:
            self.log_eval(None, {})
        while self.epoch < cfg.train.epochs:
            figures = {}
            if self.sampler is None:
                plan, figures = self.take_plan()
                self.sampler = PlanSampler(plan, self.info.rank, self.info.world_size)
                self.plan_ahead()
            loss = self.train_epoch(figures)
            if self.writer is not None:
                for key, value in figures.items():
                    self.writer.add_scalar(key, value, self.step)
            self.epoch += 1
            self.previous_plan, self.sampler = self.sampler.plan, None
            last = self.epoch == cfg.train.epochs
            if cfg.eval.every_epochs and (
                self.epoch % cfg.eval.every_epochs == 0 or last
            ):
                self.log_eval(loss, figures)
            self.save_checkpoint()

    def close(self) -> None:
        if self.planner is not None:
            self.planner.close()
        if self.writer is not None:
            self.writer.close()
