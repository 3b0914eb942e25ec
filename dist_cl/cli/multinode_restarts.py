"""Multi-node recovery on one machine: two torchrun agents joined by c10d, as launch/slurm.sh runs them.

Each agent (a "node") runs one worker (``--nnodes=2 --nproc_per_node=1 --max-restarts=1``) of launch/train.py
(so a source checkout, as for the tests) on the digits default, two epochs, a checkpoint every 5 steps. A
scenario waits for a checkpoint mid-epoch, then:
  worker_kill       SIGKILLs the second agent's worker; both agents restart their workers;
  node_replacement  SIGKILLs the second agent with its worker (the node is lost) and starts a new agent in
                    its place, which joins the surviving one.
It has recovered when both agents exit 0, after a new round of workers resumed from a checkpoint, with a final
checkpoint bit-identical (weights, buffers, bank, counters) to an uninterrupted 2-rank run. (The digits
default plans at random, so its bank has no rows: the single-node SIGKILL tests restore a bank with rows.)
``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` is set in the agents' environment unless ``share_store``: multi-node
restarts need it (docs/DESIGN.md, "Restarts on several nodes"), and without it and with restarts allowed
the workers refuse to start. tools/multinode_restarts.py repeats the scenarios; the tests run each once.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
"""The source checkout: its launch/train.py is what the agents run, from there."""
RUN = ["train.epochs=2", "eval.every_epochs=0", "checkpoint.every_steps=5", "checkpoint.keep=20",
       "dist.timeout_s=60"]
SCENARIOS = ("worker_kill", "node_replacement")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start_agent(run_dir: Path, port: int, log: Path, share_store: bool, overrides: tuple = ()) -> subprocess.Popen:
    """One torchrun agent of a 2-node job."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    if not share_store:
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
           "--rdzv_backend=c10d", f"--rdzv_endpoint=localhost:{port}", f"--rdzv_id=job{port}",
           "--max-restarts=1", str(ROOT / "launch" / "train.py"), f"run.dir={run_dir}", *RUN, *overrides]
    with open(log, "a") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_for_checkpoint(run_dir: Path, step: int, agents: list[subprocess.Popen], timeout: float = 300) -> None:
    trigger = run_dir / "checkpoints" / f"step-{step:08d}.pt"
    deadline = time.time() + timeout
    while not trigger.exists():
        if time.time() > deadline or any(a.poll() is not None for a in agents):
            raise RuntimeError(f"the run never reached its step-{step} checkpoint")
        time.sleep(0.05)


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def kill_node(agent: subprocess.Popen) -> None:
    """SIGKILL an agent and everything under it at once, as a lost node. torchrun starts each worker in a
    session of its own, so killing the agent's process group would leave its worker training on."""
    tree, frontier = [agent.pid], [agent.pid]
    while frontier:
        frontier = [c for pid in frontier for c in children(pid)]
        tree += frontier
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    agent.wait()


@dataclass
class Outcome:
    scenario: str
    exit_codes: list[int]
    identical: bool | None  # None: no final checkpoint to compare
    resumed: bool  # a new round of workers resumed from a checkpoint: the kill did interrupt the job
    seconds: float
    log: Path

    @property
    def recovered(self) -> bool:
        return self.resumed and self.identical is True and self.exit_codes == [0, 0]


def final_checkpoint(run_dir: Path) -> dict | None:
    from dist_cl.runtime.checkpoint_files import load_checkpoint

    latest = run_dir / "checkpoints" / "latest"
    return load_checkpoint(run_dir)[0] if latest.exists() else None


def same_state(a: dict, b: dict) -> bool:
    """Counters, every model tensor (weights and buffers) and the bank, exactly."""
    return (a["counters"] == b["counters"] and a["model"].keys() == b["model"].keys()
            and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
            and all(torch.equal(a["bank"][k], b["bank"][k]) for k in ("u", "v", "written_at")))


def reference_run(workdir: Path, share_store: bool, overrides: tuple = ()) -> dict:
    """The uninterrupted 2-node run every scenario must reproduce."""
    run_dir, port = workdir / "reference", free_port()
    agents = [start_agent(run_dir, port, workdir / "reference.log", share_store, overrides) for _ in range(2)]
    if [a.wait(timeout=600) for a in agents] != [0, 0]:
        raise RuntimeError(f"the uninterrupted run failed; see {workdir / 'reference.log'}")
    return final_checkpoint(run_dir)


def run_scenario(scenario: str, workdir: Path, reference: dict, share_store: bool, kill_after_step: int = 10,
                 overrides: tuple = (), timeout: float = 600) -> Outcome:
    """Start two agents, interrupt as ``scenario`` says after ``kill_after_step``, wait for the job's end."""
    run_dir, port, log = workdir / scenario, free_port(), workdir / f"{scenario}.log"
    start = time.time()
    first = start_agent(run_dir, port, log, share_store, overrides)
    time.sleep(1.0)  # the first agent hosts the rendezvous store; the second is the one that fails
    second = start_agent(run_dir, port, log, share_store, overrides)
    agents = [first, second]
    try:
        wait_for_checkpoint(run_dir, kill_after_step, agents)
        if scenario == "worker_kill":
            [worker] = children(second.pid)
            os.kill(worker, signal.SIGKILL)
        elif scenario == "node_replacement":
            kill_node(second)
            agents = [first, start_agent(run_dir, port, log, share_store, overrides)]
        else:
            raise ValueError(f"unknown scenario {scenario!r}; choose from {', '.join(SCENARIOS)}")
        deadline = start + timeout
        codes = [a.wait(timeout=max(1.0, deadline - time.time())) for a in agents]
    except subprocess.TimeoutExpired:
        codes = [a.poll() if a.poll() is not None else -9 for a in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                kill_node(agent)
    final = final_checkpoint(run_dir)
    identical = None if final is None else same_state(final, reference)
    return Outcome(scenario, codes, identical, "resumed from" in log.read_text(), time.time() - start, log)
