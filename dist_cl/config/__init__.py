"""Typed run configuration: dataclasses loaded from YAML, overridden by dotted CLI args, validated once.

Every field has a type and a default; ``load_config`` rejects unknown keys (suggesting the closest),
values of the wrong type and inconsistent settings before any process group or data is touched.
"""

import ast
import dataclasses
import difflib
import inspect
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dist_cl.config.strategies import HARDNESS_CONTROLS, OPTION_MINIMUMS, STRATEGIES


class ConfigError(ValueError):
    """A config value is wrong; the message names the field and the fix."""


@dataclass
class RunConfig:
    name: str = "digits"
    """Run name; the run directory defaults to runs/<name>."""
    dir: str = ""
    """Run directory (TensorBoard, checkpoints, metrics, resolved config); empty means runs/<name>."""
    log_every_steps: int = 10
    """Steps between TensorBoard scalar writes."""
    print_every_s: float = 10.0
    """Least seconds between two epoch lines on the terminal (train.log, metrics.jsonl and TensorBoard keep
    every epoch; the first and last epoch always print); 0 prints every epoch."""
    lock_stale_s: float = 600.0
    """A run directory's lock (run.lock, one job per run directory) left by a job on another host is
    stale, and taken over, once its holder has not refreshed it for this long; the holder refreshes it
    every tenth of this. It must exceed the clock difference between the hosts. A lock from this host is
    stale as soon as its process has ended."""


@dataclass
class AugmentConfig:
    """Two-view augmentation. Digits use crop_shift/rotate_degrees/noise_std; images use the SimCLR set."""

    crop_shift: int = 1
    """Digits: maximum shift in pixels (pad then random crop)."""
    rotate_degrees: float = 10.0
    """Digits: maximum absolute rotation."""
    noise_std: float = 0.05
    """Digits: Gaussian pixel noise (pixels are scaled to [0, 1])."""
    crop_scale_min: float = 0.08
    """Images: RandomResizedCrop lower bound on the area fraction."""
    color_jitter: float = 0.4
    """Images: brightness/contrast/saturation strength (hue is a quarter of it); 0 disables."""
    color_jitter_prob: float = 0.8
    """Images: probability of applying the colour jitter."""
    grayscale_prob: float = 0.2
    """Images: probability of converting to grayscale."""
    blur_prob: float = 0.0
    """Images: Gaussian blur probability (SimCLR uses 0.5 on ImageNet, 0 on CIFAR)."""
    flip_prob: float = 0.5
    """Images: horizontal flip probability."""


