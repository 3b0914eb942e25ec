"""One job per run directory: what identifies a job, when a lock is stale, and a holder whose lock is taken."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT, train_cmd

from dist_cl.runtime.runlock import RunDirLockedError, RunLock, RunLockLostError, hold_run_dir

SYNTHETIC = ["--config", str(ROOT / "configs" / "synthetic.yaml"), "selection.strategy=random", "eval.every_epochs=0"]


def write_lock(run_dir, **holder) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.lock").write_text(json.dumps({"host": "node-elsewhere", "pid": 1, "job": "4242",
                                                  "started": "2026-01-01T00:00:00+0000", **holder}))


def test_a_lock_from_another_host_is_held_until_its_refreshes_stop_for_lock_stale_s(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    write_lock(tmp_path)
    with pytest.raises(RunDirLockedError, match=f"run.dir {tmp_path} is in use by another job: host node-elsewhere, "
                                                "pid 1, job 4242, started 2026-01-01T00:00:00"):
        RunLock(tmp_path, stale_s=600).acquire()
    os.utime(tmp_path / "run.lock", (time.time() - 601, time.time() - 601))
    lock = RunLock(tmp_path, stale_s=600)
    lock.acquire()
    assert json.loads((tmp_path / "run.lock").read_text()) == lock.owner
    lock.release()
    assert not (tmp_path / "run.lock").exists()


def test_the_same_jobs_lock_from_another_host_is_a_restart_and_taken_over(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    write_lock(tmp_path)
    lock = RunLock(tmp_path, stale_s=600)
    lock.acquire()
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_the_holder_refreshes_its_lock(tmp_path):
    lock = RunLock(tmp_path, stale_s=1.0)
    lock.acquire()
    os.utime(tmp_path / "run.lock", (0, 0))
    time.sleep(0.5)
    assert (tmp_path / "run.lock").stat().st_mtime > time.time() - 1
    lock.release()


@pytest.mark.parametrize("run_id", ["none", ""])
def test_torchruns_default_run_id_is_no_job_id_so_another_hosts_live_lock_is_held(tmp_path, monkeypatch, run_id):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", run_id)
    write_lock(tmp_path, job=run_id)
    with pytest.raises(RunDirLockedError, match="is in use by another job: host node-elsewhere"):
        RunLock(tmp_path, stale_s=600).acquire()
    assert RunLock(tmp_path, stale_s=600).owner["job"] is None


def test_a_lock_of_this_host_whose_pid_runs_another_process_is_stale_after_lock_stale_s(tmp_path):
    """A container restarted under the same hostname: the lock's pid now belongs to another live process."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path, host=socket.gethostname(), pid=other.pid)
        with pytest.raises(RunDirLockedError, match=f"pid {other.pid}"):
            RunLock(tmp_path, stale_s=600).acquire()
        os.utime(tmp_path / "run.lock", (time.time() - 2 * 86400, time.time() - 2 * 86400))  # two days
        lock = RunLock(tmp_path, stale_s=600)
        lock.acquire()
        lock.release()
    finally:
        other.kill()
        other.wait()


def test_a_lock_of_this_host_with_this_processs_pid_that_it_does_not_hold_is_stale(tmp_path, caplog):
    write_lock(tmp_path, host=socket.gethostname(), pid=os.getpid())
    lock = RunLock(tmp_path, stale_s=600)
    with caplog.at_level("WARNING", logger="dist_cl"):
        lock.acquire()
    assert f"its pid {os.getpid()} is this process's, which does not hold it" in caplog.text
    with pytest.raises(RunDirLockedError, match="is in use by another job"):  # the same process, a second time
        RunLock(tmp_path, stale_s=600).acquire()
    lock.release()


def test_a_live_lock_with_a_key_it_does_not_know_is_held_not_unreadable(tmp_path):
    write_lock(tmp_path, written_by="dist_cl 9.9")
    started = time.monotonic()
    with pytest.raises(RunDirLockedError, match="is in use by another job: host node-elsewhere, pid 1, job 4242"):
        RunLock(tmp_path, stale_s=600).acquire()
    assert time.monotonic() - started < 1  # not waited out as unreadable


def test_a_holder_whose_lock_another_job_took_raises_by_name_and_leaves_that_jobs_lock(tmp_path):
    """In the body of hold_run_dir (the main thread, busy training), within a refresh of the theft."""
    def steal():
        time.sleep(0.3)
        write_lock(tmp_path, job="thief")

    thief = threading.Thread(target=steal)
    with pytest.raises(RunLockLostError, match=f"run.dir {tmp_path} was taken over by another job while this one "
                                               "trained: its lock .* is now host node-elsewhere, pid 1, job thief"):
        with hold_run_dir(tmp_path, stale_s=0.5, is_main=True):
            thief.start()
            deadline = time.time() + 10
            while time.time() < deadline:
                sum(range(1000))
    thief.join()
    assert json.loads((tmp_path / "run.lock").read_text())["job"] == "thief"


def test_a_holder_whose_lock_was_removed_creates_it_again(tmp_path):
    lost = threading.Event()
    lock = RunLock(tmp_path, stale_s=0.5, on_lost=lost.set)
    lock.acquire()
    (tmp_path / "run.lock").unlink()
    time.sleep(0.3)
    assert json.loads((tmp_path / "run.lock").read_text()) == lock.owner and not lost.is_set()
    lock.release()
    assert not (tmp_path / "run.lock").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_run_id_job(run_dir, host: str | None, *overrides: str) -> list[str]:
    """A 2-rank torchrun job with torchrun's default run id (``none``: no --standalone, no --rdzv-id), on a
    host named ``host`` (its own UTS namespace) where one is given."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                f"--master-port={free_port()}", *train_cmd(run_dir, *SYNTHETIC, *overrides)]
    if host is None:
        return torchrun
    return ["unshare", "--uts", "sh", "-c", f'hostname {host} && exec "$@"', "sh", *torchrun]


@pytest.mark.skipif(subprocess.run(["unshare", "--uts", "true"], capture_output=True).returncode != 0,
                    reason="needs unshare --uts (root) to fake a second host")
def test_two_jobs_with_torchruns_default_run_id_on_two_hosts_one_is_refused_and_a_holder_robbed_stops(tmp_path):
    """The issue's reproduction: the second host's job is refused while the first lives (it took the lock
    over as 'this job's restart' before), and the first stops by name once another job's lock replaces its own."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(default_run_id_job(run_dir, None, "train.epochs=100000", "run.lock_stale_s=2"),
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not (run_dir / "checkpoints" / "latest").exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        holder = json.loads((run_dir / "run.lock").read_text())
        assert (holder["host"], holder["job"]) == (socket.gethostname(), None)

        second = subprocess.run(default_run_id_job(run_dir, "othernode-7", "train.epochs=6"), cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode != 0
        message = (f"error: run.dir {run_dir} is in use by another job: host {holder['host']}, pid {holder['pid']}, "
                   "job None, started ")
        assert second.stderr.count(message) == 2, second.stderr[-3000:]  # both ranks, before any training
        assert json.loads((run_dir / "run.lock").read_text()) == holder

        write_lock(run_dir, host="othernode-7", pid=4242, job="another-job")
        output, _ = first.communicate(timeout=60)
    finally:
        first.kill()
        first.wait()
    assert first.returncode != 0
    assert (f"error: run.dir {run_dir} was taken over by another job while this one trained: its lock "
            f"{run_dir / 'run.lock'} is now host othernode-7, pid 4242, job another-job") in output, output[-3000:]
    assert json.loads((run_dir / "run.lock").read_text())["job"] == "another-job"
