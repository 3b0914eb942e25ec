"""The in-process checks of tools/gpu_check.sh; each prints one JSON line (check, ok, figures).

    python tools/gpu_check.py loss-precision --amp bf16      # the loss under autocast is the float32 loss
    python tools/gpu_check.py selection --n 1000000           # sc_global on the GPU against the CPU path
    python tools/gpu_check.py throughput [--config C] [k=v ...] # the trainer against a minimal DDP loop

Every check runs on --device (default cuda, the process's local GPU on a one-rank group); ``--device cpu``
runs the same code on the CPU (the selection check then compares the CPU path with itself), so the script's
Python can be exercised on a machine without a GPU.
"""

import argparse
import json
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from clustered import clustered_pairs

from dist_cl.config import load_config
from dist_cl.learn.losses import InfoNCELoss
from dist_cl.learn.models import build_model
from dist_cl.runtime.distributed import close_distributed, exit_process, init_distributed
from dist_cl.selection import lift, select_batches
from dist_cl.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


def report(check: str, ok: bool, **figures) -> bool:
    print(json.dumps({"check": check, "ok": bool(ok), **figures}), flush=True)
    return ok


def loss_precision(device: torch.device, amp: str) -> bool:
    """The digits model's features under autocast(amp): the trainer's loss must equal the float32 loss of
    the same features within 1e-5 (autocast would compute its matmul in ``amp``)."""
    cfg = load_config(ROOT / "configs" / "digits.yaml")
    model = build_model(cfg, 1).to(device)
    x = torch.rand(256, 1, 8, 8, device=device, generator=torch.Generator(device).manual_seed(0))
    with torch.autocast(device.type, dtype=AMP[amp]):
        u, v, tau = model(x, x.flip(-1))
        loss = InfoNCELoss()(u, v, tau)
        down = (u @ v.T).dtype
    reference = InfoNCELoss()(u.float(), v.float(), tau.float())
    error = abs(loss.item() - reference.item())
    return report(f"loss-precision-{amp}", error < 1e-5 and loss.dtype == torch.float32, error=error,
                  autocast_matmul=str(down).removeprefix("torch."))


def _peak_device_memory(device: torch.device, fn):
    """(fn(), peak bytes in use on the device while it ran): sampled from the driver every 20 ms, so
    FAISS's allocations, which torch's allocator does not see, count too."""
    if device.type != "cuda":
        return fn(), 0
    free, total = torch.cuda.mem_get_info(device)
    baseline, peak, done = total - free, [total - free], threading.Event()

    def sample():
        while not done.wait(0.02):
            free, _ = torch.cuda.mem_get_info(device)
            peak[0] = max(peak[0], total - free)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        return fn(), peak[0] - baseline
    finally:
        done.set()
        sampler.join()


