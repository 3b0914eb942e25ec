"""The smaller gaps of issue 28, each refused by name before training where it can be: a run directory that
cannot hold a checkpoint, an elastic job on torchrun's shared store, a shard index whose labels do not fit;
or named or handled where it cannot: a run directory that stops taking writes, a stop during an epoch's last
step. (Fashion-MNIST files of another shape: tests/test_fashion_mnist.py.)"""

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST, ROOT, torchrun, train_cmd
from test_shards import shards_from_npz

from dist_cl.cli import train as cli
from dist_cl.data.shards import INDEX_NAME
from dist_cl.report.board import RunDirWriteError
from dist_cl.report.metrics_log import RunMetrics
from dist_cl.runtime.checkpoint import saved_bytes, unborn_optimizer_bytes
from dist_cl.runtime.checkpoint_files import load_checkpoint
from dist_cl.runtime.runlock import RunLock

SYNTHETIC = ("--config", str(ROOT / "configs" / "synthetic.yaml"), "selection.strategy=random")
"""4 steps an epoch: FAST makes checkpoints at steps 4, 5 and 8."""


def epoch_records(run_dir) -> list[tuple[int, int, float]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["epoch"], r["steps"], r["loss"]) for r in lines if r["kind"] == "epoch"]


@pytest.mark.parametrize("step", [3, 7], ids=["epoch-end", "run-end"])
def test_a_stop_during_an_epochs_last_step_is_honoured_at_the_epochs_end_with_its_record(reference_runs, tmp_path,
                                                                                          step):
    """Rank 0 alone is sent SIGTERM during the last step of epoch 0 (step 3) or of the run (step 7): the epoch
    is recorded and saved as it ends, then the run stops (or, at the run's end, finishes); resumed, it writes
    no empty epoch record (steps 0, loss NaN) and ends with the uninterrupted run's weights."""
    reference = reference_runs(*SYNTHETIC)
    script = str(ROOT / "tests" / "scripts" / "sigterm_at_step.py")
    first = torchrun([script, str(step), *train_cmd(tmp_path, *FAST, *SYNTHETIC)[1:]], check=False)
    assert (first.returncode != 0) == (step == 3), first.stderr[-3000:]
    if step == 3:
        torchrun(train_cmd(tmp_path, *FAST, *SYNTHETIC))
    records = epoch_records(tmp_path)
    assert [(epoch, steps) for epoch, steps, _ in records] == [(1, 4), (2, 4)]
    assert all(math.isfinite(loss) for _, _, loss in records)
    assert records == epoch_records(reference)
    if step == 3:
        assert first.stderr.count("preempted: stopped at the end of epoch 1 (step 4)") == 2, first.stderr[-3000:]
    final, expected = load_checkpoint(tmp_path)[0], load_checkpoint(reference)[0]
    assert final["counters"] == expected["counters"]
    assert all(final["model"][key].equal(expected["model"][key]) for key in expected["model"])


@pytest.mark.parametrize("shared", [True, False], ids=["shared-store", "store-per-round"])
def test_an_elastic_job_on_torchruns_shared_store_is_refused_naming_the_variable(monkeypatch, tmp_path, shared):
    """torchrun --nnodes=1:2 restarts its workers when a second node joins, without spending a restart: on
    torchrun's shared store they would wait for each other under stale names. Refused before the first step
    (here a dry run of one rank, which such a job grows out of); with the variable set it runs."""
    if shared:
        monkeypatch.delenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", raising=False)
    else:
        monkeypatch.setenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    proc = torchrun([*train_cmd(tmp_path, *SYNTHETIC), "--dry-run"], nproc=1, check=False,
                    extra=["--nnodes=1:2", "--rdzv-conf=last_call_timeout=1"])
    message = ("rank 0: an elastic job (torchrun --nnodes=1:2) needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in every "
               "torchrun's environment")
    assert (message in proc.stderr) == shared, proc.stderr[-3000:]
    assert (proc.returncode == 0) != shared, proc.stderr[-3000:]


