"""Image–caption pairs read by sample index from tar shards in img2dataset's layout, as open_clip reads them.

Layout: ``00000.tar, 00001.tar, ...`` whose samples are a key's members ``KEY.jpg|png|webp`` (the image),
``KEY.txt`` (the caption, UTF-8) and optionally ``KEY.json`` (metadata) and ``KEY.cls`` (a class id). Keys
are whatever the tar holds: img2dataset numbers them by shard and row and leaves out the rows it could not
download, so sample i is the i-th key in shard-name order, then tar order, not a name computed from i.

The tars are read as they are. Beside each goes ``<shard>.offsets.npy``, a table of where each sample's
members lie (CAPTION_TABLE_FIELDS), and beside them all ``shardindex.json``, the wids shard index with
``dist_cl.content = "captions"``; ``dist-cl-make-shards --index-captions DIR`` writes both for an existing
img2dataset output (dist_cl.data.shard_writer.index_captions) without touching its tars.

A caption that is missing, empty or not UTF-8 is a CaptionError naming the shard and the key, both when the
shards are indexed and when the sample is read: a pair without its text cannot be trained on, and skipping
it would shift every later index.
"""

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dist_cl.config import AugmentConfig
from dist_cl.data.pairs import sample_rng
from dist_cl.data.shards import IMAGE_EXTENSIONS, OffsetTableShard, ShardError, ShardPairs
from dist_cl.data.tokenizer import CaptionTokenizer

CAPTIONS = "captions"
"""The index's ``dist_cl.content`` for captioned shards."""
CAPTION_TABLE_FIELDS = ("image_offset", "image_size", "image_extension", "text_offset", "text_size",
                        "json_offset", "json_size")
"""int64 fields of a caption shard's offsets table after its ``key`` (bytes): byte offsets and sizes of a
sample's members in the tar, the image's extension as a position in IMAGE_EXTENSIONS; json_offset is -1
where the sample has no ``.json``."""
REINDEX = "rerun dist-cl-make-shards --index-captions on the shard folder"


class CaptionError(ShardError):
    """A caption that is missing, empty or not UTF-8 text."""


def caption_table_dtype(key_length: int) -> np.dtype:
    return np.dtype([("key", f"S{max(1, key_length)}")] + [(name, "<i8") for name in CAPTION_TABLE_FIELDS])


def caption_text(data: bytes | None, where: str) -> str:
    """The caption stored as ``data``, or CaptionError naming ``where`` (shard and key, or source file)."""
    if data is None:
        raise CaptionError(f"{where}: no caption (.txt member); every image needs one")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CaptionError(f"{where}: the caption is not UTF-8 text ({exc}); re-encode it as UTF-8") from exc
    if not text.strip():
        raise CaptionError(f"{where}: the caption is empty; write one, or leave the image out of the data set")
    return text.strip()


class CaptionShard(OffsetTableShard):
    """One caption shard read through its offsets table (CAPTION_TABLE_FIELDS): slices of a memory map."""

    repair = REINDEX

    def fits(self, nsamples: int, size: int) -> bool:
        if (self.table.dtype.names or ())[1:] != CAPTION_TABLE_FIELDS or self.table.shape != (nsamples,):
            return False
        ends = (self.table[f"{member}_offset"] + self.table[f"{member}_size"] for member in ("image", "text", "json"))
        return max(end.max(initial=0) for end in ends) <= size

    def __getitem__(self, position: int) -> dict:
        row = self.table[position]
        sample = {"__key__": row["key"].decode(),
                  f".{IMAGE_EXTENSIONS[row['image_extension']]}": self._member(row["image_offset"], row["image_size"]),
                  ".txt": self._member(row["text_offset"], row["text_size"])}
        if row["json_offset"] >= 0:
            sample[".json"] = self._member(row["json_offset"], row["json_size"])
        return sample


class CaptionPairs(ShardPairs):
    """Sample i as (augmented image, its caption's token ids, i): the pair contract of PairDataset, with the
    caption in place of the second view.

    The image is augmented as ShardPairs augments a view (seeded by run seed, epoch and index); the tokens
    are the caption's alone, the same every epoch. ``clean_item`` and ``raw`` give the image, as for
    image shards; ``caption(i)`` and ``tokens(i)`` give the text.
    """

    content = CAPTIONS
    repair = REINDEX

    def __init__(self, directory: str | Path, augment: AugmentConfig, image_size: int, seed: int,
                 tokenizer: CaptionTokenizer | None = None, open_shards: int = 0):
        super().__init__(directory, augment, image_size, seed, open_shards)
        self.tokenizer = tokenizer or CaptionTokenizer()

    def _open_shard(self, shard: dict) -> CaptionShard:
        if not os.path.isfile(shard["path"]) or os.path.getsize(shard["path"]) != shard.get("filesize"):
            raise ShardError(f"caption shard {shard['path']} is missing or not the size the index says "
                             f"({shard.get('filesize')} bytes): it changed since it was indexed; {REINDEX}")
        return CaptionShard(shard["path"], shard["start"], shard["nsamples"])

    def load(self, index: int) -> Image.Image:
        return self._image(*self._sample(index))

    def caption(self, index: int) -> str:
        return self._caption(*self._sample(index))

    def _caption(self, path: str, sample: dict) -> str:
        return caption_text(sample[".txt"].read(), f"shard {path} key {sample['__key__']}")

    def tokens(self, index: int) -> torch.Tensor:
        return self.tokenizer(self.caption(index))

    def clean_pair(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The clean image and its caption's tokens."""
        return self.clean_item(index), self.tokens(index)

    def __getitem__(self, index: int):
        path, sample = self._sample(index)
        caption = self._caption(path, sample)
        image = self._image(path, sample)
        with sample_rng(self.seed, self.epoch, index):
            view = self.augment(image)
        return view, self.tokenizer(caption), index
