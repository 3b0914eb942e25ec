"""Process group set-up from torchrun's environment, and the collectives the trainer needs.

On a CUDA host the default group serves both devices (gloo for CPU tensors, nccl for CUDA tensors); on
the CPU, or with ``dist.backend: gloo``, it is gloo alone. A plain ``python`` process gets a one-rank
group, so every code path runs the same collectives whatever the world size.
"""

import datetime
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_gather_single_autograd

from dist_cl.config import ConfigError


class RankDivergenceError(RuntimeError):
    """Ranks hold different plans or configs: continuing would silently train different things."""


class RankTimeoutError(RuntimeError):
    """A collective timed out; the message names the rank that stopped answering where that can be known."""


class Liveness:
    """Every rank's heartbeat and last progress mark, in the process group's store.

    A collective that times out only says that some peer did not answer, and torchrun then blames the
    rank that raised: the victim. Each rank's thread raises a counter in the store every ``interval``
    seconds, and the trainer marks where it is (``mark_progress``); the rank whose collective timed out
    reads them: a rank whose counter stands still has stopped (a frozen process, a dead host, a hung
    file system it cannot leave); a live rank whose mark is behind is stuck in its own work before the
    collective; where every rank is alive at the same mark, one of them is slow inside it.

    A frequent mark (one a step) is kept in memory and the heartbeat publishes the newest with its beat: a
    store round trip a step would cost a training step more than the mark is worth, and the rank that reads
    the marks waits three intervals first, by when each live rank has published where it is. A frozen rank's
    published mark may be up to an interval behind it; rare marks (a checkpoint, a plan) are published at once.
    """

    def __init__(self, store, rank: int, world_size: int, interval: float = 1.0):
        self.store = dist.PrefixStore("dist_cl/liveness", store)
        self.rank, self.world_size, self.interval = rank, world_size, interval
        self.marks = 0
        self.latest = "0 none yet"
        """``"<count> <what>"`` of this rank's newest mark, as the store holds it once published."""
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.beat, name="dist_cl-heartbeat", daemon=True)
        self.thread.start()

    def beat(self) -> None:
        published = None
        while not self.stopped.wait(self.interval):
            try:
                if self.latest is not published:
                    published = self.latest
                    self.store.set(f"mark/{self.rank}", published)
                self.store.add(f"beat/{self.rank}", 1)
            except RuntimeError:  # the store's host is gone: the job is ending, and the next collective says so
                return

    def mark(self, what: str, frequent: bool) -> None:
        self.marks += 1
        self.latest = f"{self.marks} {what}"  # one assignment: the heartbeat thread reads a whole mark or the last
        if not frequent:
            self.store.set(f"mark/{self.rank}", self.latest)

    def last_mark(self, rank: int) -> tuple[int, str]:
        key = f"mark/{rank}"
        if not self.store.check([key]):
            return 0, "none yet"
        count, what = self.store.get(key).decode().split(" ", 1)
        return int(count), what

    def who_stopped(self) -> str:
        """Which rank stopped answering, as far as the heartbeats and marks tell (takes 3 intervals)."""
        others = [r for r in range(self.world_size) if r != self.rank]
        before = {r: self.store.add(f"beat/{r}", 0) for r in others}
        self.stopped.wait(3 * self.interval)
        silent = [r for r in others if self.store.add(f"beat/{r}", 0) == before[r]]
        marks = {r: self.last_mark(r) for r in others}
        count, what = self.latest.split(" ", 1)
        mine = int(count), what
        if silent:
            return "; ".join(f"rank {r} stopped answering (no heartbeat for {3 * self.interval:.0f} s; its last mark: "
                             f"{marks[r][1]})" for r in silent)
        behind = [r for r in others if marks[r][0] < mine[0]]
        if behind:
            return "; ".join(f"rank {r} is alive but stuck before it (its last mark: {marks[r][1]})" for r in behind)
        return f"every rank is alive and at {mine[1]}: one of them is slow inside it"

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()


_liveness: Liveness | None = None


def mark_progress(what: str, frequent: bool = False) -> None:
    """Record where this rank is (e.g. "step 25"), for the message of a collective that times out;
    ``frequent`` marks (one a step) reach the store with the next heartbeat, the others at once."""
    if _liveness is not None:
        _liveness.mark(what, frequent)


