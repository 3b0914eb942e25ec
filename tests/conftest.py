"""Shared test helpers: launching real torchrun jobs on the CPU (gloo)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The suite runs on the CPU (gloo) even on a GPU host: bit-identity and plan-equality references are CPU
# results, and two ranks on one GPU would be refused by nccl. Hiding the devices, rather than setting
# dist.backend=gloo, also keeps the GPU paths that need no process group (cross_knn, GPU FAISS, autocast)
# off; torchrun workers inherit it. tools/gpu_check.sh exercises those paths.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
sys.path.insert(0, str(ROOT / "tests" / "scripts"))  # torchrun worker scripts double as importable helpers


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: intra-op threads only add overhead on a shared 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SHARED = ("reference_runs", "one_epoch_run", "collectives")
"""The session fixtures below: each is made once per pytest process."""


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """The scopes of ``--dist loadgroup`` (pytest-xdist): a test runs on the worker of its module, so a module
    fixture's torchrun job runs once, and the tests that read one of the session fixtures go to one worker
    together, so that fixture is made once."""
    for item in items:
        shared = [name for name in SHARED if name in item.fixturenames]
        item.add_marker(pytest.mark.xdist_group(shared[0] if shared else item.path.stem))


def torchrun(script_args: list[str], nproc: int = 2, extra: list[str] | None = None, timeout: float = 300,
             check: bool = True) -> subprocess.CompletedProcess:
    """Run ``torchrun --standalone --nproc_per_node=nproc`` with the given script and arguments."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *(extra or []), *script_args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def train_cmd(run_dir: Path, *overrides: str) -> list[str]:
    return [str(ROOT / "launch" / "train.py"), f"run.dir={run_dir}", *overrides]


FAST = ["train.epochs=2", "eval.every_epochs=0", "checkpoint.every_steps=5", "checkpoint.keep=20"]
"""Two digits epochs (44 steps), a checkpoint every 5 steps: the runs that resume tests restart from."""


@pytest.fixture(scope="session")
def reference_runs(tmp_path_factory):
    """Uninterrupted 2-rank runs of FAST plus the given overrides, each made once per session: what an
    interrupted or re-partitioned run must end equal to, and whose checkpoints tests read."""
    runs = {}

    def get(*overrides: str) -> Path:
        if overrides not in runs:
            runs[overrides] = tmp_path_factory.mktemp("reference")
            torchrun(train_cmd(runs[overrides], *FAST, *overrides))
        return runs[overrides]

    return get


@pytest.fixture(scope="session")
def one_epoch_run(tmp_path_factory) -> Path:
    """A 2-rank digits epoch of the default config, evaluated before and after it, made once per session; what
    every rank printed is in ``output.txt`` beside the run directory."""
    run_dir = tmp_path_factory.mktemp("one_epoch") / "run"
    proc = torchrun(train_cmd(run_dir, "train.epochs=1", "eval.every_epochs=1"))
    (run_dir.parent / "output.txt").write_text(proc.stdout + proc.stderr)
    return run_dir


@pytest.fixture(scope="session")
def collectives(tmp_path_factory) -> Path:
    """One 2-rank launch of ``tests/scripts/collectives.py``: what each recorder wrote, in a folder named after
    its module."""
    out = tmp_path_factory.mktemp("collectives")
    torchrun([str(ROOT / "tests" / "scripts" / "collectives.py"), str(out)])
    return out
