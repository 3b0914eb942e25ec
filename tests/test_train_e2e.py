"""End-to-end runs of launch/train.py under real torchrun (2 processes, gloo) on the digits default."""

import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST, ROOT, torchrun, train_cmd

from dist_cl.cli import multinode_restarts
from dist_cl.cli import train as cli
from dist_cl.runtime.checkpoint_files import load_checkpoint
from dist_cl.runtime.preemption import REQUEUE_EXIT_CODE


def final_model(run_dir):
    return load_checkpoint(run_dir)[0]


def assert_same_weights(a: dict, b: dict):
    assert a["counters"] == b["counters"]
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert torch.equal(a["bank"]["u"], b["bank"]["u"])
    assert a["loss"].keys() == b["loss"].keys()  # SogCLR's u table; nothing for a loss without state
    for key in a["loss"]:
        assert torch.equal(a["loss"][key], b["loss"][key]), key


def test_one_epoch_leaves_tensorboard_checkpoint_metrics_and_config(one_epoch_run):
    assert list((one_epoch_run / "tb").glob("events.out.tfevents.*"))
    assert (one_epoch_run / "checkpoints" / "latest").read_text() == "step-00000022.pt"
    lines = [json.loads(line) for line in (one_epoch_run / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in lines if r["kind"] == "eval"]
    assert [r["step"] for r in records] == [0, 22]
    assert {"retrieval_top1", "knn_top1", "loss", "epoch"} <= records[1].keys()
    assert 0.0 <= records[1]["retrieval_top1"] <= 1.0
    [epoch] = [r for r in lines if r["kind"] == "epoch"]
    assert (epoch["epoch"], epoch["step"], epoch["steps"]) == (1, 22, 22)
    assert epoch["train_seconds"] > 0 and epoch["samples_per_s"] > 0 and "selection/seconds" in epoch
    assert "global_batch_size: 64" in (one_epoch_run / "config.yaml").read_text()
    bank = load_checkpoint(one_epoch_run / "checkpoints" / "step-00000022.pt")[0]["bank"]
    assert bank["u"].shape[0] == 0  # random plans read no bank: the checkpoint keeps no rows


@pytest.mark.parametrize("overrides,step,epoch", [
    (("selection.strategy=random",), 15, 0),
    # CPU dropout draws from the global stream, which a resumed run's extra DataLoader must not shift
    (("selection.strategy=random", "model.backbone_kwargs.drop_rate=0.5"), 15, 0),
    # at an epoch boundary the first thing is a bank refresh in eval mode, with BatchNorm statistics that
    # must be rank 0's (the checkpoint's) on every rank, not each rank's own from its last step
    (("selection.strategy=sc_global", "selection.embeddings=refresh", "selection.warmup_epochs=0"), 22, 1),
    # two micro-batches a step: the step stays atomic, SogCLR's u table written once a step
    (("selection.strategy=random", "loss.name=sogclr", "train.accum_steps=2"), 15, 0),
], ids=["mid-epoch", "dropout", "refresh-at-epoch-end", "sogclr-accum2"])
def test_resume_from_a_checkpoint_ends_with_identical_weights(reference_runs, tmp_path, overrides, step, epoch):
    reference_run = reference_runs(*overrides)
    shutil.copytree(reference_run / "checkpoints", tmp_path / "checkpoints")
    for path in (tmp_path / "checkpoints").glob("step-*"):
        if int(path.name[5:13]) > step:
            path.unlink()
    (tmp_path / "checkpoints" / "latest").write_text(f"step-{step:08d}.pt")
    proc = torchrun(train_cmd(tmp_path, *FAST, *overrides, "--resume", "latest"))
    assert f"at epoch {epoch} step {step}" in proc.stderr
    assert_same_weights(final_model(tmp_path), final_model(reference_run))


def agent_at_checkpoint(run_dir, step: int, *args: str, torchrun_args: tuple = ()) -> subprocess.Popen:
    """A 2-rank torchrun agent training into ``run_dir``, returned once its step-``step`` checkpoint exists."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *torchrun_args,
           *train_cmd(run_dir, *args)]
    agent = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    multinode_restarts.wait_for_checkpoint(run_dir, step, [agent], timeout=120)
    return agent


def kill_a_worker_then_finish(agent: subprocess.Popen) -> str:
    """SIGKILL one of a 2-worker agent's workers; the agent's output once torchrun's restart resumed and
    finished the job."""
    workers = multinode_restarts.children(agent.pid)
    assert len(workers) == 2, workers
    os.kill(max(workers), signal.SIGKILL)
    output, _ = agent.communicate(timeout=240)
    assert agent.returncode == 0, output[-5000:]
    assert "resumed from" in output
    return output


@pytest.mark.parametrize("overrides,kill_after_step", [
    (("selection.strategy=sc_global", "selection.overlap=true", "selection.warmup_epochs=0"), 10),
    (("loss.name=sogclr", "selection.strategy=sc_global", "selection.every_steps=8"), 35),
], ids=["sc_global-overlap", "sogclr-sc_global-every8"])
def test_sigkill_mid_epoch_then_torchrun_restart_ends_bitwise_equal(reference_runs, tmp_path, overrides,
                                                                     kill_after_step):
    """torchrun's own restart on one node (the random strategy's is the two-node test's worker kill).
    22 steps per epoch. With overlap, epoch 1's plan is being computed when the kill comes at step 10: the
    checkpoints of epoch 0 must carry it, since the bank it was computed from is gone by then. With
    every_steps=8, step 35 lies inside epoch 1, between the re-selections at steps 30 and 38: the plan
    made at step 30 from that step's bank must come back from the checkpoint, as an epoch's plan does
    under plain sc_global. That case runs under SogCLR, whose u table, written by every step of both
    epochs, must come back too."""
    reference_run = reference_runs(*overrides)
    agent = agent_at_checkpoint(tmp_path, kill_after_step, *FAST, *overrides, torchrun_args=("--max-restarts=1",))
    output = kill_a_worker_then_finish(agent)
    resumed = [line for line in output.splitlines() if "resumed from" in line][0]
    resumed_step = int(resumed.rsplit(" step ", 1)[1])
    assert resumed_step >= kill_after_step and resumed_step % 22 != 0, "restart should resume mid-epoch"
    final = final_model(tmp_path)
    assert_same_weights(final, final_model(reference_run))
    assert torch.equal(final["bank"]["written_at"], final_model(reference_run)["bank"]["written_at"])
    if "loss.name=sogclr" in overrides:
        assert final["loss"]["u_table"].count_nonzero() >= 22 * 64  # at least one epoch's samples


@pytest.mark.parametrize("scenario", multinode_restarts.SCENARIOS)
def test_two_node_job_recovers_from_a_killed_worker_or_a_replaced_node_bitwise_equal(reference_runs, tmp_path,
                                                                                      scenario):
    """Two torchrun agents joined by c10d, one worker each (tools/multinode_restarts.py repeats it):
    the second agent's worker is SIGKILLed after step 10, or the whole agent is and a new one takes its
    place. Both rounds of workers form their group and the job ends as the uninterrupted run does (the
    digits default is the random strategy, so a 2-rank standalone run is the reference)."""
    reference = final_model(reference_runs("selection.strategy=random"))
    outcome = multinode_restarts.run_scenario(scenario, tmp_path, reference, share_store=False, timeout=400)
    log = outcome.log.read_text()
    assert outcome.exit_codes == [0, 0], log[-5000:]
    assert outcome.resumed and outcome.identical, log[-5000:]
    [resumed_step] = {int(s) for s in re.findall(r"resumed from \S+ at epoch 0 step (\d+)", log)}
    assert 10 <= resumed_step < 22


def test_a_multi_node_job_that_may_restart_on_torchruns_shared_store_is_refused(monkeypatch):
    """Its restarted workers would wait for each other under different names (each agent counts its own
    restarts): refused before any store is reached, naming the variable that fixes it."""
    from dist_cl.config import ConfigError
    from dist_cl.runtime.distributed import rendezvous_store

    env = {"MASTER_ADDR": "localhost", "MASTER_PORT": "1", "TORCHELASTIC_USE_AGENT_STORE": "True",
           "GROUP_WORLD_SIZE": "2", "TORCHELASTIC_MAX_RESTARTS": "3"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=r"rank 5: a job of 2 nodes with torchrun --max-restarts > 0 needs "
                                          r"TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        rendezvous_store(5, 8, datetime.timedelta(seconds=1))


def test_process_group_formation_is_bounded_by_the_timeout(tmp_path):
    """Rank 0 of 2 whose peer never comes: a named error after dist.timeout_s, not a hang."""
    env = {**os.environ, "MASTER_ADDR": "localhost", "MASTER_PORT": str(multinode_restarts.free_port()),
           "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    start = time.time()
    proc = subprocess.run([sys.executable, *train_cmd(tmp_path, "dist.timeout_s=3")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "RankTimeoutError: rank 0: the process group of 2 ranks did not form within dist.timeout_s=3 s" \
        in proc.stderr, proc.stderr[-3000:]
    assert time.time() - start < 60


def _worker(agent_pid: int, rank: int) -> int:
    """The pid of the agent's worker of ``rank``."""
    [pid] = [pid for pid in multinode_restarts.children(agent_pid)
             if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")]
    return pid


def _running(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_the_timeout_of_a_stalled_rank_names_it(tmp_path):
    """Rank 1 frozen (SIGSTOP) mid-run: rank 0's collective times out after dist.timeout_s, and its error
    names rank 1, not only itself (which torchrun reports as the failed rank)."""
    agent = agent_at_checkpoint(tmp_path, 40, "--config", str(ROOT / "configs" / "synthetic.yaml"),
                                "selection.strategy=random", "eval.every_epochs=0", "checkpoint.every_steps=20",
                                "dist.timeout_s=10", "checkpoint.timeout_s=10")
    deadline = time.time() + 120
    stalled, victim = _worker(agent.pid, 1), _worker(agent.pid, 0)
    os.kill(stalled, signal.SIGSTOP)
    while _running(victim) and time.time() < deadline:
        time.sleep(0.2)
    os.kill(stalled, signal.SIGCONT)  # lets it take torchrun's SIGTERM
    output, _ = agent.communicate(timeout=120)
    assert agent.returncode != 0
    assert re.search(r"RankTimeoutError: rank 0: a collective timed out after dist.timeout_s=10 s: rank 1 stopped "
                     r"answering \(no heartbeat for 3 s; its last mark: "
                     r"(step|checkpoint at step|plan of epoch) \d+\)", output), \
        output[-5000:]


SYNTHETIC = ("--config", str(ROOT / "configs" / "synthetic.yaml"), "selection.strategy=random")
"""4 steps an epoch: FAST makes checkpoints at steps 4, 5 and 8."""


def node_local_views(tmp_path, reference_run, newest: dict[int, int]) -> None:
    """tmp_path/rank<r>/run/checkpoints holding the reference run's checkpoints up to step ``newest[r]``."""
    for rank, last in newest.items():
        view = tmp_path / f"rank{rank}" / "run" / "checkpoints"
        view.mkdir(parents=True)
        for path in (reference_run / "checkpoints").glob("step-*"):
            if int(path.name[5:13]) <= last:
                shutil.copy(path, view / path.name)


def rank_cwd_cmd(tmp_path) -> list[str]:
    return [str(ROOT / "tests" / "scripts" / "rank_cwd.py"), str(tmp_path), *FAST, *SYNTHETIC, "run.dir=run"]


def test_ranks_resume_from_rank_0s_checkpoint_when_another_sees_a_newer_one(reference_runs, tmp_path):
    """Rank 1's run directory has step 5, rank 0's only step 4: both resume from step 4 and end as an
    uninterrupted run does (had rank 1 resumed from its own newest, their cursors would differ)."""
    reference_run = reference_runs(*SYNTHETIC)
    node_local_views(tmp_path, reference_run, {0: 4, 1: 5})
    proc = torchrun(rank_cwd_cmd(tmp_path))
    assert "at epoch 1 step 4" in proc.stderr
    assert_same_weights(final_model(tmp_path / "rank0" / "run"), final_model(reference_run))


def test_a_rank_that_cannot_see_rank_0s_checkpoint_fails_by_name_before_training(reference_runs, tmp_path):
    reference_run = reference_runs(*SYNTHETIC)
    node_local_views(tmp_path, reference_run, {0: 5, 1: 4})
    before = sorted(p.name for p in (tmp_path / "rank0" / "run" / "checkpoints").iterdir())
    proc = torchrun(rank_cwd_cmd(tmp_path), check=False)
    assert proc.returncode != 0
    message = ("error: rank 1 cannot load run/checkpoints/step-00000005.pt, the checkpoint rank 0 resumes from "
               "(step 5): checkpoint 'run/checkpoints/step-00000005.pt' does not exist")
    assert proc.stderr.count(message) == 2, proc.stderr[-3000:]  # every rank says it and exits
    assert "every rank must see the same run.dir" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "rank0" / "run" / "checkpoints").iterdir()) == before


def test_sigterm_to_the_agent_checkpoints_the_step_in_flight_on_every_rank_and_resumes_bitwise_equal(
        reference_runs, tmp_path):
    """torchrun forwards SIGTERM to its workers: both finish their step, agree to stop after the same one,
    write its checkpoint and exit REQUEUE_EXIT_CODE; torchrun itself, signalled, exits 1 (its SignalException)."""
    reference_run = reference_runs("selection.strategy=random")
    agent = agent_at_checkpoint(tmp_path, 10, *FAST, "selection.strategy=random")
    agent.send_signal(signal.SIGTERM)
    output, _ = agent.communicate(timeout=120)
    assert agent.returncode == 1, output[-5000:]
    stops = re.findall(rf"\[rank (\d)\] WARNING preempted: stopped after step (\d+) \(epoch 0\); exit code "
                       rf"{REQUEUE_EXIT_CODE} asks to be requeued", output)
    assert sorted(rank for rank, _ in stops) == ["0", "1"], output[-5000:]
    [step] = {int(s) for _, s in stops}
    assert 10 <= step < 22 and (tmp_path / "checkpoints" / "latest").read_text() == f"step-{step:08d}.pt"
    proc = torchrun(train_cmd(tmp_path, *FAST, "selection.strategy=random"))
    assert f"at epoch 0 step {step}" in proc.stderr
    assert_same_weights(final_model(tmp_path), final_model(reference_run))


def test_sigusr1_to_a_single_process_run_exits_with_the_requeue_code_after_a_checkpoint(tmp_path):
    cmd = [sys.executable, *train_cmd(tmp_path, *SYNTHETIC, "train.epochs=100000", "eval.every_epochs=0")]
    run = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "checkpoints" / "latest").exists() and time.time() < deadline and run.poll() is None:
        time.sleep(0.05)
    run.send_signal(signal.SIGUSR1)
    _, err = run.communicate(timeout=120)
    assert run.returncode == REQUEUE_EXIT_CODE == 75, err[-3000:]
    step = int(re.search(r"preempted: stopped (?:after step|at the end of epoch \d+ \(step) (\d+)", err).group(1))
    assert (tmp_path / "checkpoints" / "latest").read_text() == f"step-{step:08d}.pt"
    assert load_checkpoint(tmp_path)[0]["counters"]["step"] == step


