"""Indexed webdataset shards read by sample index, so batch plans (lists of indices) can be served from tar files.

Layout (written by tools/make_shards.py): ``shard-000000.tar ...`` plus ``shardindex.json``, a wids shard
index (``wids-shard-index-v1``: url, nsamples, filesize, md5sum per shard) extended with each shard's labels
and a ``dist_cl`` section (image mode, class names). Sample i lives in shard k at position i - start_k
under key ``%09d % i`` with members ``.png``/``.jpg`` (image), ``.cls`` (label) and ``.idx`` (i itself,
checked on every read). A data.path may hold ``train/`` and ``heldout/`` shard directories, or be one
shard directory used as the training split.

Beside every shard make_shards writes ``<shard>.offsets.npy`` (OFFSETS_COLUMNS): where each sample's
members lie in the tar, so opening a shard is a memory map and a small table, not a parse of its tar
headers, which every DataLoader worker would repeat for every shard, every epoch (costs: docs/BENCHMARKS.md,
"Offsets tables"). A table that does not fit its shard is an error, and a stale one cannot pass the
``.idx`` check of every read. Shards without one (written by other tools)
are opened with wids' memory-mapped ``IndexedTarSamples`` rather than ``wids.ShardListDataset``: the latter
prints on construction and writes a ``.lock`` file beside every shard it opens, which fails on read-only
data sets. wids itself is imported lazily because importing it creates ``$TMP/_wids_cache``.
"""

import io
import json
import mmap
import os
import resource
import struct
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from dist_cl.config import AugmentConfig
from dist_cl.data.pairs import PairDataset
from dist_cl.data.transforms import eval_transform, simclr_transform

INDEX_NAME = "shardindex.json"
INDEX_KIND = "wids-shard-index-v1"
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp")
MODES = {"L": 1, "RGB": 3}
UNREADABLE_IMAGE = (OSError, SyntaxError, Image.DecompressionBombError)
"""What Pillow raises for bytes it cannot read as an image: unidentified or truncated data (OSError, of which
UnidentifiedImageError is one), a broken header (SyntaxError), or more pixels than its bomb limit."""
REPAIR = "delete it and shardindex.json, then rerun tools/make_shards.py with the same arguments to rewrite it"
OFFSETS_SUFFIX = ".offsets.npy"
OFFSETS_COLUMNS = ("image_offset", "image_size", "image_extension", "cls_offset", "cls_size", "idx_offset", "idx_size")
"""int64 columns of a shard's offsets table, one row per sample: byte offsets and sizes of its members in
the tar, the image's extension as a position in IMAGE_EXTENSIONS; cls_offset is -1 for unlabelled samples."""


class ShardError(RuntimeError):
    """A shard, its index or one of its members is missing, truncated, corrupt or out of order."""


def shard_name(shard: int) -> str:
    return f"shard-{shard:06d}.tar"


def sample_key(index: int) -> str:
    return f"{index:09d}"


def read_index(directory: str | Path) -> dict:
    """Load and check ``shardindex.json``: shard urls resolved against the directory, starts added."""
    directory = Path(directory)
    path = directory / INDEX_NAME
    if not path.is_file():
        raise ShardError(f"{path} does not exist; write shards with tools/make_shards.py --out {directory}")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ShardError(f"{path} is not valid JSON ({exc}); rerun tools/make_shards.py --force") from exc
    if index.get("__kind__") != INDEX_KIND or not isinstance(index.get("shardlist"), list):
        raise ShardError(f"{path} is not a {INDEX_KIND} shard index; rerun tools/make_shards.py --force")
    if not index["shardlist"]:
        raise ShardError(f"{path} lists no shards; the source was empty")
    start = 0
    for shard in index["shardlist"]:
        if not isinstance(shard.get("nsamples"), int) or shard["nsamples"] <= 0 or "url" not in shard:
            raise ShardError(f"{path}: entry {shard.get('url')!r} needs a url and a positive integer nsamples")
        _check_labels(path, shard)
        shard["path"] = str(directory / shard["url"])
        shard["start"] = start
        start += shard["nsamples"]
    meta = index.setdefault("dist_cl", {})
    meta.setdefault("mode", "RGB")
    if meta["mode"] not in MODES:
        raise ShardError(f"{path}: image mode {meta['mode']!r} is not one of {', '.join(MODES)}")
    index["num_samples"] = start
    return index


def _check_labels(path: Path, shard: dict) -> None:
    """A shard's label list, where it has one, holds a non-negative integer label for each of its samples: the
    kNN evaluation reads sample i's label at position i, and a short list would fail there, after training."""
    if "labels" not in shard:
        return
    labels = shard["labels"]
    if not isinstance(labels, list) or len(labels) != shard["nsamples"]:
        count = f"{len(labels)} labels" if isinstance(labels, list) else f"labels of type {type(labels).__name__}"
        raise ShardError(f"{path}: entry {shard['url']!r} has {count} for its {shard['nsamples']} samples; {REPAIR}")
    if not all(isinstance(label, int) and label >= 0 for label in labels):
        raise ShardError(f"{path}: entry {shard['url']!r} has labels that are not non-negative integers; {REPAIR}")


