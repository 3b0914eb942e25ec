"""Captioned shards in img2dataset's layout: written from a folder, indexed where img2dataset left them, read by
index exactly as a sequential tar reader sees them, tokenised as open_clip tokenises, and every bad caption or
image a named error."""

import hashlib
import io
import json
import pickle
import socket
import tarfile
import zlib
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image, ImageDraw

from dist_cl.cli import make_shards
from dist_cl.config import AugmentConfig
from dist_cl.data import shard_writer
from dist_cl.data.captions import CaptionError, CaptionPairs, CaptionShard
from dist_cl.data.shards import INDEX_NAME, ShardError, ShardPairs, offsets_path, read_index
from dist_cl.data.tokenizer import CaptionTokenizer, TokenizerError

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220)}
SHAPES = ("circle", "square", "triangle")


def shape_image(shape: str, colour: str, size: int = 24) -> Image.Image:
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    box = (4, 4, size - 4, size - 4)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(size // 2, 4), (size - 4, size - 4), (4, size - 4)], fill=COLOURS[colour])
    return image


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def captioned_folder(root: Path) -> list[str]:
    """Nine images, PNG and JPEG, in two sub-folders, each with its caption beside it; returns the captions
    in the writer's order (sorted paths)."""
    captions = {}
    for i, (shape, colour) in enumerate((s, c) for s in SHAPES for c in COLOURS):
        path = root / ("shapes" if i % 2 else "more") / f"{shape}_{colour}.{'png' if i % 3 else 'jpg'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        shape_image(shape, colour).save(path)
        path.with_suffix(".txt").write_text(f"a {colour} {shape}\n")
        captions[path] = f"a {colour} {shape}"
    return [captions[path] for path in sorted(captions)]


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def img2dataset_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """A tar as img2dataset's webdataset writer makes it: per key its members in sorted extension order,
    in tarfile's default (PAX) format."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext in sorted(members):
                add_member(tar, f"{key}.{ext}", members[ext])


def img2dataset_sample(key: str, shape: str, colour: str, caption: bytes | None = None) -> tuple[str, dict]:
    caption = f"a {colour} {shape}".encode() if caption is None else caption
    meta = {"url": f"http://example.com/{key}.jpg", "key": key, "status": "success", "caption": caption.decode(
        errors="replace"), "width": 24, "height": 24}
    return key, {"jpg": encoded(shape_image(shape, colour), "JPEG"), "txt": caption,
                 "json": json.dumps(meta, indent=4).encode()}


def img2dataset_output(root: Path) -> Path:
    """img2dataset's --output_format webdataset folder: 00000.tar (keys 000000000.. with 000000002 missing, a
    failed download), 00001.tar with no sample at all, and the parquet and stats files beside them."""
    root.mkdir()
    img2dataset_tar(root / "00000.tar", [img2dataset_sample("000000000", "circle", "red"),
                                         img2dataset_sample("000000001", "square", "green"),
                                         img2dataset_sample("000000003", "triangle", "blue")])
    img2dataset_tar(root / "00001.tar", [])
    for shard in ("00000", "00001"):
        (root / f"{shard}.parquet").write_bytes(b"PAR1 not read by dist_cl PAR1")
        (root / f"{shard}_stats.json").write_text(json.dumps({"count": 4, "successes": 3}))
    return root


def tree_digest(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())}


def sequential_samples(directory: Path) -> list[dict[str, bytes]]:
    """Every sample of the indexed shards as a sequential tar reader groups them: members by key, in order."""
    samples = []
    for shard in read_index(directory)["shardlist"]:
        grouped: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard["path"]) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                grouped.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
        samples += grouped.values()
    return samples


def dataset(directory: Path, **kwargs) -> CaptionPairs:
    return CaptionPairs(directory, AugmentConfig(), image_size=16, seed=0, **kwargs)


@pytest.fixture
def written(tmp_path) -> tuple[Path, list[str]]:
    captions = captioned_folder(tmp_path / "photos")
    out = tmp_path / "shards"
    assert make_shards.main(["--source", "captions", "--input", str(tmp_path / "photos"), "--out", str(out),
                             "--samples-per-shard", "4"]) == 0
    return out, captions


def test_writer_writes_img2dataset_layout_from_images_with_captions_beside_them(written):
    out, captions = written
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    with tarfile.open(out / "00000.tar") as tar:
        names = tar.getnames()
    assert names[0] in ("000000000.png", "000000000.jpg") and names[1:3] == ["000000000.txt", "000000000.json"]
    assert not [n for n in names if n.endswith(".idx")]
    ds = dataset(out)
    assert len(ds) == 9 and [ds.caption(i) for i in range(9)] == captions
    assert json.loads(sequential_samples(out)[0]["json"])["caption"] == captions[0]


@pytest.mark.parametrize("source", ["writer", "img2dataset"])
def test_random_access_equals_sequential_reading_for_every_index(tmp_path, written, source):
    directory = written[0] if source == "writer" else img2dataset_output(tmp_path / "laion")
    if source == "img2dataset":
        assert make_shards.main(["--index-captions", str(directory)]) == 0
    expected = sequential_samples(directory)
    ds = dataset(directory)
    assert len(ds) == len(expected)
    for index in np.random.default_rng(0).permutation(len(ds)).tolist():
        path, sample = ds._sample(index)
        got = {ext.lstrip("."): member.read() for ext, member in sample.items() if ext != "__key__"}
        assert {"__key__": sample["__key__"], **got} == expected[index]
        ext = next(e for e in ("jpg", "png") if e in got)
        assert np.array_equal(np.asarray(ds.load(index)), np.asarray(Image.open(io.BytesIO(expected[index][ext]))))
        assert ds.caption(index) == expected[index]["txt"].decode().strip()


def test_img2dataset_output_is_indexed_without_rewriting_it(tmp_path, capsys):
    root = img2dataset_output(tmp_path / "laion")
    before = tree_digest(root)
    assert make_shards.main(["--index-captions", str(root)]) == 0
    after = tree_digest(root)
    assert {name: after[name] for name in before} == before
    assert set(after) - set(before) == {INDEX_NAME, "00000.tar.offsets.npy", "00001.tar.offsets.npy"}
    index = read_index(root)
    assert [s["url"] for s in index["shardlist"]] == ["00000.tar"] and index["dist_cl"]["empty_shards"] == ["00001.tar"]
    assert "1 empty shards left out: 00001.tar" in capsys.readouterr().out
    assert [dataset(root)._sample(i)[1]["__key__"] for i in range(3)] == ["000000000", "000000001", "000000003"]


def test_a_sample_is_augmented_image_caption_tokens_and_index_reproducibly(written):
    ds = dataset(written[0])
    image, tokens, index = ds[5]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and index == 5
    assert tokens.dtype == torch.long and torch.equal(tokens, open_clip.tokenize([written[1][5]])[0])
    assert torch.equal(ds.tokens(5), tokens)
    assert torch.equal(ds[5][0], image)
    ds.set_epoch(1)
    assert not torch.equal(ds[5][0], image)
    copy = pickle.loads(pickle.dumps(ds))
    assert torch.equal(copy[5][0], ds[5][0]) and torch.equal(copy[5][1], tokens)
    assert ds.clean_item(5).shape == (3, 16, 16)


def test_tokenizer_equals_open_clip_tokenize_without_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("tokenising must not use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    caption = "a red circle"
    tokens = CaptionTokenizer()(caption)
    assert tokens.shape == (77,) and torch.equal(tokens, open_clip.tokenize([caption])[0])
    long = " ".join(["a blue square beside a green triangle"] * 20)
    assert torch.equal(CaptionTokenizer(context_length=16)(long), open_clip.tokenize([long], context_length=16)[0])
    assert torch.equal(pickle.loads(pickle.dumps(CaptionTokenizer()))(caption), tokens)


@pytest.mark.parametrize("name, problem", [("ViT-Q-99", "not one of open_clip's built-in"),
                                           ("hf-hub:org/model", "not one of open_clip's built-in"),
                                           ("ViT-B-16-SigLIP", "would be downloaded"),
                                           ("coca_roberta-ViT-B-32", "would be downloaded")])
def test_tokenizer_names_that_are_unknown_or_need_a_download_are_refused(name, problem):
    with pytest.raises(TokenizerError, match=problem):
        CaptionTokenizer(name)


@pytest.mark.parametrize("caption, problem", [(None, "no caption"), (b"  \n", "empty"), (b"a \xff\xfe circle",
                                                                                        "not UTF-8")])
def test_bad_caption_in_img2dataset_shard_is_named_at_indexing(tmp_path, capsys, caption, problem):
    root = tmp_path / "laion"
    root.mkdir()
    key, members = img2dataset_sample("000000001", "square", "green", caption=caption or b"x")
    if caption is None:
        del members["txt"]
    img2dataset_tar(root / "00000.tar", [img2dataset_sample("000000000", "circle", "red"), (key, members)])
    assert make_shards.main(["--index-captions", str(root)]) == 2
    assert f"shard {root / '00000.tar'} key 000000001: " in capsys.readouterr().err
    with pytest.raises(CaptionError, match=problem):
        from dist_cl.data.shard_writer import index_captions

        index_captions(root)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG of that size with no pixel data: its signature, header chunk and end chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


@pytest.mark.parametrize("image, problem", [(b"<html>404 not found</html>", "cannot identify"),
                                            (None, "decompression bomb")])
def test_an_image_that_is_no_image_in_img2dataset_shard_is_named_at_indexing(tmp_path, capsys, image, problem):
    root = tmp_path / "laion"
    root.mkdir()
    key, members = img2dataset_sample("000000001", "square", "green")
    del members["jpg"]
    members["png"] = image or png_claiming(20000, 20000)
    img2dataset_tar(root / "00000.tar", [img2dataset_sample("000000000", "circle", "red"), (key, members)])
    assert make_shards.main(["--index-captions", str(root)]) == 2
    err = capsys.readouterr().err
    assert f"shard {root / '00000.tar'} key 000000001: its image is not one Pillow can identify" in err
    assert problem in err
    assert not (root / INDEX_NAME).exists()


def test_indexing_reads_an_image_only_as_far_as_its_header(tmp_path, monkeypatch):
    """A large valid image: the first IMAGE_HEADER_BYTES identify it, the rest is never read."""
    reads = []
    real_open = shard_writer.Image.open
    monkeypatch.setattr(shard_writer.Image, "open", lambda fp: reads.append(len(fp.getvalue())) or real_open(fp))
    big = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    root = tmp_path / "laion"
    root.mkdir()
    key, members = img2dataset_sample("000000000", "circle", "red")
    del members["jpg"]
    members["png"] = encoded(Image.fromarray(big), "PNG")
    img2dataset_tar(root / "00000.tar", [(key, members)])
    assert len(members["png"]) > shard_writer.IMAGE_HEADER_BYTES
    shard_writer.index_captions(root)
    assert reads == [shard_writer.IMAGE_HEADER_BYTES]


@pytest.mark.parametrize("caption, problem", [(None, "no caption"), (b"\n", "empty"), (b"\xc3(", "not UTF-8")])
def test_bad_caption_beside_an_image_is_named_by_the_writer(tmp_path, capsys, caption, problem):
    captioned_folder(tmp_path / "photos")
    text = tmp_path / "photos" / "shapes" / "circle_green.txt"
    if caption is None:
        text.unlink()
    else:
        text.write_bytes(caption)
    assert make_shards.main(["--source", "captions", "--input", str(tmp_path / "photos"),
                             "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"caption {text} of image" in err and problem in err


def overwrite_member(directory: Path, index: int, ext: str, data: bytes) -> tuple[Path, str]:
    """Overwrite sample ``index``'s member in place (same size, so the index still fits); returns its shard
    and key."""
    ds = dataset(directory)
    path, sample = ds._sample(index)
    table = np.load(offsets_path(path))
    position = [row["key"].decode() for row in table].index(sample["__key__"])
    offset, size = (int(table[position][f"{ext}_offset"]), int(table[position][f"{ext}_size"]))
    assert len(data) <= size
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data.ljust(size, b"\xff"))
    return Path(path), sample["__key__"]


def test_caption_spoiled_after_indexing_is_named_when_read(written):
    shard, key = overwrite_member(written[0], 6, "text", b"\xff\xfe")
    ds = dataset(written[0])
    for read in (lambda: ds[6], lambda: ds.caption(6)):
        with pytest.raises(CaptionError, match=f"shard {shard} key {key}: the caption is not UTF-8"):
            read()
    ds[5]  # the others still read


def test_corrupt_image_is_named_when_read(written):
    shard, key = overwrite_member(written[0], 2, "image", b"not an image")
    ds = dataset(written[0])
    for read in (lambda: ds[2], lambda: ds.load(2), lambda: ds.clean_item(2)):
        with pytest.raises(ShardError, match=f"shard {shard} member {key}.(jpg|png) cannot be decoded"):
            read()


def test_image_and_caption_shards_refuse_each_other(tmp_path, written):
    with pytest.raises(ShardError, match="holds shards of captions; ShardPairs reads shards of images"):
        ShardPairs(written[0], AugmentConfig(), image_size=16, seed=0)
    np.savez(tmp_path / "images.npz", images=np.zeros((3, 4, 4, 3), np.uint8))
    assert make_shards.main(["--source", "npz", "--input", str(tmp_path / "images.npz"),
                             "--out", str(tmp_path / "images")]) == 0
    with pytest.raises(ShardError, match="holds shards of images; CaptionPairs reads shards of captions"):
        dataset(tmp_path / "images")


def test_labels_beside_captions_reach_the_index(tmp_path):
    captioned_folder(tmp_path / "photos")
    images = sorted(p for p in (tmp_path / "photos").rglob("*") if p.suffix in (".png", ".jpg"))
    for path in images:
        path.with_suffix(".cls").write_text(str(SHAPES.index(path.stem.split("_")[0])))
    assert make_shards.main(["--source", "captions", "--input", str(tmp_path / "photos"),
                             "--out", str(tmp_path / "out")]) == 0
    ds = dataset(tmp_path / "out")
    assert ds.labels.tolist() == [SHAPES.index(p.stem.split("_")[0]) for p in images]
    assert [ds.caption(i).split()[-1] for i in range(len(ds))] == [SHAPES[label] for label in ds.labels]


def test_stale_offsets_table_is_refused(written):
    shard = written[0] / "00001.tar"
    table = np.load(offsets_path(shard))
    np.save(offsets_path(shard), table[:-1])
    with pytest.raises(ShardError, match=f"does not describe shard {shard} \\({len(table)} samples.*--index-captions"):
        CaptionShard(str(shard), 4, len(table))
