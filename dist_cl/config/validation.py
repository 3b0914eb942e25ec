"""Validation: the rules between a config's values that need no data and no process group, one function per
section, each rule in one place. ``validate`` runs them once per load (dist_cl.config.loading).

A rule that joins two sections sits with the section whose value it refuses. The sections run in an order
that reports the first mistake a user would fix: a data key another data set ignores before the model that
data needs.
"""

import difflib
import math
from pathlib import Path

from dist_cl.config.datasets import DATASETS
from dist_cl.config.schema import (
    TOOL_OUTPUTS,
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    LossConfig,
    TrainConfig,
)
from dist_cl.config.strategies import (
    OPTION_MINIMUMS,
    STRATEGIES,
    WINDOW,
    accepted_options,
    check_hardness_controls,
    check_window,
)


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Raise a ConfigError naming the field and the fix; ``world_size`` adds the divisibility check."""
    _non_negative({"seed": cfg.seed})
    _check_run(cfg)
    _check_train(cfg.train, world_size)
    _check_data(cfg.data)
    _check_model(cfg)
    _check_loss(cfg.loss)
    _check_selection(cfg)
    _check_eval(cfg)
    _check_checkpoint(cfg.checkpoint)
    _positive({"dist.timeout_s": cfg.dist.timeout_s})  # the dist section's one rule


def _positive(values: dict) -> None:
    for key, value in values.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be positive")


def _non_negative(values: dict) -> None:
    for key, value in values.items():
        if value < 0:
            raise ConfigError(f"{key}={value} must be >= 0")


def _check_run(cfg: Config) -> None:
    run = cfg.run
    if not run.dir and cfg.run_dir == TOOL_OUTPUTS:
        raise ConfigError(f"run.name={run.name!r} would put the run in {TOOL_OUTPUTS}, where tools write their "
                          "outputs; choose another run.name or set run.dir")
    _positive({"run.log_every_steps": run.log_every_steps, "run.lock_stale_s": run.lock_stale_s})
    _non_negative({"run.print_every_s": run.print_every_s})


def _check_train(t: TrainConfig, world_size: int | None) -> None:
    _positive({"train.epochs": t.epochs, "train.lr": t.lr})
    _non_negative({"train.weight_decay": t.weight_decay, "train.warmup_epochs": t.warmup_epochs,
                   "train.grad_clip": t.grad_clip})
    if t.global_batch_size < 2:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} must be at least 2 (a batch needs negatives)")
    if world_size is not None and t.global_batch_size % world_size:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not divisible by world_size={world_size}; "
                          f"use a multiple of {world_size}")
    _positive({"train.accum_steps": t.accum_steps})
    per_rank = t.global_batch_size // (world_size or 1)
    if world_size is not None and per_rank % t.accum_steps:
        raise ConfigError(f"train.accum_steps={t.accum_steps} does not divide the per-rank batch "
                          f"train.global_batch_size / world_size = {t.global_batch_size} / {world_size} = {per_rank}; "
                          "use a divisor of it")
    if not 0.0 <= t.max_skipped_fraction <= 1.0:
        raise ConfigError(f"train.max_skipped_fraction={t.max_skipped_fraction} is a fraction of an epoch's steps; "
                          "use a value in [0, 1]")
    if not 0.0 <= t.momentum < 1.0:
        raise ConfigError(f"train.momentum={t.momentum} must be in [0, 1)")
    if t.optimizer == "adamw" and t.momentum != TrainConfig.momentum:
        raise ConfigError("train.momentum is SGD's and LARS's; train.optimizer=adamw ignores it: remove it")


def _check_data(data: DataConfig) -> None:
    if data.name not in DATASETS:
        raise ConfigError(f"data.name={data.name!r} is unknown; choose one of {', '.join(sorted(DATASETS))}")
    _positive({"data.num_samples": data.num_samples, "data.image_size": data.image_size})
    _non_negative({"data.num_workers": data.num_workers, "data.subset": data.subset,
                   "data.heldout_subset": data.heldout_subset, "data.split_seed": data.split_seed})
    _check_keys_read(data)
    if not 0.0 < data.holdout_fraction < 1.0:
        raise ConfigError(f"data.holdout_fraction={data.holdout_fraction} must be in (0, 1)")
    declared = DATASETS[data.name]
    if "holdout_fraction" in declared.reads:
        held_out = math.ceil(data.holdout_fraction * declared.samples)  # as sklearn's split counts
        least = declared.classes  # one image of each class in either split
        if not least <= held_out <= declared.samples - least:
            low = math.ceil(1000 * least / declared.samples) / 1000
            raise ConfigError(f"data.holdout_fraction={data.holdout_fraction} holds out {held_out} of the "
                              f"{declared.samples} {data.name}; each split needs one per class at least: use "
                              f"{low:g} to {1 - low:g}")
    if data.name in ("shards", "captions") and not data.path:
        raise ConfigError(f"data.name={data.name} needs data.path=<shard directory> (made by dist-cl-make-shards)")
    if data.name in ("shards", "captions") and not Path(data.path).exists():
        raise ConfigError(f"data.path={data.path!r} does not exist; make shards with dist-cl-make-shards")
    _check_augment(data)


def _check_keys_read(data: DataConfig) -> None:
    """Each ``data.*`` key that only some data sets read (dist_cl.config.datasets) is left at its default by
    the others."""
    reads = DATASETS[data.name].reads
    if (data.subset or data.heldout_subset) and "subset" not in reads:
        raise ConfigError(f"data.subset and data.heldout_subset sample Fashion-MNIST; data.name={data.name!r} "
                          "reads all its data: set them to 0")
    if data.path and "path" not in reads:
        readers = [name for name, declared in DATASETS.items() if "path" in declared.reads]
        raise ConfigError(f"data.path={data.path!r} is ignored by data.name={data.name}; remove it, or set "
                          f"data.name={' or '.join(readers)} to read from it")
    for key in ("num_samples", "holdout_fraction", "image_size"):
        if key not in reads and getattr(data, key) != getattr(DataConfig, key):
            readers = [name for name, declared in DATASETS.items() if key in declared.reads and name != "captions"]
            captions = ", and by captions (shards with captions)" if key in DATASETS["captions"].reads else ""
            raise ConfigError(f"data.{key} is read by data.name={' and '.join(readers)} only{captions}; "
                              f"data.name={data.name} ignores it: remove it")


def _check_augment(data: DataConfig) -> None:
    a = data.augment
    for key in ("color_jitter_prob", "grayscale_prob", "blur_prob", "flip_prob"):
        if not 0.0 <= getattr(a, key) <= 1.0:
            raise ConfigError(f"data.augment.{key}={getattr(a, key)} is a probability; use a value in [0, 1]")
    if not 0.0 < a.crop_scale_min <= 1.0:
        raise ConfigError(f"data.augment.crop_scale_min={a.crop_scale_min} must be in (0, 1]")
    if a.color_jitter < 0 or a.noise_std < 0 or a.crop_shift < 0:
        raise ConfigError("data.augment.color_jitter, noise_std and crop_shift must be >= 0")


def _check_model(cfg: Config) -> None:
    model, data, t = cfg.model, DATASETS[cfg.data.name], cfg.train
    _positive({"model.embed_dim": model.embed_dim, "model.in_chans": model.in_chans})
    _non_negative({"model.proj_hidden_dim": model.proj_hidden_dim})
    if data.channels is not None and model.in_chans != data.channels:
        raise ConfigError(f"model.in_chans={model.in_chans} but data.name={cfg.data.name} has {data.channels}-channel "
                          f"images; set model.in_chans={data.channels}")
    if (model.backbone == "free") == data.images:  # free embeddings stand in for images
        imageless = " or ".join(name for name, declared in DATASETS.items() if not declared.images)
        raise ConfigError(f"model.backbone={model.backbone!r} with data.name={cfg.data.name!r}: the 'free' embedding "
                          f"model goes with data.name={imageless} and only there")
    if model.backbone == "free" and (t.optimizer != "sgd" or t.weight_decay):
        raise ConfigError(
            f"model.backbone=free with train.optimizer={t.optimizer}, train.weight_decay={t.weight_decay}: free "
            "embeddings get sparse gradients (a step touches only its batch's rows), which only SGD without "
            "weight decay applies; set train.optimizer=sgd train.weight_decay=0"
        )
    if model.backbone == "free" and t.compile:
        raise ConfigError("train.compile=true with model.backbone=free: dynamo cannot trace the sparse gradient the "
                          "free embeddings' autograd function builds (torch.sparse_coo_tensor) and breaks the graph "
                          "there, and a table lookup has nothing to fuse; set train.compile=false")
    if model.backbone_kwargs.get("pretrained"):
        raise ConfigError("model.backbone_kwargs.pretrained would download timm weights from the hub, and runs do "
                          "not download; download them and set model.backbone_kwargs.checkpoint_path=<local file>")
    if data.captions and not model.text_tower:
        raise ConfigError(f"data.name={cfg.data.name} pairs images with captions, which need a text tower; set "
                          "model.text_tower (e.g. RN50, with model.text_cfg to size it)")
    if model.text_tower:
        _check_text_tower(cfg)
    elif model.text_cfg or model.text_pretrained or cfg.loss.name == "siglip":
        raise ConfigError("model.text_cfg, model.text_pretrained and loss.name=siglip are for image–text pairs; "
                          "set model.text_tower (e.g. RN50) or remove them")


OPEN_CLIP_BPE_VOCAB_SIZE = 49408
"""Token ids of open_clip's own BPE tokenizer, the only one runs use (dist_cl.data.tokenizer)."""


