import subprocess
import sys

import pytest
from conftest import ROOT

from dist_cl.config import ConfigError, load_config, parse_overrides, validate


def test_config_and_its_validation_do_not_import_the_method_layer():
    """Validation reads the strategies' declarations (dist_cl.config.strategies), not dist_cl.selection."""
    code = ("import sys; from dist_cl.config import load_config; "
            "load_config(None, ['selection.strategy=sc_global', 'selection.options.knn=8']); print(*sys.modules)")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.split()
    assert "dist_cl.config.strategies" in loaded
    assert not [name for name in loaded if name == "dist_cl.selection" or name.startswith("dist_cl.selection.")]


def test_defaults_load_and_dotted_overrides_apply():
    cfg = load_config(None, ["train.lr=0.5", "selection.strategy=fixed",
                             "model.backbone_kwargs={channels: [8, 8, 8, 8]}"])
    assert cfg.train.lr == 0.5 and cfg.selection.strategy == "fixed"
    assert cfg.model.backbone_kwargs == {"channels": [8, 8, 8, 8]}
    assert str(cfg.run_dir) == "runs/digits"


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\n  lr: 1\nrun:\n  name: x\n")
    cfg = load_config(path, ["train.epochs=9"])
    assert cfg.train.epochs == 9 and cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert str(cfg.run_dir) == "runs/x"


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["train.global_bach_size=32"],
         "unknown config key 'train.global_bach_size'; did you mean train.global_batch_size?"),
        (["trian.lr=1"], "unknown config key 'trian'; did you mean train?"),
        (["train.epochs=ten"], "train.epochs='ten' is a str; expected int"),
        (["train.epochs=1.5"], "train.epochs=1.5 is a float; expected int"),
        (["train.amp=fp8"], "train.amp='fp8' is not one of 'none', 'bf16', 'fp16'"),
        (["train.lr=0"], "train.lr=0.0 must be positive"),
        (["train.global_batch_size=1"], "train.global_batch_size=1 must be at least 2"),
        (["train.max_skipped_fraction=1.5"], "train.max_skipped_fraction=1.5 is a fraction of an epoch's steps"),
        (["selection.strategy=best"], "selection.strategy='best' is unknown; choose one of"),
        (["data.name=shards"], "data.name=shards needs data.path=<shard directory>"),
        (["data.name=shards", "data.path=/no/such/dir"], "data.path='/no/such/dir' does not exist"),
        (["model.backbone=free"], "the 'free' embedding model goes with data.name=synthetic"),
        (["data.name=synthetic", "model.backbone=free", "train.optimizer=adamw"],
         "which only SGD without weight decay"),
        (["train"], "override 'train' must look like section.key=value"),
        (["selection.every_steps=5"], "strategy 'random' is not a loss-aware partition: use sc or sc_global"),
        (["selection.strategy=sc_global", "selection.every_steps=5", "selection.overlap=true"],
         "set one of them"),
        (["selection.strategy=sc", "selection.options.chunks=4"],
         "selection.options.chunks is not an option of strategy 'sc'; known: chunk_batches"),
        (["selection.strategy=sc_global", "selection.options.seed=3"],
         "selection.options.seed is set by the trainer (seed and epoch); remove it and set seed instead"),
        (["selection.strategy=sc", "selection.options.tau=0.2"], "remove it and set loss.tau instead"),
        (["selection.strategy=sc_global", "selection.options.group_size=5"],
         "selection.options.group_size=5 must be a divisor of train.global_batch_size=64"),
        (["selection.strategy=osgd", "selection.options.group_size=4"], "'osgd' is not one: use sc or sc_global"),
        (["selection.options.random_fraction=0.5"], "'random' is not one: use sc or sc_global"),
        (["selection.strategy=sc", "selection.options.random_fraction=1.5"],
         "selection.options.random_fraction=1.5 is the random share of every batch; use a number in [0, 1]"),
        (["selection.strategy=sc", "selection.options.random_fraction=half"], "random_fraction='half' is the random"),
        (["selection.strategy=sc", "selection.options.chunk_batches=0"],
         "selection.options.chunk_batches=0 must be an integer >= 1"),
        (["selection.strategy=sc_global", "selection.options.chunk_batches=-2"],
         "selection.options.chunk_batches=-2 must be an integer >= 0"),
        (["selection.strategy=sc_global", "selection.options.knn=0"],
         "selection.options.knn=0 must be an integer >= 1"),
        (["selection.strategy=sc_global", "selection.options.knn=2.5"], "selection.options.knn=2.5 must be an integer"),
        (["selection.strategy=sc_global", "selection.options.group_size=true"],
         "selection.options.group_size=True must be an integer >= 0"),
        (["selection.strategy=osgd", "selection.options.q=5", "selection.options.k=2"],
         "selection.options.q=5 keeps q of every k=2 batches; q must be <= k"),
        (["selection.strategy=sc", "selection.options.group_size=4", "selection.options.random_fraction=0.5"],
         "two hardness controls; set one"),
        (["eval.train_pairs=0"], "eval.train_pairs=0 must be positive"),
        (["eval.knn_k=0"], "eval.knn_k=0 must be positive"),
        (["data.holdout_fraction=0.001"],
         "data.holdout_fraction=0.001 holds out 2 of the 1797 digits; each split needs one per class at least"),
        (["model.in_chans=0"], "model.in_chans=0 must be positive"),
        (["model.proj_hidden_dim=-1"], "model.proj_hidden_dim=-1 must be >= 0"),
        (["seed=-1"], "seed=-1 must be >= 0"),
        (["model.in_chans=3"], "model.in_chans=3 but data.name=digits has 1-channel images; set model.in_chans=1"),
        (["data.split_seed=-1"], "data.split_seed=-1 must be >= 0"),
        (["train.momentum=1"], "train.momentum=1.0 must be in [0, 1)"),
        (["train.momentum=0.5"], "train.momentum is SGD's and LARS's; train.optimizer=adamw ignores it: remove it"),
        (["data.num_samples=5"], "data.num_samples is read by data.name=synthetic only; data.name=digits ignores it"),
        (["data.image_size=224"], "data.image_size is read by data.name=shards and fashion_mnist only"),
        (["data.name=synthetic", "model.backbone=free", "data.holdout_fraction=0.1"],
         "data.holdout_fraction is read by data.name=digits only; data.name=synthetic ignores it: remove it"),
        (["data.path=/data/shards"],
         "data.path='/data/shards' is ignored by data.name=digits; remove it, or set data.name=shards"),
        (["loss.gamma=0.5"], "loss.name='infonce' ignores it: remove it or set loss.name=sogclr"),
        (["data.augment.flip_prob=1.5"], "data.augment.flip_prob=1.5 is a probability; use a value in [0, 1]"),
        (["train=3"], "train must be a mapping of TrainConfig fields"),
        (["loss.name=hcl"], "loss.name=hcl needs loss.hcl_tau_plus and loss.hcl_beta (the paper's code asserts both)"),
        (["loss.name=hcl", "loss.hcl_tau_plus=0.1"], "loss.name=hcl needs loss.hcl_beta (the paper's code"),
        (["loss.name=hcl", "loss.hcl_beta=1"], "loss.name=hcl needs loss.hcl_tau_plus (the paper's code"),
        (["loss.name=hcl", "loss.hcl_tau_plus=1", "loss.hcl_beta=1"],
         "loss.hcl_tau_plus=1.0 is a prior probability of false negatives; use a value in [0, 1)"),
        (["loss.name=hcl", "loss.hcl_tau_plus=-0.1", "loss.hcl_beta=1"], "loss.hcl_tau_plus=-0.1 is a prior"),
        (["loss.name=hcl", "loss.hcl_tau_plus=0.1", "loss.hcl_beta=-1"], "loss.hcl_beta=-1.0 must be >= 0"),
        (["loss.hcl_beta=1"], "loss.name='infonce' ignores them: remove them or set loss.name=hcl"),
        (["loss.gamma=0"], "loss.gamma=0.0 must be in (0, 1]"),
        (["loss.name=sogclr", "loss.gamma=1.5"], "loss.gamma=1.5 must be in (0, 1]"),
        (["loss.name=sogclr", "loss.learnable_tau=true"], "SogCLR's loss has no gradient w.r.t. tau"),
    ],
)
def test_bad_config_names_the_field_and_the_fix(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_the_objectives_load_with_their_settings():
    assert load_config(None, ["loss.name=sogclr"]).loss.gamma == 0.9
    loss = load_config(None, ["loss.name=hcl", "loss.hcl_tau_plus=0", "loss.hcl_beta=1"]).loss
    assert (loss.hcl_tau_plus, loss.hcl_beta) == (0.0, 1.0) and isinstance(loss.hcl_tau_plus, float)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file .*nope.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_batch_not_divisible_by_world_size():
    cfg = load_config(None, ["train.global_batch_size=30"])
    message = "train.global_batch_size=30 is not divisible by world_size=4; use a multiple of 4"
    with pytest.raises(ConfigError, match=message):
        validate(cfg, world_size=4)


def test_exponent_floats_without_a_dot_are_floats():
    cfg = load_config(None, ["train.lr=1e-3", "loss.tau=5E-2"])
    assert cfg.train.lr == 0.001 and cfg.loss.tau == 0.05


def test_override_values_are_parsed_as_yaml():
    assert parse_overrides(["a.b=[1, 2]", "a.c=true", "d=x"]) == {"a": {"b": [1, 2], "c": True}, "d": "x"}
