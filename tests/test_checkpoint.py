import torch
import pytest

from dist_cl.checkpoint import Checkpointer, CheckpointError


def test_saves_atomically_keeps_the_newest_and_points_latest(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=2)
    for step in (5, 10, 15):
        ckpt.save({"step": step, "w": torch.full((3,), float(step))}, step)
    assert [p.name for p in ckpt.checkpoints()] == ["step-00000010.pt", "step-00000015.pt"]
    assert (tmp_path / "latest").read_text() == "step-00000015.pt"
    assert not list(tmp_path.glob(".*.tmp"))
    state, path, problems = ckpt.load("latest")
    assert state["step"] == 15 and problems == []
    assert not (tmp_path / "step-00000005.pt.sha256").exists()


def test_truncated_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=3)
    ckpt.save({"step": 1}, 1)
    newest = ckpt.save({"step": 2, "pad": torch.zeros(1000)}, 2)
    newest.write_bytes(newest.read_bytes()[:100])
    state, path, problems = ckpt.load("latest")
    assert state["step"] == 1 and path.name == "step-00000001.pt"
    assert problems and "step-00000002.pt: checksum mismatch" in problems[0]


def test_no_usable_checkpoint_is_a_named_error(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=3)
    ckpt.save({"step": 1}, 1).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no usable checkpoint: step-00000001.pt: checksum mismatch"):
        ckpt.load("latest")
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.load(str(tmp_path / "missing.pt"))