def test_one_checkpoints_size_is_estimated_before_the_first_step_from_the_state_and_the_optimizer_to_come():
    """Before its first step AdamW holds no moments; the estimate counts them, and matches the file saved after it."""
    model = torch.nn.Linear(256, 128)
    optimizer = torch.optim.AdamW(model.parameters())
    estimate = saved_bytes({"model": model.state_dict(), "optimizer": optimizer.state_dict()}) + \
        unborn_optimizer_bytes(optimizer)
    model(torch.randn(4, 256)).sum().backward()
    optimizer.step()
    saved = saved_bytes({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    assert unborn_optimizer_bytes(optimizer) == 0
    assert 0.98 * saved <= estimate <= saved


def in_mount_namespace(mount: str, run_dir, *args: str) -> subprocess.CompletedProcess:
    """A 2-rank torchrun job of ``args`` in a mount namespace of its own, where ``mount`` (a shell command,
    ``{dir}`` standing for run_dir/checkpoints) has changed what its checkpoints directory is."""
    checkpoints = run_dir / "checkpoints"
    checkpoints.mkdir(parents=True)
    job = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *train_cmd(run_dir, *args)]
    script = f"{mount.format(dir=shlex.quote(str(checkpoints)))} && exec {shlex.join(job)}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare --mount is not permitted here")
    return subprocess.run(["unshare", "--mount", "sh", "-c", script], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("mount,message", [
    ("mount -t tmpfs -o size=8k tmpfs {dir}",
     r"{dir} cannot hold one checkpoint of this run: it needs about [\d.]+ KiB \(model, optimizer, bank and plan\), "
     r"and [0-8].\d KiB are free there; free space or set run.dir on another file system"),
    ("mount --bind {dir} {dir} && mount -o remount,ro,bind {dir}",
     r"cannot write to {dir} \(Read-only file system\), where this run saves its checkpoints: make it writable, "
     r"or set run.dir to a writable directory"),
], ids=["too-small", "read-only"])
def test_a_checkpoints_directory_that_cannot_hold_a_checkpoint_fails_by_name_before_the_first_step(tmp_path, mount,
                                                                                                      message):
    run_dir = tmp_path / "run"
    proc = in_mount_namespace(mount, run_dir, *SYNTHETIC, "train.epochs=2", "eval.every_epochs=0")
    assert proc.returncode != 0
    found = re.findall("error: " + message.format(dir=re.escape(str(run_dir / "checkpoints"))), proc.stderr)
    assert found and "Connection closed by peer" not in proc.stderr, proc.stderr[-3000:]  # every rank ends by name
    assert not (run_dir / "metrics.jsonl").exists() and "step 1" not in proc.stderr


def test_a_run_dir_that_stops_taking_writes_mid_run_ends_with_one_named_error(tmp_path):
    """The run directory turns read-only (chmod -R a-w) after the first checkpoint: TensorBoard's writer
    threads are the first to fail, and the run ends with one line naming the file, not their tracebacks."""
    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("root ignores file permissions, and setpriv, which drops that power, is missing")
    drop = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
            "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    run_dir = tmp_path / "run"
    cmd = [*drop, sys.executable, *train_cmd(run_dir, *SYNTHETIC, "train.epochs=100000", "eval.every_epochs=0")]
    run = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # any checkpoint: the run saves one every few milliseconds and keeps the newest 3, so a given step's
        # file can be written and pruned between two looks
        deadline = time.monotonic() + 120
        while not any((run_dir / "checkpoints").glob("step-*.pt")):
            assert run.poll() is None and time.monotonic() < deadline, "the run saved no checkpoint"
            time.sleep(0.05)
        subprocess.run(["chmod", "-R", "a-w", str(run_dir)], check=True)
        _, err = run.communicate(timeout=120)
    finally:
        run.kill()
        subprocess.run(["chmod", "-R", "u+w", str(run_dir)], check=True)
    assert run.returncode == 2, err[-3000:]
    # whichever write meets the read-only directory first names it: a log or TensorBoard file, or a checkpoint
    board_or_log = (rf"error: cannot write {run_dir}/\S+ \(Permission denied\): run.dir stopped taking writes "
                    r"while the run trained; make it writable again \(or free space\), then run the same command "
                    r"to resume from its last checkpoint")
    checkpoint = (rf"error: cannot write checkpoint {run_dir}/checkpoints/step-\d+\.pt: Permission denied "
                  r"\(it needs .*\); the previous checkpoints are kept; .*")
    assert re.fullmatch(f"{board_or_log}|{checkpoint}", err.splitlines()[-1]), err[-3000:]
    assert "Traceback" not in err, err[-3000:]


def test_an_epoch_record_that_cannot_be_written_and_a_lock_that_cannot_be_removed_are_named(tmp_path, caplog,
                                                                                            monkeypatch):
    """metrics.jsonl cannot be appended to (a directory stands there): the named error, not an OSError; and the
    job's lock, which it cannot remove from a read-only run directory, is left with a warning, so that
    releasing it does not replace the error that ends the job."""
    metrics = RunMetrics(tmp_path, True, 1, 2, 0, 0, 2)
    (tmp_path / "metrics.jsonl").mkdir()
    with pytest.raises(RunDirWriteError, match=rf"cannot write {tmp_path}/metrics.jsonl \(Is a directory\)"):
        metrics.append({"kind": "epoch"})
    metrics.close()
    lock = RunLock(tmp_path / "run", stale_s=60)
    lock.acquire()

    def read_only(path, missing_ok=False):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "unlink", read_only)
    with caplog.at_level("WARNING", logger="dist_cl"):
        lock.release()
    assert f"cannot remove the run directory's lock {lock.path}: [Errno 13] Permission denied" in caplog.text


def test_a_shard_index_whose_labels_do_not_fit_its_samples_fails_the_dry_run_by_name(tmp_path, capsys):
    """Not the kNN evaluation's IndexError after the first epoch."""
    out, _ = shards_from_npz(tmp_path)
    index = json.loads((out / INDEX_NAME).read_text())
    index["shardlist"][2]["labels"].pop()
    (out / INDEX_NAME).write_text(json.dumps(index))
    assert cli.main(["--dry-run", f"run.dir={tmp_path / 'run'}", "data.name=shards", f"data.path={out}",
                     "data.image_size=8", "model.in_chans=3", "train.global_batch_size=4"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: {out / INDEX_NAME}: entry 'shard-000002.tar' has 4 labels for its 5 samples; delete it and "
        "shardindex.json, then rerun tools/make_shards.py with the same arguments to rewrite it")