def name_timeout(err: RuntimeError, timeout_s: float) -> RankTimeoutError | None:
    """``err`` as a RankTimeoutError naming the rank that stopped answering, if it is a collective's timeout."""
    if _liveness is None or "timed out" not in str(err).lower():
        return None
    try:
        who = _liveness.who_stopped()
    except RuntimeError as store_err:  # the store went down with the job
        who = f"the store that would tell which is gone too ({store_err})"
    return RankTimeoutError(f"rank {_liveness.rank}: a collective timed out after dist.timeout_s={timeout_s:g} s: "
                            f"{who}")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


Backend = Literal["auto", "gloo", "nccl"]

MIXED_BACKEND = "cpu:gloo,cuda:nccl"
"""The default group on CUDA. nccl takes CUDA tensors only, and several collectives are CPU-native by
nature: config and plan digests, the RNG states and strategy results that object collectives pickle,
the bank that FAISS and the strategies read on the host. A group that serves both devices sends each
tensor to the backend of its device, so none of them needs a host-device round trip (or a CUDA
context on the planner thread) to be collective-safe; the hot ones (gradients, gathered features, the
step's finite flag, bank rows) are CUDA tensors and go through nccl."""


def resolve_backend(requested: Backend, cuda_available: bool) -> tuple[str, str]:
    """(process group backend, device type) for ``dist.backend`` on a host with or without CUDA.

    auto: the mixed CUDA group where CUDA is visible, gloo on the CPU otherwise; gloo: the CPU even
    where CUDA is visible; nccl: CUDA or an error.
    """
    if requested == "gloo" or (requested == "auto" and not cuda_available):
        return "gloo", "cpu"
    if not cuda_available:
        raise ConfigError("dist.backend=nccl needs CUDA, and no CUDA device is visible; use dist.backend=auto "
                          "or gloo")
    return MIXED_BACKEND, "cuda"


def agent_nnodes() -> tuple[int, int]:
    """(fewest, most) nodes of the torchrun job this worker runs in: its agent's ``--nnodes`` (``N`` or
    ``MIN:MAX``). torchrun hands its workers no variable with them, so they are read from the agent's command
    line (the parent process's), or from ``PET_NNODES``, torchrun's environment form of the option."""
    try:
        arguments = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:  # no /proc: not Linux
        arguments = []
    value = os.environ.get("PET_NNODES", "1")
    for i, argument in enumerate(arguments):
        if argument.startswith("--nnodes="):
            value = argument.partition("=")[2]
            break
        if argument == "--nnodes" and i + 1 < len(arguments):
            value = arguments[i + 1]
            break
    fewest, _, most = value.partition(":")
    return int(fewest), int(most or fewest)