@dataclass
class DataConfig:
    name: Literal["digits", "synthetic", "shards", "fashion_mnist"] = "digits"
    """Data set: the embedded scikit-learn digits, the paper's synthetic free embeddings, webdataset shards, or
    Fashion-MNIST's IDX files."""
    path: str = ""
    """Shard directory (data.name=shards), or the IDX files' folder (fashion_mnist; empty means
    /usr/share/datasets/fashion-mnist, where `apt-get install dataset-fashion-mnist` puts them)."""
    holdout_fraction: float = 0.2
    """Digits: fraction of images held out for evaluation (stratified by label, fixed by data.split_seed)."""
    split_seed: int = 0
    """Seed of the train/held-out split, independent of the run seed so runs compare on one split."""
    subset: int = 0
    """Fashion-MNIST: train on a stratified sample of this many training images, fixed by data.split_seed (0: all)."""
    heldout_subset: int = 0
    """Fashion-MNIST: evaluate on a stratified sample of this many test images, fixed by data.split_seed (0: all)."""
    num_samples: int = 64
    """Synthetic: number of positive pairs N."""
    image_size: int = 32
    """Shards, Fashion-MNIST: side of the square crop fed to the model."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """The two-view augmentation of training pairs."""


@dataclass
class ModelConfig:
    backbone: str = "resnet10t"
    """timm model name (created with pretrained=False), or 'free' for the synthetic free-embedding model."""
    backbone_kwargs: dict = field(default_factory=dict)
    """Extra arguments for timm.create_model (e.g. channels, img_size, patch_size)."""
    in_chans: int = 1
    """Input channels of the backbone."""
    embed_dim: int = 64
    """Output dimension of the projection head (and of free embeddings)."""
    proj_hidden_dim: int = 256
    """Hidden width of the projection MLP; 0 means a single linear layer."""
    two_towers: bool = False
    """CLIP mode: separate backbone+head for view_a and view_b."""
    sync_bn: bool = False
    """BatchNorm statistics over the global batch (SyncBatchNorm) instead of each rank's slice, as the paper's
    code does: a hard batch split over ranks gives each rank an even more homogeneous slice. CUDA only
    (torch's SyncBatchNorm has no CPU kernel); on the CPU BatchNorm stays per rank, with a warning."""


@dataclass
class LossConfig:
    name: Literal["infonce", "ntxent", "sogclr", "hcl"] = "infonce"
    """infonce: symmetric, B-1 negatives per direction (the paper's loss); ntxent: SimCLR, 2B-2 negatives;
    sogclr: SogCLR's dynamic contrastive loss, a per-sample moving average u of the negative term standing in
    for the negatives a batch lacks; hcl: Robinson et al.'s hard-negative loss (docs/DESIGN.md §1)."""
    tau: float = 0.1
    """Temperature (initial value when learnable)."""
    learnable_tau: bool = False
    """Learn tau (as log 1/tau) with the model instead of fixing it at loss.tau (not with sogclr, whose loss has
    no gradient w.r.t. tau)."""
    gamma: float = 0.9
    """sogclr: weight of this step's mean in the moving average u, in (0, 1] (1: no memory); a sample's first
    visit sets its u to that mean."""
    hcl_tau_plus: float | None = None
    """hcl, required: the prior probability that a negative is a false one (same class), in [0, 1)."""
    hcl_beta: float | None = None
    """hcl, required: how strongly hard negatives are up-weighted, >= 0 (0: the debiased loss alone)."""


@dataclass
class TrainConfig:
    epochs: int = 30
    """Epochs to train; the learning-rate schedule runs over them."""
    global_batch_size: int = 64
    """Samples per optimizer step over all ranks; each rank takes global_batch_size / world_size."""
    lr: float = 1e-3
    """Peak learning rate, reached after train.warmup_epochs, then decayed by a cosine to 0."""
    optimizer: Literal["adamw", "sgd", "lars"] = "adamw"
    """timm's optimizer of that name (sgd: with momentum, not Nesterov)."""
    weight_decay: float = 1e-4
    """Decoupled (adamw) or L2 (sgd, lars) weight decay."""
    momentum: float = 0.9
    """SGD / LARS momentum."""
    warmup_epochs: float = 2.0
    """Linear warm-up length, then cosine decay to zero."""
    grad_clip: float = 0.0
    """Max global gradient norm; 0 disables."""
    amp: Literal["none", "bf16", "fp16"] = "none"
    """Mixed precision on CUDA; ignored (with a warning) on CPU."""
    nonfinite: Literal["error", "skip"] = "error"
    """A non-finite loss, gradient or BatchNorm statistic stops the run (error) or skips the step and counts
    it (skip)."""
    max_skipped_fraction: float = 0.1
    """Under nonfinite=skip, the run stops (SkippedStepsError) once more than this fraction of an epoch's
    steps were skipped. A skip drops the batch's update: one corrupt sample now and then is tolerable, but
    a tenth of an epoch skipped means diverging weights or broken data, and a run that goes on trains on
    another data set than the one configured. Counted per epoch, so a run that starts diverging late
    stops within that epoch; 1 never stops."""


@dataclass
class SelectionConfig:
    strategy: str = "random"
    """Batch selection strategy (see dist_cl.config.strategies.STRATEGIES)."""
    embeddings: Literal["training", "refresh"] = "training"
    """Bank filled from the training forward passes, or by a refresh pass before each selection."""
    warmup_epochs: int = 1
    """Epochs trained on random batches before the first loss-aware selection, in either embeddings mode
    (with ``training``, rows the warm-up left unwritten are embedded before the first selection)."""
    options: dict = field(default_factory=dict)
    """Strategy options passed to select_batches (e.g. k, q, chunk_batches)."""
    overlap: bool = False
    """Compute the next epoch's plan on a worker thread while this epoch trains, from the bank as it was
    when this epoch started: selection leaves the critical path, and the bank is one epoch older."""
    every_steps: int = 0
    """Also re-partition the rest of the epoch every this many steps, from the bank as it is then (0:
    once per epoch). For epochs so long that a bank from the epoch's start is stale."""


@dataclass
class EvalConfig:
    every_epochs: int = 5
    """Evaluate after every this many epochs (and at the end); 0 disables."""
    knn_k: int = 20
    """Neighbours of the held-out kNN classifier over training embeddings."""
    train_pairs: int = 100_000
    """Training pairs of the training-set metrics (train/full_batch_loss, train/retrieval_top1): all of them
    up to this many, a fixed random subset of this many beyond (N^2 similarities are computed in blocks)."""
    corruptions: bool = False
    """Also score corrupted-view retrieval on the held-out images (dist_cl.evaluate.corruptions), as the paper does."""
    corruption_samples: int = 1000
    """Held-out images the corrupted-view retrieval uses, evenly spaced (0: all); each costs
    2 severities x 6 corruptions x 2 views forward passes."""


@dataclass
class CheckpointConfig:
    every_steps: int = 0
    """Save every this many steps (and at every epoch end); 0 means epoch ends only."""
    keep: int = 3
    """Keep the newest this many checkpoints."""
    timeout_s: float = 1800.0
    """How long the other ranks wait for rank 0 to write a checkpoint: it holds the whole bank (1.3 GB at
    ImageNet scale), which a shared file system may take minutes to take."""


@dataclass
class DistConfig:
    timeout_s: float = 300.0
    """Bound on any collective; a rank that hangs longer brings the job down. It must cover the work one
    rank does while the others wait for its result: an sc or osgd plan, sc_global's k-means training, the
    evaluation metrics."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """auto: gloo and the CPU, or CUDA where it is visible (nccl for CUDA tensors, gloo for CPU ones);
    gloo: the CPU even where CUDA is visible; nccl: CUDA, or an error where there is none."""


@dataclass
class Config:
    seed: int = 0
    """Run seed: initialisation, augmentation and every plan's seed derive from it."""
    run: RunConfig = field(default_factory=RunConfig)
    """Where the run writes."""
    data: DataConfig = field(default_factory=DataConfig)
    """What is trained and evaluated on."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The network."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The contrastive objective."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation."""
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    """How global batches are chosen."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation during training."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving and resuming."""
    dist: DistConfig = field(default_factory=DistConfig)
    """The process group."""

    @property
    def run_dir(self) -> Path:
        """run.dir, or runs/<run.name>."""
        return Path(self.run.dir or f"runs/{self.run.name}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")

FREE_FORM = ("options", "backbone_kwargs")
"""dict-valued fields whose keys belong to another library: merged one level deep, never checked key by key."""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints are accepted as floats)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(repr(c) for c in typing.get_args(tp))
            raise ConfigError(f"{key}={value!r} is not one of {choices}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}={value!r} has the wrong type; expected {tp}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}={value!r}: expected null")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _YAML11_FLOAT.fullmatch(value):
        return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
    if tp is dict and isinstance(value, dict):
        return value
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(
            f"{key}={value!r} is a {type(value).__name__}; expected {getattr(tp, '__name__', tp)}"
        )
    return value


