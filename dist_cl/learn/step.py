"""Per-step numerics: the forward pass and loss under autocast, the backward pass, clipping, the update,
and what happens when something is not finite (``train.nonfinite``): a step skipped and counted against
``train.max_skipped_fraction`` (``TrainCounters``), weights that overflowed refused a checkpoint.

Every rank takes the same branch: the finite flags are reduced over the ranks on the device, and read
with the loss in the step's one host sync.

With ``train.accum_steps`` = k, each rank's rows go through the model in k micro-batches (``TrainStep.accumulate``).
"""

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from dist_cl.config import Config
from dist_cl.learn.losses import batch_options, build_loss
from dist_cl.runtime.distributed import world_size

log = logging.getLogger("dist_cl")


class NonFiniteError(FloatingPointError):
    """A non-finite loss or gradient; the message names the step and the batch."""


class SkippedStepsError(NonFiniteError):
    """train.nonfinite=skip skipped more than train.max_skipped_fraction of an epoch's steps."""


@dataclass
class TrainCounters:
    """Where training is: epochs completed, optimizer steps taken, steps skipped (a checkpoint component)."""

    epoch: int = 0
    step: int = 0
    skipped_steps: int = 0
    """Steps without an update: non-finite ones skipped under train.nonfinite=skip, and fp16 overflows."""
    epoch_nonfinite: int = 0
    """Steps of this epoch skipped as non-finite (what train.max_skipped_fraction caps)."""

    def count_nonfinite(self, epoch_steps: int, cap: float) -> None:
        """Count a step skipped as non-finite; stop the run once more than ``cap``
        (train.max_skipped_fraction) of this epoch's ``epoch_steps`` were. Every rank takes the same
        decision: the skip is a reduced flag."""
        self.epoch_nonfinite += 1
        if self.epoch_nonfinite > cap * epoch_steps:
            raise SkippedStepsError(
                f"train.nonfinite=skip skipped {self.epoch_nonfinite} of the {epoch_steps} steps of epoch {self.epoch} "
                f"(the last at step {self.step}), more than train.max_skipped_fraction={cap}: the weights are "
                "diverging or the data holds broken samples; lower train.lr, set train.grad_clip, or check the data "
                "(the skipped batches are in the warnings above)")

    def next_epoch(self) -> None:
        self.epoch += 1
        self.epoch_nonfinite = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step, self.skipped_steps = state["epoch"], state["step"], state["skipped_steps"]
        self.epoch_nonfinite = state.get("epoch_nonfinite", 0)  # absent from older checkpoints


def check_finite_weights(model: torch.nn.Module, where: str) -> None:
    """Refuse to save weights that overflowed in an update from finite gradients (``where`` names the
    update), so that the newest checkpoint on disk is always one training can continue from."""
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise NonFiniteError(f"non-finite weights or buffers ({shown}) after the update of {where}; not saving "
                             "them over the last good checkpoint; lower train.lr or set train.grad_clip")


@contextlib.contextmanager
def kept_buffers(model: torch.nn.Module) -> Iterator[None]:
    """Forward passes inside leave ``model``'s buffers (BatchNorm's running statistics) as they were."""
    buffers = [b.clone() for b in model.buffers()]
    yield
    if buffers:
        torch._foreach_copy_(list(model.buffers()), buffers)


class LossScaler(torch.amp.GradScaler):
    """fp16's loss scaler, resumable from a checkpoint written where it was off (no fp16, or not on CUDA),
    which holds no scaler state: it then starts at its initial scale, where torch's would raise."""

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict or not self.is_enabled():
            super().load_state_dict(state_dict)
        else:
            log.warning("the checkpoint holds no fp16 loss scale (written where fp16 was off); it starts afresh")


@dataclass
class StepResult:
    loss: float | None
    """This rank's loss; None where the step was skipped."""
    u: torch.Tensor
    v: torch.Tensor
    skipped: bool
    """No update was made: skipped under train.nonfinite=skip, or an fp16 overflow."""
    score: float | None = None
    """This rank's scoring loss of the batch (``loss_fn.score``) before the update, where asked; None where not
    asked or skipped."""
    stop: bool = False
    """Some rank was asked to stop (``stop_requested`` on any rank): the same answer on every rank."""


