"""Process group set-up from torchrun's environment, and the collectives the trainer needs.

gloo on CPU, nccl on CUDA, chosen automatically. A plain ``python`` process gets a one-rank gloo group,
so every code path runs the same collectives whatever the world size.
"""

import datetime
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_gather_single_autograd


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


def init_distributed(timeout_s: float = 600.0) -> DistInfo:
    """Join (or create) the process group described by torchrun's environment variables.

    After a torchrun restart the agent's store still holds the previous round's gloo addresses, and a
    plain ``init_process_group`` reads them (``Gloo connectFullMesh failed`` or a hang). Namespacing
    the group's keys by ``TORCHELASTIC_RESTART_COUNT`` makes every round start from a clean slate.
    """
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
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
        device_id=device if backend == "nccl" else None,
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
    value = torch.tensor([int(digest[:15], 16)], dtype=torch.int64)
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