def _build(cls: type, values: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key {dotted!r}{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted} must be a mapping of {tp.__name__} fields, got {value!r}")
            kwargs[key] = _build(tp, value, f"{dotted}.")
        else:
            kwargs[key] = _coerce(value, tp, dotted)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is a value, not a section")
        node = child
    node[leaf] = value


def parse_overrides(args: list[str]) -> dict:
    """Turn ``["train.lr=0.1", "selection.strategy=sc"]`` into a nested dict (values parsed as YAML)."""
    tree: dict = {}
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"override {arg!r} must look like section.key=value, e.g. train.lr=0.01")
        key, raw = arg.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw != "" else "")
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in FREE_FORM:
            out[key] = _merge(out[key], value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read YAML (or the defaults), apply dotted overrides, type-check and validate."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist; pass --config configs/<name>.yaml")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
    return config_from_dict(values, overrides)


def config_from_dict(values: dict, overrides: list[str] | None = None) -> Config:
    """A Config from nested values (a YAML file's, or ``Config.to_dict()`` saved in a checkpoint)."""
    cfg = _build(Config, _merge(values, parse_overrides(overrides or [])), "")
    validate(cfg)
    return cfg


DIGITS_SAMPLES = 1797
"""Images in scikit-learn's digits, 10 classes."""

