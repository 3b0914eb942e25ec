"""The run configuration's schema: one typed dataclass per section, each field with its default and, under it,
the docstring that ``--print-config`` shows (dist_cl.config.render reads them from this file's source).

Loading (dist_cl.config.loading) builds these from YAML and overrides; the rules between fields live in
dist_cl.config.validation; the data sets and strategies a name may choose are declared in
dist_cl.config.datasets and dist_cl.config.strategies.
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


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
    """A run directory's lock (run.lock, one job per run directory) is stale, and taken over, once its
    holder has not refreshed it for this long; the holder refreshes it every tenth of this. It must exceed
    the clock difference between the hosts. A lock from this host is stale as soon as its process has ended."""


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
    name: str = "digits"
    """Data set (dist_cl.config.datasets.DATASETS): the embedded scikit-learn digits, the paper's synthetic free
    embeddings, webdataset shards, or Fashion-MNIST's IDX files."""
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
    """Separate backbone+head for view_a and view_b (both images)."""
    text_tower: str = ""
    """Image–text pairs: view_b is a caption's token ids, embedded by open_clip's TextTransformer (randomly
    initialised) built from the text_cfg of this open_clip model config (open_clip.list_models(), e.g. RN50),
    with model.text_cfg over it; empty: view_b is an image."""
    text_cfg: dict = field(default_factory=dict)
    """Overrides of open_clip's CLIPTextCfg fields for model.text_tower, e.g. {width: 128, layers: 2, heads: 4}
    for a small CPU tower; context_length must be the tokeniser's, vocab_size its vocabulary's (49408)."""
    text_pretrained: str = ""
    """A local open_clip CLIP checkpoint (.pt, .bin or .safetensors) whose text weights start model.text_tower;
    open_clip's pretrained tags and hf-hub: names are refused (runs do not download): download the file first."""
    sync_bn: bool = False
    """BatchNorm statistics over the global batch (SyncBatchNorm) instead of each rank's slice, as the paper's
    code does: a hard batch split over ranks gives each rank an even more homogeneous slice. CUDA only
    (torch's SyncBatchNorm has no CPU kernel); on the CPU BatchNorm stays per rank, with a warning."""


@dataclass
class LossConfig:
    name: Literal["infonce", "ntxent", "sogclr", "hcl", "siglip"] = "infonce"
    """infonce: symmetric, B-1 negatives per direction (the paper's loss); ntxent: SimCLR, 2B-2 negatives;
    sogclr: SogCLR's dynamic contrastive loss, a per-sample moving average u of the negative term standing in
    for the negatives a batch lacks; hcl: Robinson et al.'s hard-negative loss (docs/DESIGN.md §1); siglip:
    SigLIP's pairwise sigmoid loss with a learnt logit bias (model.text_tower only)."""
    tau: float = 0.1
    """Temperature (initial value when learnable); with model.text_tower, 1/exp of open_clip's logit scale:
    open_clip initialises CLIP at 0.07 and SigLIP at 0.1."""
    learnable_tau: bool = False
    """Learn tau (as log 1/tau) with the model instead of fixing it at loss.tau (not with sogclr, whose loss has
    no gradient w.r.t. tau); with model.text_tower clamped at 0.01, as open_clip clamps its logit scale."""
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
    accum_steps: int = 1
    """Micro-batches each rank's share of the global batch goes through the model in: a global batch
    accum_steps times larger in the same activation memory (GradCache; open_clip's --accum-freq). The features
    of every micro-batch are made without gradient, the loss and its gradients w.r.t. them are computed once
    over the whole global batch, then each micro-batch is made again and back-propagated from them: the
    step's loss and gradients are the unaccumulated step's, at the cost of one more forward pass. BatchNorm
    normalises over a micro-batch, not the rank's share, so a model with BatchNorm trains differently
    (docs/DESIGN.md §1). Must divide global_batch_size / world_size."""
    compile: bool = False
    """torch.compile the model's training forward and backward passes (the loss and its collectives stay
    eager); the first steps pay the compilation. Not with model.backbone=free, whose rows are gathered over
    the ranks inside its own autograd function."""


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
    teacher: str = ""
    """Select on these fixed embeddings instead of the bank (B3's teacher; dist_cl.plan.teacher): the output
    folder of dist-cl-extract-embeddings for a run on the same training set. Empty: the live bank."""


@dataclass
class EvalConfig:
    every_epochs: int = 5
    """Evaluate after every this many epochs (and at the end); 0 disables."""
    knn_k: int = 20
    """Neighbours of the held-out kNN classifier over training embeddings."""
    train_pairs: int = 100_000
    """Training pairs of the training-set metrics (train/full_batch_loss, train/retrieval_top1): all of them
    up to this many, a fixed random subset of this many beyond (N^2 similarities are computed in blocks)."""
    probe: bool = False
    """Also fit a linear probe on the image tower's features at each evaluation (``probe_top1``, the probe of
    dist-cl-evaluate): seconds on a few thousand images, minutes at ImageNet scale, so off by default."""
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


TOOL_OUTPUTS = Path("runs/tools")
"""Where the tools (tools/*.py) write by default, beside the run directories (runs/<run.name>); validation keeps
every run's default directory out of it."""


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


FREE_FORM = ("options", "backbone_kwargs", "text_cfg")
"""dict-valued fields whose keys belong to another library: merged one level deep, shown and flattened as one value,
not as a section of config keys."""


def flatten(tree: dict, prefix: str = "") -> dict:
    """A config tree as ``{dotted key: value}``; the free-form dicts stay values."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key not in FREE_FORM:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
