"""Fashion-MNIST (Xiao et al. 2017): 60,000 training and 10,000 test 28x28 grayscale images in 10 classes.

Read from the four IDX files (gzip'd or plain) that Debian's ``dataset-fashion-mnist`` installs. The
test files are the held-out split. Files of a valid format but another image shape or label range (another
data set under these names) are refused by what dist_cl.config.datasets declares, not trained on as
Fashion-MNIST. ``data.subset`` / ``data.heldout_subset`` keep a stratified sample of a split, fixed by
``data.split_seed`` (the same rows ``tools/make_shards.py --subset`` writes).
Images stay uint8 tensors and the SimCLR views are made on tensors: no PIL round trip per view.
"""

import gzip
from pathlib import Path

import numpy as np
import torch

from dist_cl.config import AugmentConfig, ConfigError
from dist_cl.config.datasets import DATASETS
from dist_cl.data.pairs import PairDataset
from dist_cl.data.transforms import eval_transform, simclr_transform

DEFAULT_PATH = "/usr/share/datasets/fashion-mnist"
INSTALL = "apt-get install -y dataset-fashion-mnist"
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "heldout": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST = DATASETS["fashion_mnist"]
UINT8 = 0x08
"""IDX type code of unsigned bytes, the only element type Fashion-MNIST uses."""


class IdxError(ConfigError):
    """An IDX file is missing, truncated or not the array expected; the message names the file and the fix."""


def find_file(directory: str | Path, stem: str) -> Path:
    """``<stem>.gz`` or ``<stem>`` under data.path; a missing file names the install command."""
    directory = Path(directory)
    for name in (f"{stem}.gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise IdxError(f"{directory / stem}[.gz] does not exist; install Fashion-MNIST with `{INSTALL}` "
                   f"(default data.path {DEFAULT_PATH}) or set data.path to the folder holding the IDX files")


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """The uint8 array of one IDX file: magic (0, 0, type, ndim), ndim big-endian uint32 sizes, then data."""
    path = Path(path)
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:  # EOFError: a gzip stream cut short
        raise IdxError(f"{path} cannot be read ({exc}): it is truncated or corrupt; reinstall it with "
                       f"`{INSTALL}`") from exc
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxError(f"{path} holds {len(data)} bytes, less than an IDX header of {header}: it is truncated; "
                       f"reinstall it with `{INSTALL}`")
    magic = tuple(data[:4])
    if magic != (0, 0, UINT8, ndim):
        raise IdxError(f"{path} starts with magic bytes {magic}, not (0, 0, {UINT8}, {ndim}) of a {ndim}-d uint8 IDX "
                       "array: it is not the file expected here")
    shape = tuple(int(s) for s in np.frombuffer(data, ">u4", ndim, 4))
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise IdxError(f"{path} declares shape {shape} ({expected} bytes of data) but holds {len(data) - header}: "
                       f"it is truncated or padded; reinstall it with `{INSTALL}`")
    return np.frombuffer(data, np.uint8, expected, header).reshape(shape)


def check_fashion_mnist(images: np.ndarray, labels: np.ndarray, image_file: Path, label_file: Path) -> None:
    """IdxError where valid IDX arrays are not Fashion-MNIST's: images of another size, labels past its classes."""
    height, width = FASHION_MNIST.image_shape
    if images.shape[1:] != (height, width):
        raise IdxError(f"{image_file} holds {images.shape[1]}x{images.shape[2]} images, not Fashion-MNIST's "
                       f"{height}x{width}: it is another data set; set data.path to Fashion-MNIST's IDX files "
                       f"(`{INSTALL}`), or write other images as shards (dist-cl-make-shards) and use data.name=shards")
    if len(labels) and labels.max() >= FASHION_MNIST.classes:
        raise IdxError(f"{label_file} holds labels up to {labels.max()}, not Fashion-MNIST's 0 to "
                       f"{FASHION_MNIST.classes - 1}: it is another data set; set data.path to Fashion-MNIST's IDX "
                       f"files (`{INSTALL}`)")


def stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted indices of ``size`` samples with the label proportions of ``labels`` (all of them for 0)."""
    n = len(labels)
    if size == 0 or size == n:
        return np.arange(n)
    if not 0 < size < n:
        raise ConfigError(f"a subset of {size} samples cannot be drawn from {n}; use 0 (all) up to {n}")
    from sklearn.model_selection import train_test_split

    chosen, _ = train_test_split(np.arange(n), train_size=size, random_state=seed, stratify=labels)
    return np.sort(chosen)


def fashion_mnist_split(path: str | Path, split: str, subset: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (n, 28, 28) and int64 labels of ``split``, ``subset`` of them stratified (0: all)."""
    image_stem, label_stem = FILES[split]
    image_file, label_file = find_file(path, image_stem), find_file(path, label_stem)
    images = read_idx(image_file, 3)
    labels = read_idx(label_file, 1).astype(np.int64)
    if len(images) != len(labels):
        raise IdxError(f"{image_stem} holds {len(images)} images but {label_stem} {len(labels)} labels under "
                       f"{path}; reinstall them with `{INSTALL}`")
    check_fashion_mnist(images, labels, image_file, label_file)
    key = "data.subset" if split == "train" else "data.heldout_subset"
    if subset > len(labels):
        raise ConfigError(f"{key}={subset} is more than the {len(labels)} {split} images; use at most "
                          f"{len(labels)} (0 keeps all)")
    keep = stratified_subset(labels, subset, seed)
    return images[keep], labels[keep]


class FashionMnistPairs(PairDataset):
    """Two SimCLR views of a uint8 (1, h, w) image tensor; ``clean`` is the resize + centre-crop eval view."""

    channels = FASHION_MNIST.channels

    def __init__(self, images: np.ndarray, labels: np.ndarray, augment: AugmentConfig, image_size: int, seed: int):
        super().__init__(seed)
        self.images = torch.from_numpy(np.ascontiguousarray(images))[:, None]
        self.labels = labels
        self.train_transform = simclr_transform(augment, image_size, self.channels, from_pil=False)
        self.eval_transform = eval_transform(image_size, self.channels, from_pil=False)

    def __len__(self) -> int:
        return len(self.images)

    def identity(self):
        yield from super().identity()
        yield self.images.numpy().tobytes()

    def load(self, index: int) -> torch.Tensor:
        return self.images[index]

    def raw(self, index: int) -> torch.Tensor:
        return self.images[index].float() / 255

    def augment(self, image: torch.Tensor) -> torch.Tensor:
        return self.train_transform(image)

    def clean(self, image: torch.Tensor) -> torch.Tensor:
        return self.eval_transform(image)
