"""Training steps on fixed float64 global batches with train.accum_steps = k, each rank feeding its slice: the
global loss (float64), every parameter's gradient (as DDP or the free-embedding model averages it), the
features the bank is given, the batch's score and (SogCLR) the u table, after each step.

``record`` (under torchrun, by collectives.py): every rank saves the steps of each case at each k of
ACCUM_STEPS as OUT_DIR/<case>-k<k>-rank<r>.pt.
``steps`` runs the same in one process (in a process group of one).
"""

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dist_cl.config import Config
from dist_cl.learn.models import FreeEmbeddings, Temperature
from dist_cl.learn.step import TrainStep
from dist_cl.runtime.distributed import DistInfo, gather_rows

N, IN, D, TAU = 12, 6, 4, 0.5
BATCHES = [[3, 0, 7, 11, 5, 2, 9, 8], [7, 1, 3, 10, 2, 6, 0, 4]]
"""Global batches of 8 (4 a rank on 2 ranks); step 1 revisits 0, 2, 3 and 7, whose SogCLR u step 0 wrote."""
ACCUM_STEPS = (1, 2, 4)
CASES = {"infonce": "infonce", "ntxent": "ntxent", "hcl": "hcl", "sogclr": "sogclr", "infonce_free": "infonce"}
"""case: its loss; ``*_free`` cases train the free-embedding model, the others ``Encoder``."""


class Encoder(nn.Module):
    """A BatchNorm-free encoder (LayerNorm normalises each sample alone), so that micro-batches change nothing."""

    def __init__(self, learnable_tau: bool):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(IN, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, D))
        self.temperature = Temperature(TAU, learnable_tau)

    def forward(self, view_a: torch.Tensor, view_b: torch.Tensor):
        return F.normalize(self.net(view_a), dim=-1), F.normalize(self.net(view_b), dim=-1), self.temperature()


def views(step: int, index: torch.Tensor, free: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The two views of the samples ``index`` at ``step``: the indices themselves for free embeddings."""
    if free:
        return index, index
    g = torch.Generator().manual_seed(step)
    x = torch.randn(N, IN, generator=g, dtype=torch.float64)
    return x[index], x[index] + 0.3 * torch.randn(N, IN, generator=g, dtype=torch.float64)[index]


def train_step(case: str, accum_steps: int, rank: int = 0, world_size: int = 1, nonfinite: str = "error",
               dtype: torch.dtype = torch.float64):
    """(model, its TrainStep) of ``case`` (a CASES key) at ``accum_steps``, in ``dtype``."""
    cfg = Config()
    cfg.loss.name, cfg.train.accum_steps, cfg.train.global_batch_size = CASES[case], accum_steps, len(BATCHES[0])
    cfg.loss.hcl_tau_plus, cfg.loss.hcl_beta, cfg.loss.gamma, cfg.train.nonfinite = 0.1, 1.0, 0.6, nonfinite
    torch.manual_seed(0)
    model = (FreeEmbeddings(N, D, TAU, True, seed=0) if case.endswith("_free")
             else Encoder(CASES[case] != "sogclr")).to(dtype)
    return model, TrainStep(cfg, model, torch.optim.SGD(model.parameters(), lr=0.5), rank, world_size,
                            torch.device("cpu"), N)


def steps(case: str, accum_steps: int, rank: int = 0, world_size: int = 1) -> list[dict]:
    """Every step of ``case`` (a CASES key) at ``accum_steps`` on this rank."""
    model, step_fn = train_step(case, accum_steps, rank, world_size)
    free = case.endswith("_free")
    losses = []  # the step's loss in float64: StepResult.loss is read as float32 with the finite flags
    step_fn.loss_fn.register_forward_hook(lambda module, args, loss: losses.append(loss.detach()))
    out = []
    for step, batch in enumerate(BATCHES):
        index = torch.tensor(batch)[rank * len(batch) // world_size:(rank + 1) * len(batch) // world_size]
        result = step_fn(*views(step, index, free), index, lambda: "a test step", score=True)
        figures = torch.stack([losses[-1], torch.tensor(result.score, dtype=torch.float64)])
        if world_size > 1:
            dist.all_reduce(figures)
        out.append({"loss": figures[0].item() / world_size, "score": figures[1].item() / world_size,
                    "grads": {name: p.grad.to_dense() for name, p in model.named_parameters()},
                    "u": gather_rows(result.u), "v": gather_rows(result.v),
                    "u_table": step_fn.loss_fn.u_table.clone() if CASES[case] == "sogclr" else None})
    return out


def record(out: Path, info: DistInfo) -> None:
    for case in CASES:
        for k in ACCUM_STEPS:
            torch.save(steps(case, k, info.rank, info.world_size), out / f"{case}-k{k}-rank{info.rank}.pt")
