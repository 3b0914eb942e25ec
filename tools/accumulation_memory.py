"""Peak activation memory of one training step per rank at several train.accum_steps (docs/BENCHMARKS.md).

One process (a process group of one, so the per-rank batch is the global batch) trains TrainStep on random
images of the config's model. On the CPU the activation memory is the largest total of the tensors autograd
keeps for the backward pass (saved_tensors_hooks; each storage counted once while some graph holds it, the
parameters not counted); on CUDA, torch.cuda.max_memory_allocated too (weights, gradients and optimizer state
included). Memory does not depend on the machine's load; no time is measured.

    python tools/accumulation_memory.py --config configs/cifar100_32px.yaml --accum-steps 1 2 4 8 \\
        train.global_batch_size=128 data.path=. model.sync_bn=false

(only the config's model is built: data.path need only exist.)
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

from dist_cl.config import load_config
from dist_cl.learn.models import build_training_model
from dist_cl.learn.optim import build_optimizer
from dist_cl.learn.step import TrainStep
from dist_cl.runtime.distributed import close_distributed, init_distributed

ROOT = Path(__file__).resolve().parent.parent


class SavedTensorMeter:
    """The bytes of the storages autograd holds for backward passes, now and at most."""

    def __init__(self, excluded: set[int]):
        self.excluded, self.held, self.bytes, self.peak = excluded, {}, 0, 0

    def pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.excluded:
            return tensor
        size, holders = self.held.get(key, (storage.nbytes(), 0))
        if holders == 0:
            self.bytes += size
            self.peak = max(self.peak, self.bytes)
        self.held[key] = (size, holders + 1)
        return _Held(tensor, key, self)

    @staticmethod
    def unpack(packed):
        return packed.tensor if isinstance(packed, _Held) else packed

    def release(self, key: int) -> None:
        size, holders = self.held[key]
        self.held[key] = (size, holders - 1)
        if holders == 1:
            self.bytes -= size


class _Held:
    """A saved tensor; the meter forgets it when the graph that holds it is freed."""

    def __init__(self, tensor: torch.Tensor, key: int, meter: SavedTensorMeter):
        self.tensor, self.key, self.meter = tensor, key, meter

    def __del__(self):
        self.meter.release(self.key)


def step_memory(cfg, device: torch.device, shape: tuple[int, ...], steps: int) -> tuple[int, int | None]:
    """(peak saved-tensor bytes, peak CUDA bytes or None) over the last of ``steps`` steps on random images."""
    torch.manual_seed(cfg.seed)
    model = build_training_model(cfg, shape[0], cfg.model.in_chans, device)
    step_fn = TrainStep(cfg, model, build_optimizer(model, cfg.train), 0, 1, device, shape[0])
    step_fn.ddp.train()
    index = torch.arange(shape[0])
    meter = None
    for _ in range(steps):  # the first steps create the optimizer state, which is no activation
        meter = SavedTensorMeter({p.untyped_storage().data_ptr() for p in model.parameters()})
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
            step_fn(torch.rand(shape, device=device), torch.rand(shape, device=device), index, lambda: "a step")
    cuda_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return meter.peak, cuda_peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "cifar100_32px.yaml"))
    parser.add_argument("--accum-steps", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=3, help="runs per k; the table gives their median")
    parser.add_argument("--steps", type=int, default=2, help="steps per run; the last is measured")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = parser.parse_args(argv)
    info = init_distributed(backend="auto")
    try:
        print(f"{'accum_steps':>11} {'micro-batch':>11} {'activations MiB':>15} {'CUDA peak MiB':>13}")
        for k in args.accum_steps:
            cfg = load_config(args.config, [*args.overrides, f"train.accum_steps={k}"], world_size=1)
            shape = (cfg.train.global_batch_size, cfg.model.in_chans, args.image_size, args.image_size)
            runs = [step_memory(cfg, info.device, shape, args.steps) for _ in range(args.repeats)]
            saved = statistics.median(r[0] for r in runs) / 2**20
            cuda = statistics.median(r[1] for r in runs) / 2**20 if runs[0][1] is not None else float("nan")
            print(f"{k:>11} {shape[0] // k:>11} {saved:>15.1f} {cuda:>13.1f}")
    finally:
        close_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
