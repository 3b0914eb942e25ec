"""Write indexed webdataset shards (tar + wids shardindex.json), the layouts dist_cl.data reads.

The command over it is ``dist-cl-make-shards`` (dist_cl.cli.make_shards). Sample i goes to shard
i // samples_per_shard under key %09d. Image shards (dist_cl.data.shards) are ``shard-000000.tar`` with
members .png/.jpg (image), .cls (label, where known) and .idx (i). Caption shards (dist_cl.data.captions)
are img2dataset's ``00000.tar`` with members .jpg/.png/.webp, .txt (caption), .json and .cls where known;
``index_captions`` indexes such shards that img2dataset wrote, leaving the tars as they are.
Resumable: each shard is written to a temporary name and renamed when complete, so a rerun with the same
arguments keeps finished shards and writes the rest. A finished output (it has shardindex.json) or one begun
with other arguments is only replaced with ``force``. Each shard gets an offsets table beside it
(``<shard>.offsets.npy``), so readers open it without parsing its tar headers.
"""

import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from dist_cl.data.captions import CAPTIONS, caption_table_dtype, caption_text
from dist_cl.data.shards import (
    IMAGE_EXTENSIONS,
    INDEX_KIND,
    INDEX_NAME,
    OFFSETS_COLUMNS,
    UNREADABLE_IMAGE,
    ShardError,
    offsets_path,
    read_index,
    sample_key,
    shard_name,
)

PARAMS_NAME = "make_shards.json"
SHARD_FILE = re.compile(r"(shard-)?\d+\.tar(\..*)?")
"""The files make_shards writes per shard (tar, offsets table, unfinished .tmp), in either layout."""
MEMBER_NAME = re.compile(r"((?:.*/)?[^./]+)\.([^/]+)")
"""A tar member's key and extension as webdataset splits them: at the first dot of the file name."""


class ShardWriteError(RuntimeError):
    """The output directory or the source cannot be used as asked; the message says how to proceed."""


class LabelError(ShardWriteError):
    """Labels that are not class ids (whole numbers from 0): NaN, strings, fractions; the message names
    the first such label. A NaN cast to an integer became -2^63, and training crashed at its first evaluation."""


def class_ids(labels: np.ndarray, source: Path) -> np.ndarray:
    """``labels`` as int64 class ids, or LabelError naming the first label that is not one."""
    def first(bad: np.ndarray) -> str:
        i = int(np.flatnonzero(bad)[0])
        return f"{source}: label {i} is {labels[i].item()!r}"

    if labels.dtype.kind in "USO":
        raise LabelError(f"{first(np.ones(len(labels), bool))}, a string; shards store integer class ids: map the "
                         "class names to 0..K-1 (keep the names in the order of their ids)")
    if labels.dtype.kind not in "biuf":
        raise LabelError(f"{source}: labels of dtype {labels.dtype}; shards store integer class ids")
    if labels.dtype.kind == "f":
        if not np.isfinite(labels).all():
            raise LabelError(f"{first(~np.isfinite(labels))}; every labelled sample needs a class id: label it or "
                             "leave it out")
        if (labels != np.round(labels)).any():
            raise LabelError(f"{first(labels != np.round(labels))}, not a whole number; class ids are integers")
    if (labels < 0).any():
        raise LabelError(f"{first(labels < 0)}; class ids count from 0")
    return labels.astype(np.int64)


@dataclass
class Source:
    """Random access to the samples being sharded: index -> (image bytes, extension, label or None), and for
    caption shards index -> the caption's members (``{"txt": ..., "json": ...}``)."""

    num_samples: int
    mode: str
    classes: list[str] | None
    read: Callable[[int], tuple[bytes, str, int | None]]
    captions: Callable[[int], dict[str, bytes]] | None = None


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def array_source(images: np.ndarray, labels: np.ndarray | None, classes: list[str] | None) -> Source:
    """uint8 images (n, h, w) or (n, h, w, 1|3), stored losslessly as PNG."""
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3)):
        raise ShardWriteError(
            f"images must be uint8 of shape (n, h, w) or (n, h, w, 1|3); got {images.dtype} {images.shape}"
        )
    if images.ndim == 4 and images.shape[3] == 1:
        images = images[..., 0]
    if labels is not None and len(labels) != len(images):
        raise ShardWriteError(f"{len(labels)} labels for {len(images)} images; they must match one to one")

    def read(i: int):
        return png_bytes(images[i]), "png", None if labels is None else int(labels[i])

    return Source(len(images), "L" if images.ndim == 3 else "RGB", classes, read)