def offsets_path(shard_path: str | Path) -> Path:
    return Path(str(shard_path) + OFFSETS_SUFFIX)


class OffsetTableShard:
    """One shard read through its offsets table: samples are slices of a memory map, as wids gives them.
    Subclasses read tables of other columns (``fits``, ``__getitem__``)."""

    repair = REPAIR

    def __init__(self, path: str, first_index: int, nsamples: int):
        table_path = offsets_path(path)
        try:
            self.table = np.load(table_path)
        except (OSError, ValueError) as exc:
            raise ShardError(f"offsets table {table_path} cannot be read ({exc}); {self.repair}") from exc
        size = os.path.getsize(path)
        if not self.fits(nsamples, size):
            raise ShardError(f"offsets table {table_path} does not describe shard {path} ({nsamples} samples, "
                             f"{size} bytes); {self.repair}")
        self.file = open(path, "rb")
        self.map = mmap.mmap(self.file.fileno(), 0, access=mmap.ACCESS_READ)
        self.first_index = first_index

    def fits(self, nsamples: int, size: int) -> bool:
        """The table has a row per sample and every member it points at lies inside the shard's bytes."""
        fits = self.table.shape == (nsamples, len(OFFSETS_COLUMNS)) and self.table.dtype == np.int64
        return fits and (self.table[:, [0, 3, 5]] + self.table[:, [1, 4, 6]]).max(initial=0) <= size

    def __len__(self) -> int:
        return len(self.table)

    def _member(self, offset: int, size: int) -> io.BytesIO:
        return io.BytesIO(self.map[offset : offset + size])

    def __getitem__(self, position: int) -> dict:
        image_offset, image_size, extension, cls_offset, cls_size, idx_offset, idx_size = self.table[position].tolist()
        sample = {"__key__": sample_key(self.first_index + position),
                  f".{IMAGE_EXTENSIONS[extension]}": self._member(image_offset, image_size),
                  ".idx": self._member(idx_offset, idx_size)}
        if cls_offset >= 0:
            sample[".cls"] = self._member(cls_offset, cls_size)
        return sample

    def close(self) -> None:
        self.map.close()
        self.file.close()


def split_dir(path: str | Path, split: str) -> Path | None:
    """The shard directory of ``train`` or ``heldout`` under data.path; None where there is no held-out split."""
    path = Path(path)
    if (path / split / INDEX_NAME).is_file():
        return path / split
    if split == "train":
        if (path / INDEX_NAME).is_file():
            return path
        raise ShardError(
            f"data.path={str(path)!r} holds neither {INDEX_NAME} nor train/{INDEX_NAME}; "
            f"write shards with tools/make_shards.py --out {path}/train"
        )
    return None


def check_shards(path: str | Path) -> dict[str, int]:
    """Up-front check for --dry-run: every split's index is valid and its shards exist at full size.

    Returns the number of samples per split. Member-level corruption is only found when a sample is read.
    """
    counts = {}
    for split in ("train", "heldout"):
        directory = split_dir(path, split)
        if directory is None:
            continue
        index = read_index(directory)
        for shard in index["shardlist"]:
            _check_file(shard)
        counts[split] = index["num_samples"]
    return counts


def _check_file(shard: dict) -> None:
    path = shard["path"]
    if not os.path.isfile(path):
        raise ShardError(f"shard {path} is missing; rerun tools/make_shards.py with the same arguments to write it")
    size = os.path.getsize(path)
    if "filesize" in shard and size != shard["filesize"]:
        raise ShardError(
            f"shard {path} has {size} bytes, the index says {shard['filesize']}: it is truncated; {REPAIR}"
        )


def default_open_shards() -> int:
    """Shards one process may keep open: each holds two descriptors (file and mmap); use half the limit."""
    return max(1, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4)


def index_labels(index: dict) -> np.ndarray | None:
    """Labels of all samples in index order, or None when any shard was written without labels."""
    if any("labels" not in shard for shard in index["shardlist"]):
        return None
    return np.concatenate([np.asarray(shard["labels"], dtype=np.int64) for shard in index["shardlist"]])


