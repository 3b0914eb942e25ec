"""What a user sees on the terminal: a default run with nothing to warn of, and a user error that torchrun's
failure summary names in one line instead of ``error_file: <N/A>``."""

import logging

import pytest
from conftest import torchrun, train_cmd
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from dist_cl.cli.torchrun import run_distributed
from dist_cl.config import load_config
from dist_cl.plan.planner import left_out_warning, plan_notes
from dist_cl.runtime.checkpoint_files import CheckpointError


def test_the_default_configs_first_epoch_and_its_evaluations_print_no_warning(one_epoch_run):
    output = (one_epoch_run.parent / "output.txt").read_text()
    assert "WARNING" not in output, output[-4000:]
    assert "INFO 29 of the 1437 training samples (2.0%) are left out of every epoch (different ones" in output


@pytest.mark.parametrize("strategy,level", [("random", logging.INFO), ("sc_global", logging.INFO),
                                            ("fixed", logging.WARNING)])
def test_samples_left_out_for_good_are_a_warning_and_a_new_draw_each_epoch_is_info(strategy, level):
    cfg = load_config(None, [f"selection.strategy={strategy}", "train.global_batch_size=64", "train.epochs=30"])
    assert plan_notes(cfg, 1437) == [(level, left_out_warning(1437, 64, strategy))]


def test_a_user_error_is_what_torchruns_agent_reads_from_the_workers_error_file(tmp_path, monkeypatch, capsys):
    """Read back with torch's own reader and summary, as torchrun's agent does."""
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))

    def body(info):
        raise CheckpointError("no usable checkpoint in runs/x/checkpoints")

    assert run_distributed(body) == 2
    assert capsys.readouterr().err == ""  # torchrun's summary prints it
    failure = ProcessFailure(local_rank=0, pid=1, exitcode=2, error_file=str(error_file))
    summary = str(ChildFailedError("dist-cl-evaluate", {0: failure}))
    assert "traceback : error: no usable checkpoint in runs/x/checkpoints\n" in summary


def test_a_user_error_whose_torchrun_error_file_cannot_be_written_is_printed(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "gone" / "error.json"))

    def body(info):
        raise CheckpointError("no usable checkpoint in runs/x/checkpoints")

    assert run_distributed(body) == 2
    assert capsys.readouterr().err == "error: no usable checkpoint in runs/x/checkpoints\n"


@pytest.mark.parametrize("command", ["train", "extract-embeddings"])
def test_a_user_error_under_torchrun_is_the_one_line_of_torchruns_failure_summary(tmp_path, command):
    if command == "train":
        proc = torchrun(train_cmd(tmp_path / "run", "train.lr=-1"), check=False)
        line = "config error: train.lr=-1.0 must be positive"
    else:
        proc = torchrun(["dist-cl-extract-embeddings", "--checkpoint", str(tmp_path / "nowhere"), "--out",
                         str(tmp_path / "embeddings")], extra=["--no-python"], check=False)
        line = f"error: --checkpoint {tmp_path / 'nowhere'} does not exist; pass a checkpoint file"
    assert proc.returncode == 1, proc.stderr[-4000:]  # torchrun's own exit code for a failed worker
    root_cause = proc.stderr.split("Root Cause (first observed failure):")[-1]
    assert "exitcode  : 2" in root_cause and f"traceback : {line}" in root_cause, proc.stderr[-4000:]
    assert proc.stderr.count("Traceback (most recent call last)") == 1  # torchrun's, none from a worker