def digits_source(split: str, holdout_fraction: float, split_seed: int) -> Source:
    """The train or held-out split of dist_cl's digits, pixels 0..16 scaled to 0..255."""
    from dist_cl.data.digits import digits_split

    images, labels = digits_split(holdout_fraction, split_seed, split)
    pixels = np.rint(images[:, 0] * 255).astype(np.uint8)
    return array_source(pixels, labels, [str(d) for d in range(10)])


def fashion_mnist_source(path: Path, split: str, subset: int, split_seed: int) -> Source:
    """Fashion-MNIST's train (60k) or test (10k) IDX files; ``subset`` keeps the rows data.subset keeps."""
    from dist_cl.data.fashion_mnist import CLASSES, fashion_mnist_split

    images, labels = fashion_mnist_split(path, split, subset, split_seed)
    return array_source(images, labels, CLASSES)


def npz_source(path: Path) -> Source:
    if not path.is_file():
        raise ShardWriteError(f"--input {path} does not exist; pass an .npz with 'images' (and optional 'labels')")
    with np.load(path) as data:
        if "images" not in data:
            raise ShardWriteError(f"{path} has no 'images' array (it has {', '.join(data.files)})")
        labels = class_ids(data["labels"], path) if "labels" in data else None
        return array_source(data["images"], labels, None)


def folder_source(root: Path, mode: str) -> Source:
    """One sub-folder per class (sorted names give label ids); image files are copied byte for byte."""
    if not root.is_dir():
        raise ShardWriteError(f"--input {root} is not a directory of class sub-folders")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [
        (path, label)
        for label, name in enumerate(classes)
        for path in sorted((root / name).iterdir())
        if path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
    ]
    if not files:
        raise ShardWriteError(f"--input {root} has no images ({', '.join(IMAGE_EXTENSIONS)}) in class sub-folders")

    def read(i: int):
        path, label = files[i]
        return path.read_bytes(), path.suffix.lower().lstrip("."), label

    return Source(len(files), mode, classes, read)


def caption_shard_name(shard: int) -> str:
    return f"{shard:05d}.tar"


def caption_folder_source(root: Path, mode: str) -> Source:
    """Every image under ``root`` (sub-folders included, sorted by path) with its caption beside it:
    ``a/cat.jpg`` + ``a/cat.txt``, as img2dataset's ``--output_format files`` leaves them. ``a/cat.json``
    (metadata) and ``a/cat.cls`` (a class id) are copied where present; without a .json one is written with
    the caption and the source path. Images are copied byte for byte; captions are checked on the way."""
    if not root.is_dir():
        raise ShardWriteError(f"--input {root} is not a directory of images with captions beside them")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    if not files:
        raise ShardWriteError(f"--input {root} has no images ({', '.join(IMAGE_EXTENSIONS)})")
    with_cls = [path.with_suffix(".cls").is_file() for path in files]
    if any(with_cls) and not all(with_cls):
        raise ShardWriteError(f"{files[with_cls.index(False)]} has no .cls beside it while other images do: "
                              "label every image or none")

    def read(i: int):
        path = files[i]
        label = path.with_suffix(".cls").read_text().strip() if with_cls[i] else None
        try:
            return path.read_bytes(), path.suffix.lower().lstrip("."), None if label is None else int(label)
        except ValueError as exc:
            raise ShardWriteError(f"{path.with_suffix('.cls')} holds {label!r}, not an integer class id") from exc

    def captions(i: int):
        text, meta = files[i].with_suffix(".txt"), files[i].with_suffix(".json")
        caption = caption_text(text.read_bytes() if text.is_file() else None, f"caption {text} of image {files[i]}")
        return {"txt": caption.encode(), "json": meta.read_bytes() if meta.is_file() else json.dumps(
            {"caption": caption, "source": str(files[i].relative_to(root))}).encode()}

    return Source(len(files), mode, None, read, captions)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, source: Source, indices: range, progress: tqdm) -> None:
    """Write to ``<name>.tmp`` and rename, so a shard under its final name is always complete."""
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in indices:
            data, ext, label = source.read(i)
            members = {ext: data, **(source.captions(i) if source.captions else {})}
            if label is not None:
                members["cls"] = str(label).encode()
            if source.captions is None:  # image shards carry their index, checked on every read
                members["idx"] = str(i).encode()
            for name, payload in members.items():
                _add(tar, f"{sample_key(i)}.{name}", payload)
            progress.update(1)
    os.replace(tmp, path)


