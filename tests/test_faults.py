"""Bad input and numerical faults: clear errors that name the problem and the fix, and nothing damaged."""

import hashlib
import json
import re
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
from conftest import ROOT, torchrun, train_cmd

from dist_cl.cli import train as cli
from dist_cl.config import ConfigError
from dist_cl.data.digits import DigitsPairs
from dist_cl.data.shards import ShardError
from dist_cl.learn.step import LossScaler, SkippedStepsError
from dist_cl.runtime.checkpoint_files import Checkpointer, CheckpointError, load_checkpoint
from dist_cl.selection import SelectionError

SYNTHETIC = ["--config", str(ROOT / "configs" / "synthetic.yaml"), "train.epochs=3", "eval.every_epochs=0",
             "selection.strategy=random"]


def run(tmp_path, *args) -> int:
    return cli.main([*SYNTHETIC, f"run.dir={tmp_path / 'run'}", *args])


def digests(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "args,env,message",
    [
        (["train.global_batch_size=3"], {"WORLD_SIZE": "2"},
         "train.global_batch_size=3 is not divisible by world_size=2; use a multiple of 2"),
        (["train.global_batch_size=16"], {}, "train.global_batch_size=16 is larger than the 8 training samples"),
        (["train.optimiser=sgd"], {}, "unknown config key 'train.optimiser'; did you mean train.optimizer?"),
        (["data.num_samples=many"], {}, "data.num_samples='many' is a str; expected int"),
        (["loss.name=hcl", "loss.hcl_tau_plus=0.1"], {}, "loss.name=hcl needs loss.hcl_beta"),
    ],
)
def test_bad_input_fails_before_anything_is_written(tmp_path, monkeypatch, capsys, args, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert run(tmp_path, *args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("error", [ConfigError("unknown config key"), CheckpointError("no usable checkpoint"),
                                   ShardError("shard-000004.tar is missing"), SelectionError("chunk_batches=-1")])
def test_a_user_error_in_an_entry_point_is_one_line_exit_code_2_and_the_group_is_gone(capsys, error):
    def body(info):
        assert dist.is_initialized() and info.world_size == 1
        raise error

    assert cli.run_distributed(body) == 2
    assert capsys.readouterr().err == f"error: {error}\n"
    assert not dist.is_initialized()


def test_any_other_exception_in_an_entry_point_propagates_and_the_group_is_gone():
    def body(info):
        raise FloatingPointError("non-finite loss")

    with pytest.raises(FloatingPointError, match="non-finite loss"):
        cli.run_distributed(body)
    assert not dist.is_initialized()


def test_checkpoint_from_incompatible_config_is_refused_and_left_intact(tmp_path, capsys):
    assert run(tmp_path) == 0
    before = digests(tmp_path / "run")
    assert run(tmp_path, "model.embed_dim=8") == 2
    err = capsys.readouterr().err
    assert "incompatible config (model.embed_dim: checkpoint 16 vs now 8)" in err
    assert "start a new run.dir" in err
    assert digests(tmp_path / "run") == before


def test_resuming_under_another_thread_count_warns_that_bit_identity_is_lost(tmp_path, caplog):
    threads = torch.get_num_threads()
    assert run(tmp_path, "train.epochs=1") == 0
    torch.set_num_threads(threads + 1)
    try:
        assert run(tmp_path, "train.epochs=2") == 0
    finally:
        torch.set_num_threads(threads)
    assert (f"CPU ops use {threads + 1} threads where the checkpoint's run used {threads}: training goes on "
            f"correctly but no longer bit-identical to an uninterrupted run; set OMP_NUM_THREADS={threads}"
            ) in caplog.text


def test_longer_schedule_resumes_from_a_finished_run_and_names_the_learning_rate_jump(tmp_path, caplog):
    assert run(tmp_path) == 0
    assert run(tmp_path, "train.epochs=4") == 0
    assert "train.epochs changed from 3 to 4 on resume: the learning rate at epoch 3.00 goes from 0 to" in caplog.text
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text()
    assert latest == f"step-{4 * 4:08d}.pt"


def test_a_checkpoint_from_before_the_loss_settings_resumes(tmp_path):
    """Checkpoints written before loss.gamma, loss.hcl_* and the loss component existed resume: the missing keys
    count as their defaults, the missing component as a loss without state."""
    assert run(tmp_path) == 0
    ckpt = tmp_path / "run" / "checkpoints"
    state, _ = load_checkpoint(ckpt)
    del state["loss"]
    for key in ("gamma", "hcl_tau_plus", "hcl_beta"):
        del state["meta"]["config"]["loss"][key]
    Checkpointer(ckpt, keep=3).save(state, 12)
    assert run(tmp_path, "train.epochs=4") == 0
    assert (ckpt / "latest").read_text() == "step-00000016.pt"


def test_the_fp16_loss_scaler_resumes_from_a_checkpoint_written_without_fp16(caplog):
    """A run moved to a GPU under train.amp=fp16 from a checkpoint written on the CPU, where the scaler is off
    and saves nothing: torch's GradScaler refuses that state, the trainer's starts at its initial scale. A
    saved scale still comes back. (A CPU scaler stands in for the CUDA one: the same class, on the CPU.)"""
    saved_off = LossScaler("cpu", enabled=False).state_dict()
    with pytest.raises(RuntimeError, match="state dict is empty"):
        torch.amp.GradScaler("cpu").load_state_dict(saved_off)
    with caplog.at_level("WARNING", logger="dist_cl"):
        resumed = LossScaler("cpu", init_scale=512.0)
        resumed.load_state_dict(saved_off)
    assert resumed.get_scale() == 512.0 and "holds no fp16 loss scale" in caplog.text
    resumed.load_state_dict(LossScaler("cpu", init_scale=8.0).state_dict())
    assert resumed.get_scale() == 8.0


def test_a_full_disk_is_a_named_error_that_removes_its_tmp_and_keeps_the_previous_checkpoint(tmp_path, capsys):
    assert run(tmp_path) == 0
    ckpt = tmp_path / "run" / "checkpoints"
    before = digests(ckpt)
    # the temporary name of the next checkpoint leads to /dev/full, where the kernel fails every write: ENOSPC
    (ckpt / ".step-00000016.pt.tmp").symlink_to("/dev/full")
    assert run(tmp_path, "train.epochs=4") == 2
    err = capsys.readouterr().err.splitlines()[-1]  # the lines before it are the run's log
    assert re.fullmatch(rf"error: cannot write checkpoint {ckpt}/step-00000016.pt: No space left on device \(it "
                        rf"needs [\d.]+ MiB, [\d.]+ MiB free on {ckpt}\); the previous checkpoints are kept; free "
                        r"space or set run.dir on another file system, then resume", err), err
    assert digests(ckpt) == before and not list(ckpt.glob(".*"))
    assert run(tmp_path, "train.epochs=4") == 0
    assert (ckpt / "latest").read_text() == "step-00000016.pt"


@pytest.fixture
def poisoned_digit(monkeypatch, request):
    """Digit 5 of the training split turns into NaN pixels (or the value ``request.param``), as a corrupt
    sample would. Pixels of 1e30 keep the loss finite and overflow BatchNorm's running variance to inf."""
    load = DigitsPairs.load
    value = getattr(request, "param", float("nan"))

    def poisoned(self, index):
        image = load(self, index)
        return torch.full_like(image, value) if index == POISONED else image

    monkeypatch.setattr(DigitsPairs, "load", poisoned)


def assert_every_checkpoint_finite(directory) -> list[int]:
    """The steps of the checkpoints in ``directory``, each checked: every floating tensor of the model
    (parameters and buffers, BatchNorm statistics among them) finite."""
    steps = []
    for path in sorted(directory.glob("step-*.pt")):
        state, _ = load_checkpoint(path)
        bad = [k for k, t in state["model"].items() if t.is_floating_point() and not torch.isfinite(t).all()]
        assert not bad, f"{path.name}: {bad}"
        steps.append(state["counters"]["step"])
    return steps


POISONED = 5
DIGITS = ["train.epochs=2", "eval.every_epochs=0", "train.global_batch_size=479"]  # 1437 = 3 x 479: no remainder


def test_nonfinite_loss_stops_with_the_step_and_batch_and_keeps_the_last_checkpoint(tmp_path, poisoned_digit):
    with pytest.raises(FloatingPointError) as err:
        cli.main([*DIGITS, f"run.dir={tmp_path}", "checkpoint.every_steps=1"])
    found = re.search(r"non-finite loss at step (\d+) \(epoch 0, global batch (\d+), indices \[([\d, .]+)\]\)",
                      str(err.value))
    assert found, str(err.value)
    assert "train.nonfinite=skip" in str(err.value)
    step, cursor = int(found.group(1)), int(found.group(2))
    ckpt = tmp_path / "checkpoints"
    if step == 0:
        assert not ckpt.exists() or not list(ckpt.glob("step-*.pt"))
        return
    assert (ckpt / "latest").read_text() == f"step-{step:08d}.pt"
    state, _ = load_checkpoint(ckpt / f"step-{step:08d}.pt")
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    batch = state["sampler"]["plan"]["batches"][cursor]
    assert state["sampler"]["cursor"] == cursor and POISONED in batch
    assert found.group(3).startswith(", ".join(map(str, batch[:16])))


@pytest.mark.parametrize("poisoned_digit,loss",
                         [(float("nan"), "infonce"), (1e30, "infonce"), (float("nan"), "sogclr")],
                         indirect=["poisoned_digit"], ids=["nan", "overflow", "nan-sogclr"])
def test_nonfinite_steps_can_be_skipped_and_counted(tmp_path, poisoned_digit, loss):
    """Under SogCLR the skipped step's NaN u rows are undone too: left in the table, they would make every later
    step that meets those samples non-finite."""
    assert cli.main([*DIGITS, f"run.dir={tmp_path}", "train.nonfinite=skip", "train.max_skipped_fraction=0.5",
                     "checkpoint.every_steps=1", "checkpoint.keep=10", f"loss.name={loss}"]) == 0
    state, _ = load_checkpoint(tmp_path)
    assert state["counters"]["skipped_steps"] == 2  # the poisoned digit's batch, once per epoch
    assert assert_every_checkpoint_finite(tmp_path / "checkpoints") == list(range(1, 7))
    assert all(torch.isfinite(t).all() for t in state["loss"].values())


@pytest.mark.parametrize("poisoned_digit", [1e30], indirect=True)
def test_nonfinite_skip_past_its_cap_stops_with_a_named_error(tmp_path, poisoned_digit):
    """The default cap, a tenth of an epoch, is 0.3 of these 3-step epochs: the first skip passes it."""
    with pytest.raises(SkippedStepsError) as err:
        cli.main([*DIGITS, f"run.dir={tmp_path}", "train.nonfinite=skip", "checkpoint.every_steps=1",
                  "checkpoint.keep=10"])
    found = re.search(r"skipped 1 of the 3 steps of epoch 0 \(the last at step (\d)\), more than "
                      r"train.max_skipped_fraction=0.1", str(err.value))
    assert found, str(err.value)
    assert assert_every_checkpoint_finite(tmp_path / "checkpoints") == list(range(1, int(found.group(1)) + 1))


def test_ranks_holding_different_plans_raise_instead_of_hanging():
    proc = torchrun([str(ROOT / "tests" / "scripts" / "divergent_ranks.py")], timeout=120)
    assert "rank 0 raised: rank 0: the batch plan differs between ranks" in proc.stdout
    assert "rank 1 raised" in proc.stdout


def test_resume_skips_a_truncated_newest_checkpoint_and_uses_the_previous(tmp_path, caplog):
    assert run(tmp_path, "checkpoint.every_steps=2", "checkpoint.keep=5") == 0
    ckpt = tmp_path / "run" / "checkpoints"
    newest = ckpt / (ckpt / "latest").read_text()
    assert newest.name == "step-00000012.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    with caplog.at_level("INFO", logger="dist_cl"):
        assert run(tmp_path, "checkpoint.every_steps=2", "checkpoint.keep=5", "train.epochs=4") == 0
    assert "skipped checkpoint step-00000012.pt: checksum mismatch (truncated or corrupt)" in caplog.text
    assert "resumed from" in caplog.text and "at epoch 2 step 10" in caplog.text
    assert (ckpt / "latest").read_text() == "step-00000016.pt"


def test_a_second_job_on_a_locked_run_dir_fails_naming_the_first_and_a_dead_ones_lock_is_taken_over(tmp_path,
                                                                                                       caplog):
    run_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, str(ROOT / "launch" / "train.py"), *SYNTHETIC, "train.epochs=100000",
                              f"run.dir={run_dir}"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (run_dir / "checkpoints" / "latest").exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert json.loads((run_dir / "run.lock").read_text())["pid"] == first.pid
        second = torchrun(train_cmd(run_dir, *SYNTHETIC), check=False)
        assert second.returncode != 0
        message = (f"error: run.dir {run_dir} is in use by another job: host {socket.gethostname()}, pid {first.pid}, "
                   "job None, started ")
        assert second.stderr.count(message) == 2, second.stderr[-3000:]  # both ranks, before any training
        assert json.loads((run_dir / "run.lock").read_text())["pid"] == first.pid
    finally:
        first.kill()
        first.wait()
    assert (run_dir / "run.lock").exists()  # a SIGKILLed job leaves its lock behind
    with caplog.at_level("WARNING", logger="dist_cl"):
        assert run(tmp_path, "train.epochs=1") == 0
    assert f"taking over the stale lock of {run_dir}: its pid {first.pid} is no longer running on this host" \
        in caplog.text
    assert not (run_dir / "run.lock").exists()


def test_a_run_dir_that_cannot_be_locked_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "run").write_text("a file where the run directory should be")
    assert run(tmp_path) == 2
    assert capsys.readouterr().err.startswith(f"error: cannot lock run.dir {tmp_path / 'run'}: [Errno 17] File exists")