def test_ranks_given_different_configs_fail_by_name_before_any_collective_the_config_shapes(tmp_path):
    """Rank 1 alone is told selection.overlap=true, which adds a process group: the config check runs first,
    so both ranks name the difference at once instead of timing out in a rendezvous rank 0 never joins."""
    cmd = [str(ROOT / "tests" / "scripts" / "rank_override.py"), "1", "selection.overlap=true",
           *train_cmd(tmp_path / "run", *FAST, *SYNTHETIC)[1:], "checkpoint.timeout_s=120"]
    proc = torchrun(cmd, check=False, timeout=100)
    assert proc.returncode != 0
    assert proc.stderr.count("the config differs between ranks") == 2, proc.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


@pytest.mark.parametrize("overrides,message", [
    (("selection.strategy=osgd", "selection.options.k=30"),
     "selection.strategy=osgd with selection.options={'k': 30} on N = 1437 samples at a global batch of 64: "
     "need 1 <= q <= k <= N // B for kb-OSGD, got q=3, k=30, N // B=22"),
    (("selection.strategy=full",), "selection.strategy=full trains on all N = 1437 samples as one batch, but "
     "train.global_batch_size=64: set train.global_batch_size=1437"),
], ids=["osgd-k", "full"])
def test_selection_that_the_dataset_size_makes_wrong_fails_the_dry_run(overrides, message, capsys):
    """The config check does not know N (digits' 1,437 training samples, 22 batches of 64); the planner
    refuses these at start, not after the random warm-up epochs or with another batch than configured."""
    assert cli.main(["--dry-run", *overrides]) == 2
    err = capsys.readouterr().err
    assert message in err, err[-3000:]


def test_each_checkpoint_is_written_once_when_every_steps_divides_the_epoch(tmp_path):
    """Synthetic epochs of 4 steps, a checkpoint every 2: the epoch's last step is saved at the epoch's end
    only (a second write of the same file could be cut between its renames and leave neither)."""
    assert cli.main([*SYNTHETIC, f"run.dir={tmp_path}", "train.epochs=2", "eval.every_epochs=0",
                     "checkpoint.every_steps=2", "checkpoint.keep=10"]) == 0
    saved = re.findall(r"saved checkpoint .*step-(\d+)\.pt", (tmp_path / "train.log").read_text())
    assert saved == ["00000002", "00000004", "00000006", "00000008"]
    state = load_checkpoint(tmp_path / "checkpoints" / "step-00000004.pt")[0]
    assert state["counters"]["epoch"] == 1 and state["sampler"] is None  # the epoch's end, not its last step
