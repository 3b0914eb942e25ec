"""A checkpoint that cannot be loaded is skipped for the previous one; a run directory that trained before is
never silently started over."""

import hashlib
import io
import pickle
import shutil

import pytest
import torch
from conftest import FAST, torchrun, train_cmd
from test_train_e2e import SYNTHETIC, assert_same_weights, final_model

from dist_cl.cli import train as cli


def bare_state_dict(reference: bytes) -> bytes:
    """The model weights alone, as ``torch.save(model.state_dict())`` writes them."""
    buffer = io.BytesIO()
    torch.save(torch.load(io.BytesIO(reference), weights_only=False)["model"], buffer)
    return buffer.getvalue()


def pickle_of_a_list(reference: bytes) -> bytes:
    buffer = io.BytesIO()
    torch.save(["not", "a", "checkpoint"], buffer)
    return buffer.getvalue()


def first_byte_flipped(reference: bytes) -> bytes:
    return bytes([reference[0] ^ 0xFF]) + reference[1:]


def plain_pickle(reference: bytes) -> bytes:
    return pickle.dumps({"weights": [1.0, 2.0]})


BAD_CONTENTS = {
    "first-byte-flipped": (first_byte_flipped, "not a torch file, or a damaged one (UnpicklingError: invalid load key"),
    "bare-state-dict": (bare_state_dict, "a bare state_dict (3 tensors: 'u', "),
    "pickle-of-a-list": (pickle_of_a_list, "a pickle of a list, not a dist_cl checkpoint"),
}
BAD_STEPS = {case: step for step, case in enumerate(BAD_CONTENTS, start=5)}
"""The step each bad content stands in for, newer than the good step 4."""


def replace_with_matching_sidecar(path, data: bytes) -> None:
    """``path`` holds ``data`` and its sidecar the checksum of ``data``, as `sha256sum` writes it."""
    path.write_bytes(data)
    path.with_name(path.name + ".sha256").write_text(hashlib.sha256(data).hexdigest())


@pytest.fixture(scope="module")
def resumed_past_bad_checkpoints(reference_runs, tmp_path_factory):
    """One launch for every bad content: step 4 of the reference run, then steps 5, 6 and 7, each one of
    BAD_CONTENTS under a matching checksum, ``latest`` naming step 7. The run directory and what the ranks
    printed."""
    reference_run = reference_runs(*SYNTHETIC)
    run_dir = tmp_path_factory.mktemp("fallback")
    (run_dir / "checkpoints").mkdir()
    for path in (reference_run / "checkpoints").glob("step-00000004.pt*"):
        shutil.copy(path, run_dir / "checkpoints" / path.name)
    checkpoint = (reference_run / "checkpoints" / "step-00000005.pt").read_bytes()
    for case, (make, _) in BAD_CONTENTS.items():
        replace_with_matching_sidecar(run_dir / "checkpoints" / f"step-{BAD_STEPS[case]:08d}.pt", make(checkpoint))
    (run_dir / "checkpoints" / "latest").write_text(f"step-{max(BAD_STEPS.values()):08d}.pt")
    return run_dir, torchrun(train_cmd(run_dir, *FAST, *SYNTHETIC)).stderr


@pytest.mark.parametrize("case", BAD_CONTENTS)
def test_a_newest_checkpoint_that_is_no_checkpoint_is_skipped_and_the_run_ends_as_an_uninterrupted_one(
        reference_runs, resumed_past_bad_checkpoints, case):
    """Each bad checkpoint newer than step 4 is skipped, naming what it holds; the run resumes from step 4 and
    ends bit-identical to the uninterrupted one."""
    run_dir, output = resumed_past_bad_checkpoints
    assert f"skipped checkpoint step-{BAD_STEPS[case]:08d}.pt: {BAD_CONTENTS[case][1]}" in output
    assert "at epoch 1 step 4" in output
    assert_same_weights(final_model(run_dir), final_model(reference_runs(*SYNTHETIC)))


def run(run_dir, *args) -> int:
    return cli.main([*SYNTHETIC, *FAST, f"run.dir={run_dir}", *args])


@pytest.mark.parametrize("case", [*BAD_CONTENTS, "plain-pickle"])
def test_resume_from_a_file_that_is_no_checkpoint_is_one_named_error(reference_runs, tmp_path, capsys, case):
    make, what = {**BAD_CONTENTS, "plain-pickle": (plain_pickle, "not a torch file, or a damaged one (RuntimeError: "
                                                                 "Invalid magic number")}[case]
    weights = tmp_path / "weights.pt"
    replace_with_matching_sidecar(weights, make((reference_runs(*SYNTHETIC) / "checkpoints" / "step-00000005.pt")
                                                .read_bytes()))
    assert run(tmp_path / "run", "--resume", str(weights)) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"error: no usable checkpoint: weights.pt: {what}")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resume_from_a_latest_pointer_or_a_run_directory_takes_its_newest_checkpoint(reference_runs, tmp_path,
                                                                                     caplog):
    reference_run = reference_runs(*SYNTHETIC)
    shutil.copytree(reference_run / "checkpoints", tmp_path / "from" / "checkpoints")
    for source in (tmp_path / "from" / "checkpoints" / "latest", tmp_path / "from"):
        caplog.clear()
        with caplog.at_level("INFO", logger="dist_cl"):
            assert run(tmp_path / f"run-{source.name}", "train.epochs=3", "--resume", str(source)) == 0
        assert "at epoch 2 step 8" in caplog.text


def test_resume_auto_refuses_to_start_over_where_the_run_trained_before_and_none_starts_over(reference_runs,
                                                                                           tmp_path, capsys):
    """The checkpoints are gone (a clean-up job, a lagging listing), ``latest``, the sidecars and the epoch
    records remain: 'auto' names them and how to start over on purpose; 'none' does; a fresh run.dir starts."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference_runs(*SYNTHETIC), run_dir, ignore=shutil.ignore_patterns("run.lock"))
    for path in (run_dir / "checkpoints").glob("step-*.pt"):
        path.unlink()
    assert run(run_dir, "train.epochs=3") == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith(f"error: --resume auto found no checkpoint in {run_dir / 'checkpoints'} but signs that the "
                          f"run trained before: {run_dir / 'checkpoints' / 'latest'} (naming step-00000008.pt); "
                          f"3 checksum sidecar(s) in {run_dir / 'checkpoints'} (step-00000008.pt.sha256 the newest); "
                          f"2 epoch record(s) in {run_dir / 'metrics.jsonl'}; ")
    assert err.endswith("start fresh on purpose: a new run.dir, or --resume none to train from step 0 in this one")
    assert not list((run_dir / "checkpoints").glob("step-*.pt"))
    assert run(run_dir, "--resume", "latest") == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: no usable checkpoint: no checkpoint in {run_dir / 'checkpoints'}")

    assert run(run_dir, "train.epochs=1", "--resume", "none") == 0
    assert (run_dir / "checkpoints" / "latest").read_text() == "step-00000004.pt"
    assert run(run_dir, "train.epochs=1", "--resume", "none") == 2
    assert "--resume none trains from step 0, but" in capsys.readouterr().err
    assert run(tmp_path / "fresh", "train.epochs=1") == 0
    assert (tmp_path / "fresh" / "checkpoints" / "latest").read_text() == "step-00000004.pt"