class TrainStep:
    """One optimizer step of ``model`` on this rank's slice of a global batch (a collective).

    ``model`` is the bare model (what is saved); the step runs it under DDP unless it averages its own
    gradients (the free-embedding model).
    """

    def __init__(self, cfg: Config, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int,
                 world_size: int, device: torch.device, num_samples: int):
        self.train, self.model, self.optimizer, self.device = cfg.train, model, optimizer, device
        self.ddp = model if getattr(model, "averages_own_gradients", False) else DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
        if cfg.train.compile:
            # the DDP wrapper, not the bare model: dynamo then splits the graph at DDP's buckets, so each
            # bucket's all-reduce still overlaps the rest of the backward pass
            self.ddp = torch.compile(self.ddp)
        options = ({"num_samples": num_samples, "gamma": cfg.loss.gamma} if cfg.loss.name == "sogclr"
                   else batch_options(cfg.loss))
        self.loss_fn = build_loss(cfg.loss.name, rank, world_size, **options).to(device)
        """Its state (SogCLR's u table) is a checkpoint component of its own (``Trainer``)."""
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.train.amp]
        if self.amp_dtype is not None and device.type != "cuda":
            log.warning("train.amp=%s needs CUDA; training in float32 on %s", cfg.train.amp, device)
            self.amp_dtype = None
        self.scaler = LossScaler("cuda", enabled=self.amp_dtype is torch.float16)
        saved = model.state_dict().keys()
        self.state_buffers = [b for name, b in model.named_buffers() if b.is_floating_point() and name in saved]
        """The floating buffers a checkpoint holds (BatchNorm's statistics), whose finiteness each step checks:
        a constant one outside it may hold -inf on purpose (open_clip's causal attention mask)."""

    def __call__(self, view_a, view_b, index: torch.Tensor, where: Callable[[], str], score: bool = False,
                 stop_requested: bool = False) -> StepResult:
        """One step on this rank's rows (sample indices ``index``); ``where()`` names the step and batch in the
        message of a non-finite one; ``score``: also give the batch's scoring loss (a collective: ask on every
        rank or none); ``stop_requested``: this rank was asked to stop, reduced with the step's own flags into
        ``StepResult.stop`` (dist_cl.runtime.preemption), so a stop costs no collective of its own."""
        view_a, view_b = view_a.to(self.device, non_blocking=True), view_b.to(self.device, non_blocking=True)
        # a skipped step leaves nothing behind: BatchNorm's running statistics and the loss's state included
        state = [*self.model.buffers(), *self.loss_fn.buffers()] if self.train.nonfinite == "skip" else []
        buffers = [b.clone() for b in state]
        self.optimizer.zero_grad(set_to_none=True)
        if self.train.accum_steps == 1:
            u, v, tau = self.forward(self.ddp, view_a, view_b)
            loss = self.loss_fn(u, v, tau, index)  # float32 with autocast off (dist_cl.learn.losses)
            self.scaler.scale(loss).backward()
        else:
            u, v, tau, loss = self.accumulate(view_a, view_b, index)
        scored = None
        if score and not self.loss_fn.scores_itself:
            with torch.no_grad():
                scored = self.loss_fn.score(u, v, tau)
        self.scaler.unscale_(self.optimizer)
        grad_norm = self.clip_gradients()
        finite_loss, finite_grad, finite_buffers, stop, value = self.outcome(loss, grad_norm, self.state_buffers,
                                                                             stop_requested)
        overflow = not finite_grad and self.amp_dtype is torch.float16
        if not finite_loss or not finite_buffers or (not finite_grad and not overflow):
            if buffers:
                torch._foreach_copy_(state, buffers)
            if self.scaler.is_enabled():
                self.scaler.update()  # closes the step unscale_ opened; the non-finite grads lower the scale
            what = "loss" if not finite_loss else "buffers (BatchNorm statistics)" if not finite_buffers else "gradient"
            self.fault(what, where())
            return StepResult(None, u, v, skipped=True, stop=stop)
        self.scaler.step(self.optimizer)  # under fp16, skips the update where the gradients overflowed
        self.scaler.update()
        if score:
            scored = value if scored is None else scored.item()
        return StepResult(value, u, v, skipped=overflow, score=scored, stop=stop)

    def clip_gradients(self) -> torch.Tensor:
        """The gradients' total norm (the finite flag's input), after clipping them to ``train.grad_clip`` where
        set: ``clip_grad_norm_`` in two halves, so that without a clip no step pays for a multiplication by 1."""
        # a coalesced sparse gradient's norm is its values' (its indices are unique): torch's foreach norm takes
        # them with the dense gradients, where a sparse tensor would get a norm call of its own
        norm = torch.nn.utils.get_total_norm([p.grad._values() if p.grad.is_sparse and p.grad.is_coalesced() else p.grad
                                              for p in self.model.parameters() if p.grad is not None])
        if self.train.grad_clip:
            torch.nn.utils.clip_grads_with_norm_(self.model.parameters(), self.train.grad_clip, norm)
        return norm

    def accumulate(self, view_a, view_b, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(u, v, tau, loss) of this rank's rows as the unaccumulated step makes them, and the gradients of the
        scaled loss in the parameters, from ``train.accum_steps`` micro-batches (GradCache, Gao et al. 2021;
        open_clip's --accum-freq computes the same gradients with the loss once per micro-batch).

        1. Every micro-batch's features without gradient (``features``): the rank's u, v, the cache.
        2. The loss of the global batch once from the cache (it gathers the ranks' rows, as unaccumulated), and
           its gradients w.r.t. the cached u, v, tau: SogCLR's u table is written once, with the same values.
        3. Each micro-batch again with gradient, back-propagated from its rows of those gradients; the
           parameters' gradients add up over the micro-batches to the unaccumulated step's. DDP all-reduces
           once, in the last micro-batch's backward (no_sync before it); tau's gradient goes back there too.
        """
        k = self.train.accum_steps
        u, v, tau = (x.requires_grad_() for x in self.features(view_a, view_b))
        loss = self.loss_fn(u, v, tau, index)
        # tau does not reach SogCLR's loss (it only weighs), hence allow_unused
        grad_u, grad_v, grad_tau = torch.autograd.grad(self.scaler.scale(loss), [u, v, tau], allow_unused=True)
        micro = zip(view_a.chunk(k), view_b.chunk(k), grad_u.chunk(k), grad_v.chunk(k))
        for j, (a, b, du, dv) in enumerate(micro):
            last = j == k - 1
            with contextlib.nullcontext() if last or self.ddp is self.model else self.ddp.no_sync():
                u_j, v_j, tau_j = self.forward(self.ddp, a, b)
                outputs, grads = [u_j, v_j], [du, dv]
                if last and tau_j.requires_grad and grad_tau is not None:
                    outputs.append(tau_j)
                    grads.append(grad_tau)
                torch.autograd.backward(outputs, grads)
        return u.detach(), v.detach(), tau.detach(), loss.detach()

    def forward(self, model, view_a, view_b) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(u, v, tau) of ``model`` (the DDP wrapper, or the bare model to score) under autocast."""
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            return model(view_a, view_b)

    @torch.no_grad()
    def features(self, view_a, view_b) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(u, v, tau) of the bare model in ``train.accum_steps`` micro-batches without gradient, as a trained
        step normalises them, BatchNorm's running statistics left as they were (so that in an accumulated
        step each sample updates them once, in the pass with gradient)."""
        with kept_buffers(self.model):
            micro = [self.forward(self.model, a, b) for a, b in zip(view_a.chunk(self.train.accum_steps),
                                                                    view_b.chunk(self.train.accum_steps))]
        return torch.cat([m[0] for m in micro]), torch.cat([m[1] for m in micro]), micro[-1][2].clone()

    @torch.no_grad()
    def score(self, view_a, view_b) -> float:
        """This rank's scoring loss (``loss_fn.score``: the training loss where it is defined per batch) of a
        global batch under the model as it is, in train mode and micro-batches like a trained batch, the
        loss's state untouched (a collective: the loss gathers)."""
        return self.loss_fn.score(*self.features(view_a.to(self.device), view_b.to(self.device))).item()

    @staticmethod
    def outcome(loss: torch.Tensor, grad_norm: torch.Tensor, buffers: list[torch.Tensor],
                stop_requested: bool = False) -> tuple[bool, bool, bool, bool, float]:
        """(loss finite on every rank, gradients finite, ``buffers`` finite, a stop requested on some rank,
        this rank's loss) in at most one all-reduce and one device-to-host copy.

        A forward pass can overflow BatchNorm's running variance to inf while the loss it returns stays
        finite (an input of 1e30 does), so the buffers are a flag of their own. Under fp16 the gradient
        flag is GradScaler's overflow test: unscale_ leaves a gradient inf or NaN exactly where it found one.
        """
        floating = [b.detach() for b in buffers]
        # x * 0 is 0 for a finite x and NaN for inf or NaN: a norm of the products cannot overflow
        zeros = [torch.stack(torch._foreach_norm(torch._foreach_mul(floating, 0.0))).sum()] if floating else []
        checked = torch.stack([loss.detach().float(), grad_norm.float(), *zeros])
        if world_size() == 1:  # no reduction to make: the host tests the values it reads anyway
            value, *rest = checked.tolist()
            finite, go_on = [math.isfinite(x) for x in (value, *rest)], not stop_requested
        else:
            go_on = torch.full((1,), not stop_requested, dtype=torch.bool, device=loss.device)  # a fill, not a copy
            flags = torch.cat([torch.isfinite(checked), go_on]).to(torch.float32)
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)  # MIN: false on any rank is false on all
            *finite, go_on, value = torch.cat([flags, checked[:1]]).tolist()
        return bool(finite[0]), bool(finite[1]), all(map(bool, finite[2:])), not go_on, value

    def fault(self, what: str, where: str) -> None:
        message = f"non-finite {what} at {where}"
        if self.train.nonfinite == "error":
            raise NonFiniteError(message + "; lower train.lr, set train.grad_clip, or train.nonfinite=skip")
        self.optimizer.zero_grad(set_to_none=True)
        log.warning("skipped: %s", message)