def _check_text_tower(cfg: Config) -> None:
    """``model.text_tower``: an open_clip model config whose text tower open_clip builds itself (not a Hugging
    Face one, downloaded), ``model.text_cfg`` fields of open_clip's CLIPTextCfg, weights from a local file only,
    and a loss defined on image–text pairs."""
    import open_clip
    from open_clip.model import CLIPTextCfg

    model = cfg.model
    if model.two_towers:
        raise ConfigError("model.two_towers=true with model.text_tower: the text tower is the second tower; "
                          "remove model.two_towers")
    if model.text_tower.startswith("hf-hub:"):
        raise ConfigError(f"model.text_tower={model.text_tower!r} is a model open_clip downloads from the hub, and "
                          "runs do not download; name a built-in open_clip config (e.g. RN50) and put its downloaded "
                          "weights in model.text_pretrained=<local path>")
    base = open_clip.get_model_config(model.text_tower)
    if base is None:
        close = difflib.get_close_matches(model.text_tower, open_clip.list_models(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(f"model.text_tower={model.text_tower!r} is not an open_clip model config; {hint}list them "
                          "with python -c \"import open_clip; print(open_clip.list_models())\"")
    hf_model = {**base["text_cfg"], **model.text_cfg}.get("hf_model_name")
    if hf_model:
        raise ConfigError(f"model.text_tower={model.text_tower!r} is a Hugging Face text model "
                          f"({hf_model}), downloaded from the hub, and runs do not download; "
                          "choose an open_clip config with its own TextTransformer, e.g. RN50")
    unknown = sorted(set(model.text_cfg) - set(CLIPTextCfg.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"model.text_cfg.{unknown[0]} is not a field of open_clip's CLIPTextCfg; known: "
                          f"{', '.join(sorted(CLIPTextCfg.__dataclass_fields__))}")
    vocab_size = {**base["text_cfg"], **model.text_cfg}.get("vocab_size", CLIPTextCfg.vocab_size)
    if vocab_size != OPEN_CLIP_BPE_VOCAB_SIZE:
        raise ConfigError(f"model.text_tower={model.text_tower!r} has vocab_size={vocab_size}, but captions are "
                          f"tokenised with open_clip's BPE ({OPEN_CLIP_BPE_VOCAB_SIZE} ids); choose a config with its "
                          f"vocabulary (e.g. RN50) or set model.text_cfg.vocab_size={OPEN_CLIP_BPE_VOCAB_SIZE}")
    _check_text_pretrained(model.text_pretrained, model.text_tower)
    if cfg.loss.name not in ("infonce", "siglip"):
        raise ConfigError(
            f"loss.name={cfg.loss.name} with model.text_tower: its negatives include image–image and text–text "
            "pairs, defined for two views of one image (dist_cl.learn.losses); use loss.name=infonce or siglip")


def _check_text_pretrained(pretrained: str, text_tower: str) -> None:
    """A local file, or nothing: a name open_clip would download is refused with the option to use instead."""
    import open_clip

    if not pretrained or Path(pretrained).is_file():
        return
    tags = {tag for _, tag in open_clip.list_pretrained()}
    if pretrained.startswith("hf-hub:") or pretrained in tags:
        raise ConfigError(f"model.text_pretrained={pretrained!r} names weights open_clip downloads, and runs do not "
                          f"download; download the {text_tower} checkpoint (e.g. open_clip_pytorch_model.bin) and set "
                          "model.text_pretrained=<its local path>")
    raise ConfigError(f"model.text_pretrained={pretrained!r} is not a file; give a local open_clip checkpoint")


def _check_loss(loss: LossConfig) -> None:
    _positive({"loss.tau": loss.tau})
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


def _check_selection(cfg: Config) -> None:
    selection = cfg.selection
    _non_negative({"selection.warmup_epochs": selection.warmup_epochs, "selection.every_steps": selection.every_steps})
    if selection.strategy not in STRATEGIES:
        raise ConfigError(f"selection.strategy={selection.strategy!r} is unknown; choose one of "
                          f"{', '.join(sorted(STRATEGIES))}")
    strategy = STRATEGIES[selection.strategy]
    if selection.every_steps and not (strategy.reads_embeddings and strategy.partition):
        raise ConfigError(f"selection.every_steps re-partitions the rest of an epoch by loss; strategy "
                          f"{selection.strategy!r} is not a loss-aware partition: use sc or sc_global, or "
                          "selection.every_steps=0")
    if selection.every_steps and selection.overlap:
        raise ConfigError("selection.every_steps re-selects synchronously inside the epoch, selection.overlap "
                          "selects ahead of it: set one of them (selection.overlap=false or selection.every_steps=0)")
    if selection.teacher and not strategy.reads_embeddings:
        raise ConfigError(f"selection.teacher gives embeddings to select on, and selection.strategy="
                          f"{selection.strategy} reads none: use a loss-aware strategy (sc, sc_global, osgd) or "
                          "selection.teacher=''")
    if selection.teacher and selection.embeddings == "refresh":
        raise ConfigError("selection.teacher replaces the bank that selection.embeddings=refresh re-embeds before "
                          "each selection: set selection.embeddings=training")
    if cfg.loss.name == "siglip" and strategy.reads_embeddings:
        raise ConfigError(f"selection.strategy={selection.strategy} with loss.name=siglip: batch scoring (the plan's "
                          "lift, osgd's ranking) would need SigLIP's learnt logit bias, which the bank does not hold; "
                          "use selection.strategy=random or loss.name=infonce")
    _check_options(selection.strategy, selection.options, cfg.train.global_batch_size)


def _check_options(strategy: str, options: dict, global_batch_size: int) -> None:
    """``selection.options``: each one accepted by the strategy and of its type, then the rules between them."""
    accepted = accepted_options(strategy)
    for key, value in options.items():
        if key in ("seed", "tau"):
            source, setting = (("seed and epoch", "seed") if key == "seed"
                               else ("loss.tau, or the learnt tau", "loss.tau"))
            raise ConfigError(f"selection.options.{key} is set by the trainer ({source}); remove it and set "
                              f"{setting} instead")
        if key not in accepted:
            raise ConfigError(f"selection.options.{key} is not an option of strategy {strategy!r}; "
                              f"known: {', '.join(sorted(accepted))}")
        _check_option_value(strategy, key, value)
    group_size = options.get("group_size", 0)
    check_hardness_controls(strategy, options.get("random_fraction", 0.0), group_size, loss_aware=True,
                            error=ConfigError, prefix="selection.options.")
    check_window(strategy, options.get(WINDOW, 0), options.get("random_fraction", 0.0), group_size,
                 error=ConfigError, prefix="selection.options.")
    if group_size and global_batch_size % group_size:
        raise ConfigError(f"selection.options.group_size={group_size!r} must be a divisor of "
                          f"train.global_batch_size={global_batch_size} (or 0: off)")
    if options.get("q", 1) > options.get("k", float("inf")):
        raise ConfigError(f"selection.options.q={options['q']} keeps q of every k={options['k']} batches; "
                          "q must be <= k")


def _check_option_value(strategy: str, key: str, value) -> None:
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


def _check_eval(cfg: Config) -> None:
    e = cfg.eval
    _positive({"eval.train_pairs": e.train_pairs, "eval.knn_k": e.knn_k})
    _non_negative({"eval.every_epochs": e.every_epochs, "eval.corruption_samples": e.corruption_samples})
    if e.corruptions and not DATASETS[cfg.data.name].images:
        raise ConfigError(f"eval.corruptions corrupts images; data.name={cfg.data.name} has none: set "
                          "eval.corruptions=false")
    if e.corruptions and DATASETS[cfg.data.name].captions:
        raise ConfigError(f"eval.corruptions retrieves a corrupted view of an image by its clean view, and "
                          f"data.name={cfg.data.name} pairs images with captions: set eval.corruptions=false")


def _check_checkpoint(checkpoint: CheckpointConfig) -> None:
    _positive({"checkpoint.keep": checkpoint.keep, "checkpoint.timeout_s": checkpoint.timeout_s})
    _non_negative({"checkpoint.every_steps": checkpoint.every_steps})