class ShardPairs(PairDataset):
    """Two SimCLR views of sample i read from indexed shards; ``clean`` is the evaluation view.

    Each process (DataLoader worker, rank) opens shards lazily and keeps them memory-mapped. A plan visits
    shards in random order, so every shard should stay open: reopening one maps it and loads its offsets
    table again, or re-parses all its tar headers where it has no table (docs/BENCHMARKS.md).
    ``open_shards`` (default: what the descriptor limit allows) bounds them, least recently used closed first.
    Subclasses read other shard contents (the index's ``dist_cl.content``) by opening and decoding shards
    their own way (``_open_shard``, ``load``).
    """

    content = "images"
    repair = REPAIR

    def __init__(
        self, directory: str | Path, augment: AugmentConfig, image_size: int, seed: int, open_shards: int = 0
    ):
        super().__init__(seed)
        self.directory = Path(directory)
        index = read_index(self.directory)
        content = index["dist_cl"].get("content", "images")
        if content != self.content:
            raise ShardError(f"{self.directory} holds shards of {content}; {type(self).__name__} reads shards of "
                             f"{self.content}")
        self.shards = index["shardlist"]
        self.starts = np.array([shard["start"] for shard in self.shards])
        self.num_samples = index["num_samples"]
        self.mode = index["dist_cl"]["mode"]
        self.channels = MODES[self.mode]
        self.classes = index["dist_cl"].get("classes")
        self.labels = index_labels(index)
        self.open_shards = open_shards or default_open_shards()
        self.train_transform = simclr_transform(augment, image_size, self.channels)
        self.eval_transform = eval_transform(image_size, self.channels)
        self._open: OrderedDict = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self.num_samples

    def identity(self):
        yield from super().identity()
        yield json.dumps([(shard["url"], shard["nsamples"], shard.get("filesize"), shard.get("md5sum"))
                          for shard in self.shards]).encode()

    def __getstate__(self) -> dict:
        # Open shards (file handles, mmaps) belong to the process that opened them; workers open their own.
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state

    def _shard(self, k: int):
        if self._pid != os.getpid():  # a forked worker must not share the parent's file handles
            self._open, self._pid = OrderedDict(), os.getpid()
        if k in self._open:
            self._open.move_to_end(k)
            return self._open[k]
        self._open[k] = self._open_shard(self.shards[k])
        if len(self._open) > self.open_shards:
            self._open.popitem(last=False)[1].close()
        return self._open[k]

    def _open_shard(self, shard: dict):
        _check_file(shard)
        if offsets_path(shard["path"]).is_file():
            return OffsetTableShard(shard["path"], shard["start"], shard["nsamples"])
        from wids.wids import IndexedTarSamples

        try:
            samples = IndexedTarSamples(path=shard["path"])
        # wids raises these on a malformed tar header and asserts on member names without an extension.
        except (OSError, ValueError, UnicodeDecodeError, struct.error, AssertionError) as exc:
            raise ShardError(f"shard {shard['path']} cannot be indexed as a tar file ({exc!r}); {REPAIR}") from exc
        if len(samples) != shard["nsamples"]:
            raise ShardError(
                f"shard {shard['path']} holds {len(samples)} samples, the index says {shard['nsamples']}; {REPAIR}"
            )
        return samples

    def _sample(self, index: int) -> tuple[str, dict]:
        """Sample ``index`` as (its shard's path, its members as wids gives them)."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample index {index} is out of range for {self.num_samples} samples in {self.directory}")
        k = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.shards[k]["path"], self._shard(k)[index - self.shards[k]["start"]]

    def load(self, index: int) -> Image.Image:
        path, sample = self._sample(index)
        key = sample["__key__"]
        try:
            stored = int(sample[".idx"].read())
        except KeyError as exc:
            raise ShardError(f"shard {path} member {key}: no .idx member; {REPAIR}") from exc
        except ValueError as exc:
            raise ShardError(f"shard {path} member {key}.idx is not an integer; {REPAIR}") from exc
        if stored != index:
            raise ShardError(
                f"shard {path} member {key}.idx holds index {stored} at position {index}: indices must be dense "
                f"0..{self.num_samples - 1} in order (out of range, duplicated or reordered); {REPAIR}"
            )
        return self._image(path, sample)

    def _image(self, path: str, sample: dict) -> Image.Image:
        key = sample["__key__"]
        ext = next((e for e in IMAGE_EXTENSIONS if f".{e}" in sample), None)
        if ext is None:
            raise ShardError(f"shard {path} member {key}: no image member (one of {', '.join(IMAGE_EXTENSIONS)})")
        try:
            image = Image.open(sample[f".{ext}"])
            image.load()
        except UNREADABLE_IMAGE as exc:
            raise ShardError(f"shard {path} member {key}.{ext} cannot be decoded ({exc}); {self.repair}") from exc
        return image if image.mode == self.mode else image.convert(self.mode)

    def raw(self, index: int) -> torch.Tensor:
        # the SimCLR transform takes float tensors in [0, 1] as it takes PIL images
        return v2.functional.pil_to_tensor(self.load(index)).float() / 255

    def augment(self, image: Image.Image):
        return self.train_transform(image)

    def clean(self, image: Image.Image):
        return self.eval_transform(image)