TOOL_OUTPUTS = Path("runs/tools")
"""The tools' default output folder; no run's default run directory (runs/<run.name>) is in it."""


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Checks that need no data or process group; ``world_size`` adds the divisibility check."""
    if not cfg.run.dir and cfg.run_dir == TOOL_OUTPUTS:
        raise ConfigError(f"run.name={cfg.run.name!r} would put the run in {TOOL_OUTPUTS}, where tools write their "
                          "outputs; choose another run.name or set run.dir")
    t = cfg.train
    positive = {
        "train.epochs": t.epochs, "train.global_batch_size": t.global_batch_size, "train.lr": t.lr,
        "loss.tau": cfg.loss.tau, "model.embed_dim": cfg.model.embed_dim, "checkpoint.keep": cfg.checkpoint.keep,
        "dist.timeout_s": cfg.dist.timeout_s, "run.lock_stale_s": cfg.run.lock_stale_s,
        "checkpoint.timeout_s": cfg.checkpoint.timeout_s, "data.num_samples": cfg.data.num_samples,
        "data.image_size": cfg.data.image_size, "run.log_every_steps": cfg.run.log_every_steps,
        "eval.train_pairs": cfg.eval.train_pairs, "eval.knn_k": cfg.eval.knn_k, "model.in_chans": cfg.model.in_chans,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be positive")
    non_negative = {
        "train.weight_decay": t.weight_decay, "train.warmup_epochs": t.warmup_epochs,
        "train.grad_clip": t.grad_clip, "eval.every_epochs": cfg.eval.every_epochs,
        "checkpoint.every_steps": cfg.checkpoint.every_steps,
        "selection.warmup_epochs": cfg.selection.warmup_epochs, "data.num_workers": cfg.data.num_workers,
        "selection.every_steps": cfg.selection.every_steps, "run.print_every_s": cfg.run.print_every_s,
        "data.subset": cfg.data.subset, "data.heldout_subset": cfg.data.heldout_subset,
        "eval.corruption_samples": cfg.eval.corruption_samples, "seed": cfg.seed,
        "data.split_seed": cfg.data.split_seed, "model.proj_hidden_dim": cfg.model.proj_hidden_dim,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key}={value} must be >= 0")
    if not 0.0 <= t.max_skipped_fraction <= 1.0:
        raise ConfigError(f"train.max_skipped_fraction={t.max_skipped_fraction} is a fraction of an epoch's steps; "
                          "use a value in [0, 1]")
    if not 0.0 <= t.momentum < 1.0:
        raise ConfigError(f"train.momentum={t.momentum} must be in [0, 1)")
    if t.optimizer == "adamw" and t.momentum != TrainConfig.momentum:
        raise ConfigError("train.momentum is SGD's and LARS's; train.optimizer=adamw ignores it: remove it")
    if t.global_batch_size < 2:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} must be at least 2 (a batch needs negatives)")
    a = cfg.data.augment
    for key in ("color_jitter_prob", "grayscale_prob", "blur_prob", "flip_prob"):
        if not 0.0 <= getattr(a, key) <= 1.0:
            raise ConfigError(f"data.augment.{key}={getattr(a, key)} is a probability; use a value in [0, 1]")
    if not 0.0 < a.crop_scale_min <= 1.0:
        raise ConfigError(f"data.augment.crop_scale_min={a.crop_scale_min} must be in (0, 1]")
    if a.color_jitter < 0 or a.noise_std < 0 or a.crop_shift < 0:
        raise ConfigError("data.augment.color_jitter, noise_std and crop_shift must be >= 0")
    if not 0.0 < cfg.data.holdout_fraction < 1.0:
        raise ConfigError(f"data.holdout_fraction={cfg.data.holdout_fraction} must be in (0, 1)")
    held_out = math.ceil(cfg.data.holdout_fraction * DIGITS_SAMPLES)  # as sklearn's split counts
    if cfg.data.name == "digits" and not 10 <= held_out <= DIGITS_SAMPLES - 10:  # 10 classes, one a split
        raise ConfigError(f"data.holdout_fraction={cfg.data.holdout_fraction} holds out {held_out} of the "
                          f"{DIGITS_SAMPLES} digits; each split needs one per class at least: use 0.006 to 0.994")
    if cfg.selection.strategy not in STRATEGIES:
        raise ConfigError(
            f"selection.strategy={cfg.selection.strategy!r} is unknown; choose one of {', '.join(sorted(STRATEGIES))}"
        )
    strategy = STRATEGIES[cfg.selection.strategy]
    if cfg.selection.every_steps and not (strategy.reads_embeddings and strategy.partition):
        raise ConfigError(f"selection.every_steps re-partitions the rest of an epoch by loss; strategy "
                          f"{cfg.selection.strategy!r} is not a loss-aware partition: use sc or sc_global, or "
                          "selection.every_steps=0")
    if cfg.selection.every_steps and cfg.selection.overlap:
        raise ConfigError("selection.every_steps re-selects synchronously inside the epoch, selection.overlap "
                          "selects ahead of it: set one of them (selection.overlap=false or selection.every_steps=0)")
    accepted = strategy.options + HARDNESS_CONTROLS
    options = cfg.selection.options
    if (options.get("random_fraction") or options.get("group_size")) and not (strategy.partition
                                                                              and strategy.reads_embeddings):
        raise ConfigError(f"selection.options.random_fraction and group_size control the hardness of loss-aware "
                          f"partition strategies; {cfg.selection.strategy!r} is not one: use sc or sc_global")
    for key in cfg.selection.options:
        if key in ("seed", "tau"):
            source, setting = (("seed and epoch", "seed") if key == "seed"
                               else ("loss.tau, or the learnt tau", "loss.tau"))
            raise ConfigError(f"selection.options.{key} is set by the trainer ({source}); remove it and set "
                              f"{setting} instead")
        if key not in accepted:
            raise ConfigError(f"selection.options.{key} is not an option of strategy {cfg.selection.strategy!r}; "
                              f"known: {', '.join(sorted(accepted))}")
        validate_option(cfg.selection.strategy, key, options[key])
    if options.get("q", 1) > options.get("k", float("inf")):
        raise ConfigError(f"selection.options.q={options['q']} keeps q of every k={options['k']} batches; "
                          "q must be <= k")
    group_size = options.get("group_size", 0)  # an integer >= 0 by now (validate_option)
    if group_size and t.global_batch_size % group_size:
        raise ConfigError(f"selection.options.group_size={group_size!r} must be a divisor of "
                          f"train.global_batch_size={t.global_batch_size} (or 0: off)")
    if options.get("random_fraction") and group_size:
        raise ConfigError("selection.options.random_fraction and group_size are two hardness controls; set one")
    validate_loss(cfg.loss)
    if (cfg.data.subset or cfg.data.heldout_subset) and cfg.data.name != "fashion_mnist":
        raise ConfigError(f"data.subset and data.heldout_subset sample Fashion-MNIST; data.name={cfg.data.name!r} "
                          "reads all its data: set them to 0")
    if cfg.eval.corruptions and cfg.data.name == "synthetic":
        raise ConfigError("eval.corruptions corrupts images; data.name=synthetic has none: set eval.corruptions=false")
    read_by = {"num_samples": ("synthetic",), "holdout_fraction": ("digits",),
               "image_size": ("shards", "fashion_mnist")}
    for key, names in read_by.items():
        if cfg.data.name not in names and getattr(cfg.data, key) != getattr(DataConfig, key):
            raise ConfigError(f"data.{key} is read by data.name={' and '.join(names)} only; data.name={cfg.data.name} "
                              "ignores it: remove it")
    if cfg.data.path and cfg.data.name in ("digits", "synthetic"):
        raise ConfigError(f"data.path={cfg.data.path!r} is ignored by data.name={cfg.data.name}; remove it, or set "
                          "data.name=shards or fashion_mnist to read from it")
    if cfg.data.name in ("digits", "fashion_mnist") and cfg.model.in_chans != 1:
        raise ConfigError(f"model.in_chans={cfg.model.in_chans} but data.name={cfg.data.name} has 1-channel images; "
                          "set model.in_chans=1")
    if cfg.data.name == "shards" and not cfg.data.path:
        raise ConfigError("data.name=shards needs data.path=<shard directory> (made by tools/make_shards.py)")
    if cfg.data.path and cfg.data.name == "shards" and not Path(cfg.data.path).exists():
        raise ConfigError(f"data.path={cfg.data.path!r} does not exist; make shards with tools/make_shards.py")
    if (cfg.model.backbone == "free") != (cfg.data.name == "synthetic"):
        raise ConfigError(
            f"model.backbone={cfg.model.backbone!r} with data.name={cfg.data.name!r}: the 'free' embedding model "
            "goes with data.name=synthetic and only there"
        )
    if cfg.model.backbone == "free" and (t.optimizer != "sgd" or t.weight_decay):
        raise ConfigError(
            f"model.backbone=free with train.optimizer={t.optimizer}, train.weight_decay={t.weight_decay}: free "
            "embeddings get sparse gradients (a step touches only its batch's rows), which only SGD without "
            "weight decay applies; set train.optimizer=sgd train.weight_decay=0"
        )
    if world_size is not None and t.global_batch_size % world_size:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by world_size={world_size}; "
            f"use a multiple of {world_size}"
        )


def field_docs() -> dict[str, str]:
    """Every config key's docstring (the string literal under its field in this module), by dotted key."""
    classes = {node.name: node for node in ast.parse(inspect.getsource(sys.modules[__name__])).body
               if isinstance(node, ast.ClassDef)}
    docs: dict[str, str] = {}

    def walk(cls: type, prefix: str) -> None:
        body = classes[cls.__name__].body
        for stmt, following in zip(body, body[1:] + [None]):
            if not isinstance(stmt, ast.AnnAssign):
                continue
            name = stmt.target.id
            is_doc = isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
            docs[prefix + name] = " ".join(following.value.value.split()) if is_doc else ""
            field_type = typing.get_type_hints(cls)[name]
            if dataclasses.is_dataclass(field_type):
                walk(field_type, f"{prefix}{name}.")

    walk(Config, "")
    return docs