def selection(device: torch.device, n: int, d: int, batch_size: int, cpu_reference: bool = True) -> bool:
    """sc_global on ``device`` against the CPU path on the same embeddings: seconds, peak device memory,
    lift. The lifts must agree within 2% (the GPU k-means assigns exactly where the CPU's uses HNSW).
    Without ``cpu_reference`` (the 10M row, where the CPU path alone would take a quarter of an hour) the
    device's plan must be a valid partition with a lift above 1."""
    u, v = clustered_pairs(n, d, seed=0)
    rows = {}
    for where in dict.fromkeys([device, torch.device("cpu")] if cpu_reference else [device]):
        started = time.perf_counter()
        plan, peak = _peak_device_memory(where, partial(select_batches, "sc_global", u, v, batch_size, seed=0,
                                                                        tau=0.1, device=where))
        seconds = time.perf_counter() - started
        valid = len(np.unique(plan)) == plan.size == (n // batch_size) * batch_size
        rows[where.type] = {"seconds": round(seconds, 2), "peak_device_mib": round(peak / 2**20),
                            "lift": round(lift(u, v, plan, tau=0.1, seed=0, dtype=torch.float32), 4),
                            "valid": valid}
    lifts = [row["lift"] for row in rows.values()]
    ok = all(row["valid"] for row in rows.values()) and max(lifts) - min(lifts) <= 0.02 * min(lifts) and min(lifts) > 1
    return report(f"selection-n{n}", ok, **rows)


def throughput(device: torch.device, config: str, overrides: list[str]) -> bool:
    """Samples/s of the trainer against a minimal DDP loop on the same model, optimizer and AMP (no data
    loading, bank or selection), the two taking turns step by step in one process (``TakingTurns``): both then
    meet the same machine, where runs minutes apart, or blocks seconds apart, differ by more than the gap
    measured. An epoch's trainer time is its metrics.jsonl record's less the minimal steps inside it, plus its
    wait for the plan, which under selection.overlap is what the trainer alone would have waited. Paired are the
    epochs between the first (every row touched for the first time) and the last (no next plan computed
    meanwhile under selection.overlap); the ratio is their median."""
    epochs = 5
    cfg = load_config(config, [f"train.epochs={epochs}", "eval.every_epochs=0", "run.dir=runs/gpu_check/throughput",
                               f"dist.backend={'nccl' if device.type == 'cuda' else 'gloo'}", *overrides])
    info = init_distributed(cfg.dist.timeout_s, cfg.dist.backend)
    try:
        trainer = TakingTurns(cfg, info)
        trainer.fit()
        trainer.close()
    finally:
        close_distributed()
    lines = (trainer.run_dir / "metrics.jsonl").read_text().splitlines()
    records = [record for record in map(json.loads, lines) if record["kind"] == "epoch"][-epochs:]  # this run's
    pairs = paired_rates(records, trainer.minimal, cfg.train.global_batch_size)
    ratios = [t / m for t, m in pairs]
    return report("throughput" + "".join(f" {o}" for o in overrides), all(t > 0 for t, _ in pairs),
                  trainer_samples_s=round(float(np.median([t for t, _ in pairs]))),
                  minimal_samples_s=round(float(np.median([m for _, m in pairs]))),
                  ratio=round(float(np.median(ratios)), 3), ratios=[round(r, 3) for r in ratios])


def paired_rates(records: list[dict], minimal: list[tuple[int, float]], batch_size: int) -> list[tuple[float, float]]:
    """(trainer, minimal loop) samples/s of each epoch but the first and the last, from the epochs' metrics.jsonl
    ``records`` and ``TakingTurns.minimal``'s (steps, seconds of minimal steps) of the same epochs."""
    pairs = []
    for e in range(1, len(records) - 1):
        (steps, seconds), record = minimal[e], records[e]
        # a plan computed ahead (selection.overlap) had the minimal steps of the epoch before as well: the
        # trainer alone would have waited for all of it that outlasted its own steps
        alone = records[e - 1]["train_seconds"] - minimal[e - 1][1]
        waited = max(record.get("selection/wait_seconds", 0.0), record.get("selection/seconds", 0.0) - alone)
        samples = steps * batch_size
        pairs.append((samples / (record["train_seconds"] - seconds + waited), samples / seconds))
    return pairs


class TakingTurns(Trainer):
    """A trainer that takes a step of the minimal loop after each of its own, on fresh rows: the model's forward
    pass and loss under autocast, the backward pass, the update, and nothing else. Each is timed between two
    device synchronisations, as the trainer's step ends with its one host read. ``minimal`` keeps each epoch's
    (steps, seconds of minimal steps)."""

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        self.minimal: list[tuple[int, float]] = []
        self.index = torch.arange(cfg.train.global_batch_size, device=info.device) % len(self.train_set)  # SogCLR's

    def train_epoch(self, figures):
        steps = len(self.sampler.plan) - self.sampler.cursor
        self.batches = iter(_minimal_batches(self.train_set, self.cfg.train.global_batch_size, steps, self.info.device))
        self.minimal.append((steps, 0.0))
        return super().train_epoch(figures)

    def train_one(self, view_a, view_b, index):
        result = super().train_one(view_a, view_b, index)
        x, numerics, device = next(self.batches), self.step_fn, self.info.device
        _synchronize(device)
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=numerics.amp_dtype, enabled=numerics.amp_dtype is not None):
            u, v, tau = numerics.ddp(x, x.flip(-1))
            loss = numerics.loss_fn(u, v, tau, self.index)
        self.optimizer.zero_grad(set_to_none=True)
        numerics.scaler.scale(loss).backward()
        numerics.scaler.step(self.optimizer)
        numerics.scaler.update()
        _synchronize(device)
        steps, seconds = self.minimal[-1]
        self.minimal[-1] = (steps, seconds + time.perf_counter() - started)
        return result


def _minimal_batches(dataset, batch_size: int, count: int, device: torch.device) -> list[torch.Tensor]:
    """The minimal loop's ``count`` batches, made before it is timed. Images: one random batch, since a network's
    cost does not depend on the pixels. Sample indices (the free-embedding model): distinct random rows drawn
    afresh for every step, as the trainer's batches are, since a lookup's cost does: one batch trained again and
    again would keep its 256 rows in cache while the trainer's rows are spread over the whole table."""
    view = dataset[0][0]
    if view.is_floating_point():
        return [torch.rand((batch_size, *view.shape), device=device)] * count
    return [torch.randperm(len(dataset))[:batch_size].to(device) for _ in range(count)]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("check", choices=["loss-precision", "selection", "throughput"])
    parser.add_argument("--device", default="cuda", help="cuda (the local GPU) or cpu (a dry run)")
    parser.add_argument("--amp", choices=sorted(AMP), default="bf16")
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--no-cpu-reference", action="store_true", help="selection: the device's plan alone")
    parser.add_argument("--config", default=str(ROOT / "configs" / "digits.yaml"), help="throughput: the run's config")
    parser.add_argument("overrides", nargs="*", help="throughput: dotted config overrides of the trained run")
    args = parser.parse_intermixed_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if args.check == "loss-precision":
        ok = loss_precision(device, args.amp)
    elif args.check == "selection":
        ok = selection(device, args.n, args.dim, args.batch_size, cpu_reference=not args.no_cpu_reference)
    else:
        ok = throughput(device, args.config, args.overrides)
    return 0 if ok else 1


if __name__ == "__main__":
    exit_process(main())