def save_table(path: Path, table: np.ndarray) -> None:
    """Write ``path``'s offsets table beside it, complete or not at all."""
    tmp = offsets_path(path).with_name(offsets_path(path).name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, table)
    os.replace(tmp, offsets_path(path))


def describe_shard(path: Path) -> dict:
    """The shard's wids index entry, read back from the file (so kept shards are described the same way);
    writes the shard's offsets table beside it on the way (dist_cl.data.shards.OFFSETS_COLUMNS)."""
    labels, rows = [], {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            row = rows.setdefault(key, [0, 0, 0, -1, 0, 0, 0])
            if ext == "idx":
                row[5:7] = member.offset_data, member.size
            elif ext == "cls":
                row[3:5] = member.offset_data, member.size
                labels.append(int(tar.extractfile(member).read()))
            else:
                row[0:3] = member.offset_data, member.size, IMAGE_EXTENSIONS.index(ext)
    table = np.array(list(rows.values()), dtype=np.int64).reshape(-1, len(OFFSETS_COLUMNS))
    save_table(path, table)
    entry = {
        "url": path.name,
        "nsamples": len(table),
        "filesize": path.stat().st_size,
        "md5sum": hashlib.md5(path.read_bytes()).hexdigest(),
    }
    if labels:
        entry["labels"] = labels
    return entry


IMAGE_HEADER_BYTES = 1 << 16
"""What indexing reads of an image to identify it; the whole member only where its header runs on (JPEG's
EXIF segments may)."""


def identify_image(read: Callable[[tuple[int, int]], bytes], offset: int, size: int, where: str) -> None:
    """Pillow identifies the image member at ``offset`` from its header, without decoding it: bytes that are
    no image (a failed download saved as one) or claim a decompression bomb stop indexing, not training.
    Damage past the header is named when the sample is read."""
    for length in dict.fromkeys((min(size, IMAGE_HEADER_BYTES), size)):
        try:
            with Image.open(io.BytesIO(read((offset, length)))):
                return
        except (*UNREADABLE_IMAGE, ValueError) as exc:
            error = exc
    raise ShardError(f"{where}: its image is not one Pillow can identify ({error}); delete the sample's members "
                     "from the tar or download it again, then index again") from error


def describe_caption_shard(path: Path) -> dict:
    """A caption shard's wids index entry (no md5sum: it would read every byte of every tar of a web-scale
    set, and the reader checks sizes; images are read only as far as their headers); writes its offsets table
    (dist_cl.data.captions) on the way.

    Members are grouped by key, samples kept in tar order. Every caption is read and checked here, so a
    missing, empty or undecodable one stops indexing rather than training; so does an image whose header Pillow
    cannot identify. Members other than the image, .txt, .json and .cls are left where they are, unread.
    """
    samples: dict[str, dict[str, tuple[int, ...]]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            match = MEMBER_NAME.fullmatch(member.name)
            if match is None:
                raise ShardError(f"shard {path} member {member.name!r} has no extension; webdataset names members "
                                 "KEY.EXT")
            key, ext = match.group(1), match.group(2).lower()
            members = samples.setdefault(key, {})
            if ext in members or (ext in IMAGE_EXTENSIONS and "image" in members):
                raise ShardError(f"shard {path} key {key}: a second {ext if ext in members else 'image'} member "
                                 f"({member.name}); a sample holds one of each")
            if ext in IMAGE_EXTENSIONS:
                members["image"] = (member.offset_data, member.size, IMAGE_EXTENSIONS.index(ext))
            else:
                members[ext] = (member.offset_data, member.size)
    table = np.zeros(len(samples), caption_table_dtype(max((len(key.encode()) for key in samples), default=1)))
    labels = []
    with open(path, "rb") as f:
        def read(offset_size: tuple[int, int] | None) -> bytes | None:
            if offset_size is None:
                return None
            f.seek(offset_size[0])
            return f.read(offset_size[1])

        for i, (key, members) in enumerate(samples.items()):
            where = f"shard {path} key {key}"
            if "image" not in members:
                raise ShardError(f"{where}: no image member (one of {', '.join(IMAGE_EXTENSIONS)}); every caption "
                                 "needs its image")
            caption_text(read(members.get("txt")), where)
            identify_image(read, *members["image"][:2], where)
            if "cls" in members:
                try:
                    labels.append(int(read(members["cls"])))
                except ValueError as exc:
                    raise ShardError(f"{where}: its .cls is not an integer class id ({exc})") from exc
            table[i] = (key.encode(), *members["image"], *members["txt"], *members.get("json", (-1, 0)))
    if 0 < len(labels) < len(table):
        raise ShardError(f"shard {path}: {len(labels)} of {len(table)} samples have a .cls label; label all or none")
    save_table(path, table)
    entry = {"url": path.name, "nsamples": len(table), "filesize": path.stat().st_size}
    if labels:
        entry["labels"] = labels
    return entry


def write_index(out: Path, shardlist: list[dict], meta: dict) -> dict:
    """Write ``out/shardindex.json`` (wids' shard index, with dist_cl's ``meta``), complete or not at all."""
    index = {"__kind__": INDEX_KIND, "wids_version": 1, "name": out.name, "shardlist": shardlist, "dist_cl": meta}
    tmp = out / (INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps(index))
    os.replace(tmp, out / INDEX_NAME)
    return index


def index_captions(directory: Path, mode: str = "RGB") -> dict:
    """Index img2dataset's webdataset output in ``directory`` (``00000.tar`` ...) where it lies: an offsets
    table beside each tar and ``shardindex.json``; the tars, parquet and stats files are not touched. A tar
    with no samples (every download of the shard failed) has no entry, and is named in ``empty_shards``.
    Rerunning replaces the tables and index, e.g. after more shards were downloaded."""
    if not directory.is_dir():
        raise ShardWriteError(f"--index-captions {directory} is not a directory")
    if (directory / INDEX_NAME).is_file() and read_index(directory)["dist_cl"].get("content") != CAPTIONS:
        raise ShardWriteError(f"{directory} holds image shards ({INDEX_NAME}), not img2dataset output")
    tars = sorted(directory.glob("*.tar"))
    if not tars:
        raise ShardWriteError(f"{directory} has no .tar shards; point --index-captions at img2dataset's "
                              "--output_folder, written with --output_format webdataset")
    entries = [describe_caption_shard(path) for path in tqdm(tars, unit="shard", desc=f"index {directory}")]
    empty = [entry["url"] for entry in entries if entry["nsamples"] == 0]
    shardlist = [entry for entry in entries if entry["nsamples"] > 0]
    if not shardlist:
        raise ShardWriteError(f"every shard in {directory} is empty: img2dataset downloaded no image")
    return write_index(directory, shardlist, {"mode": mode, "classes": None, "content": CAPTIONS,
                                              "empty_shards": empty})


def prepare_output(out: Path, params: dict, force: bool) -> None:
    """Create ``out``, or resume into it, or clear it with --force; refuse anything else."""
    params_path = out / PARAMS_NAME
    if out.exists() and not out.is_dir():
        raise ShardWriteError(f"--out {out} is a file; choose a directory")
    if force and out.is_dir():
        for path in out.iterdir():
            if path.name in (INDEX_NAME, PARAMS_NAME) or SHARD_FILE.fullmatch(path.name):
                path.unlink()
    elif (out / INDEX_NAME).exists():
        raise ShardWriteError(f"{out} already holds a finished shard set ({INDEX_NAME}); pass --force to overwrite it")
    elif params_path.exists():
        previous = json.loads(params_path.read_text())
        if previous != params:
            raise ShardWriteError(
                f"{out} holds an unfinished run with other arguments ({previous}); rerun with those to resume, "
                "or pass --force to start over"
            )
    elif out.is_dir() and any(out.iterdir()):
        raise ShardWriteError(
            f"{out} is not empty and was not written by make_shards; choose another --out or pass --force"
        )
    out.mkdir(parents=True, exist_ok=True)
    params_path.write_text(json.dumps(params, indent=2))


def make_shards(source: Source, out: Path, samples_per_shard: int, params: dict, force: bool = False) -> dict:
    """Write (or finish writing) the shards and the index; returns the index."""
    prepare_output(out, params, force)
    num_shards = -(-source.num_samples // samples_per_shard)
    captions = source.captions is not None
    shards = [out / (caption_shard_name(k) if captions else shard_name(k)) for k in range(num_shards)]
    done = sum(
        min(samples_per_shard, source.num_samples - k * samples_per_shard) for k, p in enumerate(shards) if p.exists()
    )
    with tqdm(total=source.num_samples, initial=done, unit="img", desc=f"shards -> {out}") as progress:
        for k, path in enumerate(shards):
            if not path.exists():
                start = k * samples_per_shard
                write_shard(path, source, range(start, min(start + samples_per_shard, source.num_samples)), progress)
    describe = describe_caption_shard if captions else describe_shard
    return write_index(out, [describe(path) for path in shards], {
        "mode": source.mode, "classes": source.classes, "made_by": params, **({"content": CAPTIONS} if captions else {})
    })