def describe(cfg: Config) -> str:
    """The resolved config as YAML, each key followed by its docstring as a comment (``--print-config``)."""
    docs, lines = field_docs(), []

    def emit(tree: dict, prefix: str, indent: str) -> None:
        for key, value in tree.items():
            doc = docs[prefix + key]
            if isinstance(value, dict) and key not in FREE_FORM:
                lines.append(f"{indent}{key}:  # {doc}")
                emit(value, f"{prefix}{key}.", indent + "  ")
            else:
                shown = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...")
                lines.append(f"{indent}{key}: {shown}  # {doc}")

    emit(cfg.to_dict(), "", "")
    return "\n".join(lines)


def validate_option(strategy: str, key: str, value) -> None:
    """One ``selection.options`` value: a number in [0, 1] for random_fraction, else an integer at least its
    minimum (dist_cl.config.strategies.OPTION_MINIMUMS)."""
    if key == "random_fraction":
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
            raise ConfigError(f"selection.options.random_fraction={value!r} is the random share of every batch; "
                              "use a number in [0, 1]")
        return
    least = 0 if (strategy, key) == ("sc_global", "chunk_batches") else OPTION_MINIMUMS[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"selection.options.{key}={value!r} must be an integer >= {least}")


def validate_loss(loss: LossConfig) -> None:
    if not 0.0 < loss.gamma <= 1.0:
        raise ConfigError(f"loss.gamma={loss.gamma} must be in (0, 1]: the weight of a step's mean in SogCLR's "
                          "moving average (0.9 in the paper's code)")
    if loss.name != "sogclr" and loss.gamma != LossConfig.gamma:
        raise ConfigError(f"loss.gamma sets SogCLR's moving average; loss.name={loss.name!r} ignores it: remove it "
                          "or set loss.name=sogclr")
    if loss.name == "sogclr" and loss.learnable_tau:
        raise ConfigError("loss.learnable_tau=true with loss.name=sogclr: SogCLR's loss has no gradient w.r.t. tau "
                          "(it only enters the detached weights); set loss.learnable_tau=false")
    hcl_keys = {"loss.hcl_tau_plus": loss.hcl_tau_plus, "loss.hcl_beta": loss.hcl_beta}
    if loss.name != "hcl":
        if any(value is not None for value in hcl_keys.values()):
            raise ConfigError(f"loss.hcl_tau_plus and loss.hcl_beta set HCL; loss.name={loss.name!r} ignores them: "
                              "remove them or set loss.name=hcl")
        return
    missing = [key for key, value in hcl_keys.items() if value is None]
    if missing:
        raise ConfigError(f"loss.name=hcl needs {' and '.join(missing)} (the paper's code asserts both), e.g. "
                          "loss.hcl_tau_plus=0.1 loss.hcl_beta=1.0")
    if not 0.0 <= loss.hcl_tau_plus < 1.0:
        raise ConfigError(f"loss.hcl_tau_plus={loss.hcl_tau_plus} is a prior probability of false negatives; "
                          "use a value in [0, 1)")
    if loss.hcl_beta < 0:
        raise ConfigError(f"loss.hcl_beta={loss.hcl_beta} must be >= 0")


