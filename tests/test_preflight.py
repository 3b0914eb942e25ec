"""What the trainer tells a user before training: config errors, --print-config, and warnings about the run."""

import subprocess
import sys

import pytest
import yaml
from conftest import ROOT

from dist_cl.cli import train as cli
from dist_cl.config import Config, ConfigError, config_from_dict, field_docs, load_config
from dist_cl.config.resume import epochs_change_warning
from dist_cl.config.schedule import lr_factor
from dist_cl.plan.planner import left_out_warning, plan_strategy, random_epochs, warmup_warning


def launch(*args: str, tmp_path) -> subprocess.CompletedProcess:
    """One plain process of launch/train.py (no torchrun), its run directory under ``tmp_path``."""
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), *args, f"run.dir={tmp_path / 'run'}"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)


def test_unknown_backbone_is_a_named_config_error_under_dry_run(tmp_path, capsys):
    assert cli.main(["--dry-run", "model.backbone=resnet10x", f"run.dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("config error: model.backbone='resnet10x' is not a timm model; did you mean resnet10t")
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_dry_run_warns_of_the_samples_each_epoch_leaves_out(tmp_path, capsys):
    assert cli.main(["--dry-run", f"run.dir={tmp_path / 'run'}"]) == 0  # digits: 1,437 training images at B = 64
    assert ("29 of the 1437 training samples (2.0%) are left out of every epoch (different ones each epoch): "
            "N is not a multiple of train.global_batch_size=64") in capsys.readouterr().err


@pytest.mark.parametrize("n,b,strategy,left_out", [(1437, 64, "random", 29), (1437, 64, "sc_global", 29),
                                                   (10000, 32, "random", 16), (1280, 64, "random", 0),
                                                   (1437, 64, "osgd", 0)])
def test_left_out_warning_counts_what_a_partition_drops(n, b, strategy, left_out):
    message = left_out_warning(n, b, strategy)
    assert (message is None) == (left_out == 0)
    if left_out:
        assert message.startswith(f"{left_out} of the {n} training samples")


@pytest.mark.parametrize("strategy,warmup,epochs,warned", [("sc_global", 1, 1, True), ("osgd", 3, 2, True),
                                                           ("sc", 1, 2, False), ("random", 5, 1, False)])
def test_a_warm_up_that_covers_the_run_is_named(strategy, warmup, epochs, warned):
    selection = load_config(None, [f"selection.strategy={strategy}", f"selection.warmup_epochs={warmup}"]).selection
    message = warmup_warning(selection, epochs)
    assert (message is not None) == warned
    if warned:
        assert message.startswith(f"selection.warmup_epochs={warmup} covers all train.epochs={epochs}: ")
        assert f"{strategy} never selects" in message


@pytest.mark.parametrize("strategy", ["sc_global", "osgd", "fixed", "full"])
@pytest.mark.parametrize("warmup", [0, 1, 3])
@pytest.mark.parametrize("overlap", [False, True])
def test_random_epochs_counts_the_epochs_whose_plans_are_random(strategy, warmup, overlap):
    """Epoch 0's plan is chosen from the bank of epoch 0; under overlap epoch k's (k >= 1) from epoch
    k - 1's, as the planner asks ``plan_strategy``."""
    selection = load_config(None, [f"selection.strategy={strategy}", f"selection.warmup_epochs={warmup}",
                                   f"selection.overlap={str(overlap).lower()}"]).selection
    plans = [plan_strategy(selection, k - 1 if overlap and k else k) for k in range(8)]
    leading = next(k for k, name in enumerate(plans) if name != "random")
    assert random_epochs(selection) == leading
    assert plans[leading:] == [strategy] * (8 - leading)


def test_a_warm_up_that_overlap_stretches_over_the_run_is_named():
    selection = load_config(None, ["selection.strategy=sc", "selection.warmup_epochs=1",
                                   "selection.overlap=true"]).selection
    assert warmup_warning(selection, 2).startswith("selection.warmup_epochs=1 covers all train.epochs=2 (one "
                                                   "more than the warm-up under selection.overlap): ")
    assert warmup_warning(selection, 3) is None


def test_a_fixed_partition_leaves_out_the_same_samples_every_epoch():
    assert "(the same ones every epoch)" in left_out_warning(1437, 64, "fixed")


def test_print_config_lists_every_key_with_its_docstring(tmp_path):
    proc = launch("--print-config", "--config", str(ROOT / "configs" / "fashion_mnist.yaml"), "train.lr=0.25",
                  tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = load_config(ROOT / "configs" / "fashion_mnist.yaml", ["train.lr=0.25", f"run.dir={tmp_path / 'run'}"])
    assert yaml.safe_load(proc.stdout) == expected.to_dict()  # the resolved config, comments aside
    docs = field_docs()
    assert all(docs.values()), [key for key, doc in docs.items() if not doc]
    for key, doc in docs.items():
        name = key.rsplit(".", 1)[-1]
        indent = "  " * key.count(".")
        assert any(line.startswith(f"{indent}{name}:") and line.endswith(f"# {doc}")
                   for line in proc.stdout.splitlines()), key
    assert "lr: 0.25  # Peak learning rate" in proc.stdout


def test_field_docs_cover_every_key_of_the_config():
    def keys(tree: dict, prefix: str = "") -> set:
        out = set()
        for key, value in tree.items():
            out.add(prefix + key)
            if isinstance(value, dict) and key not in ("options", "backbone_kwargs"):
                out |= keys(value, f"{prefix}{key}.")
        return out

    assert set(field_docs()) == keys(Config().to_dict())


def test_changing_train_epochs_on_resume_names_the_learning_rate_jump():
    train = load_config(None, ["train.epochs=40", "train.lr=0.001", "train.warmup_epochs=2"]).train
    message = epochs_change_warning(30, train, 29.5)
    before, after = 0.001 * lr_factor(29.5, 2, 30), 0.001 * lr_factor(29.5, 2, 40)
    assert message == (f"train.epochs changed from 30 to 40 on resume: the learning rate at epoch 29.50 goes from "
                       f"{before:.3g} to {after:.3g} (the cosine schedule is over train.epochs)")
    assert after > 30 * before
    assert epochs_change_warning(40, train, 29.5) is None


def test_a_run_named_tools_is_refused_where_tools_write():
    with pytest.raises(ConfigError, match="run.name='tools' would put the run in runs/tools"):
        config_from_dict({"run": {"name": "tools"}})
    config_from_dict({"run": {"name": "tools", "dir": "elsewhere"}})
