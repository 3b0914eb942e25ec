from pathlib import Path

import numpy as np
import pytest
import torch

from dist_cl.runtime.checkpoint_files import Checkpointer, CheckpointError


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


def test_a_checkpoint_without_its_sidecar_is_refused_and_the_previous_used(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=3)
    ckpt.save({"step": 1}, 1)
    newest = ckpt.save({"step": 2}, 2)
    newest.with_name(newest.name + ".sha256").unlink()
    state, path, problems = ckpt.load("latest")
    assert state["step"] == 1
    assert problems == [f"step-00000002.pt: no step-00000002.pt.sha256 beside it, so it cannot be verified (if you "
                        f"trust the file: sha256sum {newest} | cut -d' ' -f1 > {newest}.sha256)"]
    with pytest.raises(CheckpointError, match="no usable checkpoint: step-00000002.pt: no step-00000002.pt.sha256"):
        ckpt.load(str(newest))


def _assert_same(a, b, where: str) -> None:
    """Deep equality of checkpoint states: tensors and arrays exactly, containers item by item."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.layout == b.layout and torch.equal(a.to_dense(), b.to_dense()), where
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=where)
    else:
        assert a == b, where


def test_every_registered_component_round_trips_its_state(tmp_path):
    """A checkpoint taken mid-epoch (a plan being walked, the next one computed ahead), restored into a
    fresh trainer: every component of the map gives back exactly the state it was saved with."""
    from dist_cl.config import load_config
    from dist_cl.runtime.distributed import close_distributed, init_distributed
    from dist_cl.trainer import Trainer

    overrides = ["data.num_samples=64", "train.global_batch_size=8", "train.epochs=3", "train.momentum=0.9",
                 "eval.every_epochs=0", "checkpoint.every_steps=4", "checkpoint.keep=10",
                 "selection.strategy=sc_global", "selection.overlap=true", "selection.options={cell_size: 32}"]
    config = Path(__file__).resolve().parents[1] / "configs" / "synthetic.yaml"
    info = init_distributed(backend="gloo")
    try:
        trainer = Trainer(load_config(config, [*overrides, f"run.dir={tmp_path / 'a'}"]), info)
        trainer.fit()
        trainer.close()
        state, _, _ = trainer.checkpoints.load(str(tmp_path / "a" / "checkpoints" / "step-00000012.pt"))
        assert state["sampler"]["cursor"] == 4 and state["planner"]["plan"]["strategy"] == "sc_global"
        fresh = Trainer(load_config(config, [*overrides, f"run.dir={tmp_path / 'b'}"]), info)
        fresh.checkpoints.restore(state)
        assert set(fresh.checkpoints.components) <= set(state)
        for name, component in fresh.checkpoints.components.items():
            _assert_same(component.state_dict(), state[name], name)
        fresh.close()
    finally:
        close_distributed()