def save_config(cfg: Config, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


RESUMABLE_CHANGES = ("train.epochs", "train.max_skipped_fraction", "eval.", "checkpoint.", "run.", "dist.",
                     "data.num_workers")
"""Config keys that may differ between a checkpoint and the run resuming it."""


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key not in FREE_FORM:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


NOT_HYPERPARAMETERS = ("run.", "checkpoint.", "dist.", "data.num_workers", "data.path")
"""Keys that say where and how a run is kept, not what it learns: left out of TensorBoard's hparams."""


def changed_keys(cfg: Config) -> dict:
    """The dotted hyperparameter keys whose value differs from the default, with their values (hparams)."""
    defaults = _flatten(Config().to_dict())
    return {key: value for key, value in _flatten(cfg.to_dict()).items()
            if defaults.get(key) != value and not key.startswith(NOT_HYPERPARAMETERS)}


def config_differences(saved: dict, current: dict) -> list[str]:
    """Keys whose change makes a checkpoint unusable, with both values. A key the checkpoint's config lacks was
    added since; it counts as its default, which keeps the behaviour of the version that wrote it."""
    a, b = {**_flatten(Config().to_dict()), **_flatten(saved)}, _flatten(current)
    return [
        f"{key}: checkpoint {a.get(key)!r} vs now {b.get(key)!r}"
        for key in sorted(set(a) | set(b))
        if a.get(key) != b.get(key) and not key.startswith(RESUMABLE_CHANGES)
    ]
