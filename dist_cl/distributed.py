"""Process group set-up from torchrun's environment, and the collectives the trainer needs.

On a CUDA host the default group serves both devices (gloo for CPU tensors, nccl for CUDA tensors); on
the CPU, or with ``dist.backend: gloo``, it is gloo alone. A plain ``python`` process gets a one-rank
group, so every code path runs the same collectives whatever the world size.
"""

import datetime
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_gather_single_autograd

from dist_cl.config import ConfigError


class RankDivergenceError(RuntimeError):
    """Ranks hold different plans or configs: continuing would silently train different things."""


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


def served_devices(backend: str) -> set[str]:
    """Device types whose tensors a group of ``backend`` takes."""
    if ":" in backend:
        return {pair.split(":")[0] for pair in backend.split(",")}
    return {"gloo": {"cpu"}, "nccl": {"cuda"}}[backend]


def init_distributed(timeout_s: float = 600.0, backend: Backend = "auto") -> DistInfo:
    """Join (or create) the process group described by torchrun's environment variables.

    After a torchrun restart the agent's store still holds the previous round's gloo addresses, and a
    plain ``init_process_group`` reads them (``Gloo connectFullMesh failed`` or a hang). Namespacing
    the group's keys by ``TORCHELASTIC_RESTART_COUNT`` makes every round start from a clean slate.
    """
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    backend, device_type = resolve_backend(backend, torch.cuda.is_available())
    device = torch.device("cpu")
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    if "MASTER_ADDR" in os.environ and world_size > 1:
        client = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout
        )
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"dist_cl/restart{restart}", client)
    else:
        store = dist.HashStore()
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=world_size, timeout=timeout,
        device_id=device if device.type == "cuda" else None,
    )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def close_distributed() -> None:
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