def refuse_shared_store_restarts(rank: int) -> None:
    """ConfigError where this worker runs on torchrun's shared store (``rendezvous_store``) in a job whose
    workers may restart: one of several nodes that may restart after a failure, or an elastic one
    (``--nnodes=MIN:MAX``), whose workers restart whenever a node joins, without spending a restart."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))  # torchrun's agents, one per node
    fewest, most = agent_nnodes()
    if fewest != most:  # its workers restart whenever a node joins, whatever --max-restarts says
        job, fix = f"an elastic job (torchrun --nnodes={fewest}:{most})", "or launch with a fixed --nnodes"
    elif nodes > 1 and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
        job, fix = f"a job of {nodes} nodes with torchrun --max-restarts > 0", "or launch with --max-restarts=0"
    else:
        return
    raise ConfigError(
        f"rank {rank}: {job} needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in every torchrun's environment; with "
        "torchrun's shared store, workers restarted after a failure or as nodes join wait for each other under "
        f"different names and the job is lost: export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (launch/slurm.sh "
        f"does), {fix}")


def rendezvous_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """The store the process group forms in: a fresh one for every round of workers.

    A round must not read the previous round's keys (its gloo addresses: ``connectFullMesh failed`` or a
    hang). Without ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, torchrun hands its workers the agent's own
    store, which outlives the rounds, so the keys are namespaced by ``TORCHELASTIC_RESTART_COUNT``: right
    on one node, but each agent counts its own restarts, so after a failure on several nodes the agents'
    workers wait under different names (docs/DESIGN.md, "Restarts on several nodes"), and such a job is
    refused when it may restart (``refuse_shared_store_restarts``). With the variable set, each round's
    rank-0 agent picks a free port and rank 0 hosts a new store there, as ``env://`` does; waiting for every
    rank bounds the group's formation by ``timeout``.
    """
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if host is None or port is None:
        raise RuntimeError(f"WORLD_SIZE={world_size} without MASTER_ADDR and MASTER_PORT: launch with torchrun")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return dist.TCPStore(host, int(port), world_size=world_size, is_master=rank == 0, timeout=timeout,
                             wait_for_workers=True)
    refuse_shared_store_restarts(rank)
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    client = dist.TCPStore(host, int(port), is_master=False, timeout=timeout)
    return dist.PrefixStore(f"dist_cl/restart{restart}", client)


def init_distributed(timeout_s: float = 600.0, backend: Backend = "auto") -> DistInfo:
    """Join (or create) the process group described by torchrun's environment variables, within
    ``timeout_s`` (every rank must have joined by then; see ``rendezvous_store``)."""
    global _liveness
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    backend, device_type = resolve_backend(backend, torch.cuda.is_available())
    device = torch.device("cpu")
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        if world_size > 1:
            store = rendezvous_store(rank, world_size, timeout)
        else:
            refuse_shared_store_restarts(rank)  # an elastic job of one rank grows into several
            store = dist.HashStore()
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=timeout,
            device_id=device if device.type == "cuda" else None,
        )
    except dist.DistError as err:  # a store or a peer that did not answer within the timeout
        raise RankTimeoutError(f"rank {rank}: the process group of {world_size} ranks did not form within "
                               f"dist.timeout_s={timeout_s:g} s ({err}); check that every node started "
                               "and reaches MASTER_ADDR:MASTER_PORT") from err
    if world_size > 1:
        _liveness = Liveness(store, rank, world_size)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def close_distributed() -> None:
    global _liveness
    if _liveness is not None:
        _liveness.close()
        _liveness = None
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    """Ranks in the default group; 1 where none is initialised."""
    return dist.get_world_size() if dist.is_initialized() else 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0; gradients flow back to each rank's rows (summed)."""
    if world_size() == 1:
        return x
    return all_gather_single_autograd(x.contiguous(), gather_dim=0, group=dist.group.WORLD).wait()


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate equally sized ``x`` from every rank along dim 0, without autograd."""
    if world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank, as in the checkpoint. DDP broadcasts them at
    the start of each forward, so after a step every rank holds its own update: a pass in eval mode with
    those (evaluation, a bank refresh) would differ between ranks and from a run resumed from the checkpoint.
    One broadcast per dtype and device, not per buffer: a model has dozens of small ones."""
    if world_size() == 1:
        return
    groups: dict[tuple, list[torch.Tensor]] = {}
    for buffer in module.buffers():
        groups.setdefault((buffer.dtype, buffer.device), []).append(buffer)
    for buffers in groups.values():
        flat = torch.cat([buffer.reshape(-1) for buffer in buffers])
        dist.broadcast(flat, src=0)
        for buffer, part in zip(buffers, flat.split([buffer.numel() for buffer in buffers])):
            buffer.copy_(part.view_as(buffer))


def check_same_on_all_ranks(what: str, digest: str) -> None:
    """Raise on every rank if the hex ``digest`` of ``what`` is not the same on all ranks."""
    if world_size() == 1:
        return
    value = torch.tensor([int(digest[:15], 16)], dtype=torch.int64)  # a CPU tensor: gloo's, in any group
    lo, hi = value.clone(), value.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if lo.item() != hi.item():
        raise RankDivergenceError(f"rank {dist.get_rank()}: the {what} differs between ranks; check that every "
                                  "rank runs the same code, config and data")


def distributed_map(fn: Callable[[Any], Any], items: Sequence[Any], group=None) -> list[Any]:
    """``[fn(x) for x in items]`` with the items dealt round-robin over the ranks; every rank gets all results.

    Each result is computed once, by one rank, and does not depend on which: the output is identical for
    any world size. A collective over ``group`` (default: all ranks): every rank must call it with the
    same items.
    """
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return [fn(x) for x in items]
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    mine = {i: fn(items[i]) for i in range(rank, len(items), world_size)}
    gathered: list[dict] = [{} for _ in range(world_size)]
    dist.all_gather_object(gathered, mine, group=group)
    merged = {i: result for part in gathered for i, result in part.items()}
    return [merged[i] for i in range(len(items))]


def exit_process(code: int) -> None:
    """End a worker process without interpreter finalization, after flushing logs and output.

    With torch 2.14.1, gloo's threads abort about one clean exit in fifteen during finalization
    ("terminate called without an active exception", SIGABRT), after all work and destroy_process_group
    are done; torchrun then reports the run as failed. Call this last, once everything is written.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
