"""Under torchrun: train through the trainer's command line (dist_cl.cli.train.main) with every torch.distributed
collective recorded, then write this rank's records (op, group, tensor device types) as JSON.
Usage: collective_devices.py OUT [k=v ...]."""

import inspect
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dist_cl.runtime.distributed import exit_process

OPS = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast", "reduce",
       "gather", "scatter", "all_to_all", "barrier", "all_gather_object", "broadcast_object_list", "gather_object")

records: list[dict] = []
group_backends: dict[int, str] = {}
"""The backend each group was created with, by id; the default group is 'default'."""


def tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in tensors(item)]
    return []


def record(name: str, fn):
    signature = inspect.signature(fn)

    def recorded(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        group = bound.arguments.get("group")
        default = group is None or group is dist.group.WORLD or group == dist.distributed_c10d._get_default_group()
        records.append({
            "op": name, "group": "default" if default else group_backends.get(id(group), "inherited"),
            "devices": sorted({t.device.type for value in bound.arguments.values() for t in tensors(value)}),
        })
        return fn(*args, **kwargs)

    return recorded


def new_group(*args, **kwargs):
    group = create_group(*args, **kwargs)
    group_backends[id(group)] = inspect.signature(create_group).bind(*args, **kwargs).arguments.get("backend") \
        or "inherited"
    return group


for op in OPS:
    setattr(dist, op, record(op, getattr(dist, op)))
create_group, dist.new_group = dist.new_group, new_group

from dist_cl.cli.train import main  # noqa: E402  (after the patching, so no name imported from dist is unrecorded)

out = Path(sys.argv[1])
code = main(sys.argv[2:])
(out / f"rank{os.environ.get('RANK', 0)}.json").write_text(json.dumps(records))
exit_process(code)
