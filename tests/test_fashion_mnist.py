"""Fashion-MNIST: IDX files written here are read back exactly, damaged or missing ones are named errors, and the
stratified subsets are the same in the trainer and in make_shards."""

import gzip
import struct

import numpy as np
import pytest
import torch
from conftest import ROOT

from dist_cl.cli import make_shards
from dist_cl.config import ConfigError, load_config
from dist_cl.data import build_dataset
from dist_cl.data.fashion_mnist import FILES, INSTALL, IdxError, read_idx, stratified_subset
from dist_cl.data.shards import ShardPairs
from dist_cl.learn.models import build_model

SIZES = {"train": 60, "heldout": 20}  # 6 and 2 of each of the 10 classes


def idx_bytes(array: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_idx(path, array: np.ndarray, gz: bool) -> None:
    data = idx_bytes(array)
    if gz:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def fake_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SIZES[split])
    labels = rng.permutation(np.arange(SIZES[split]) % 10).astype(np.uint8)
    return rng.integers(0, 256, (SIZES[split], 28, 28), dtype=np.uint8), labels


@pytest.fixture
def idx_dir(tmp_path):
    """The four files, training ones gzip'd as Debian ships them, test ones plain."""
    for split, (image_stem, label_stem) in FILES.items():
        images, labels = fake_split(split)
        write_idx(tmp_path / image_stem, images, gz=split == "train")
        write_idx(tmp_path / label_stem, labels, gz=split == "train")
    return tmp_path


def config(path, *overrides: str):
    return load_config(None, ["data.name=fashion_mnist", f"data.path={path}", "data.image_size=28", *overrides])


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
def test_idx_files_are_read_back_exactly(tmp_path, gz):
    images, labels = fake_split("heldout")
    write_idx(tmp_path / "images", images, gz)
    write_idx(tmp_path / "labels", labels, gz)
    suffix = ".gz" if gz else ""
    assert np.array_equal(read_idx(tmp_path / f"images{suffix}", 3), images)
    assert np.array_equal(read_idx(tmp_path / f"labels{suffix}", 1), labels)


def test_splits_hold_the_files_images_and_labels_in_order(idx_dir):
    for split in ("train", "heldout"):
        dataset = build_dataset(config(idx_dir), split)
        images, labels = fake_split(split)
        assert len(dataset) == SIZES[split] and dataset.channels == 1
        assert np.array_equal(dataset.labels, labels)
        assert torch.equal(dataset.load(3), torch.from_numpy(images[3])[None])
        assert torch.equal(dataset.raw(3), torch.from_numpy(images[3])[None].float() / 255)


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
@pytest.mark.parametrize("cut", [5, 28 * 28 + 3], ids=["in-header", "in-data"])
def test_truncated_file_is_an_error_naming_it(tmp_path, gz, cut):
    images, _ = fake_split("heldout")
    data = idx_bytes(images)[:-cut] if cut > 100 else idx_bytes(images)[:cut]
    path = tmp_path / ("images.gz" if gz else "images")
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(IdxError, match=f"{path}.*truncated.*{INSTALL}"):
        read_idx(path, 3)


def test_gzip_stream_cut_short_is_an_error_naming_it(tmp_path):
    path = tmp_path / "images.gz"
    path.write_bytes(gzip.compress(idx_bytes(fake_split("heldout")[0]))[:-100])
    with pytest.raises(IdxError, match=f"{path}.*truncated"):
        read_idx(path, 3)


def test_wrong_kind_of_file_is_an_error_naming_magic(tmp_path):
    write_idx(tmp_path / "labels", fake_split("heldout")[1], gz=False)
    with pytest.raises(IdxError, match="magic bytes .0, 0, 8, 1."):
        read_idx(tmp_path / "labels", 3)


def test_missing_file_names_the_install_command_and_data_path(idx_dir):
    (idx_dir / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(IdxError, match=f"t10k-labels-idx1-ubyte.*`{INSTALL}`.*data.path"):
        build_dataset(config(idx_dir), "heldout")


def test_subset_is_stratified_and_fixed_by_split_seed(idx_dir):
    a = build_dataset(config(idx_dir, "data.subset=30"), "train")
    b = build_dataset(config(idx_dir, "data.subset=30"), "train")
    c = build_dataset(config(idx_dir, "data.subset=30", "data.split_seed=1"), "train")
    assert len(a) == 30 and np.array_equal(np.bincount(a.labels), np.full(10, 3))
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    held = build_dataset(config(idx_dir, "data.subset=30", "data.heldout_subset=10"), "heldout")
    assert np.array_equal(np.bincount(held.labels), np.ones(10))
    everything = build_dataset(config(idx_dir), "train")
    keep = stratified_subset(everything.labels, 30, 0)
    assert torch.equal(everything.images[keep], a.images)


def test_subset_larger_than_the_split_is_an_error_naming_the_bound(idx_dir):
    with pytest.raises(ConfigError, match="data.subset=61 is more than the 60 train images"):
        build_dataset(config(idx_dir, "data.subset=61"), "train")


@pytest.mark.parametrize("override,message", [
    ("data.subset=-1", "data.subset=-1 must be >= 0"),
    ("data.heldout_subset=-5", "data.heldout_subset=-5 must be >= 0"),
])
def test_negative_subsets_are_rejected(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["data.name=fashion_mnist", override])


def test_subset_of_another_data_set_is_rejected():
    with pytest.raises(ConfigError, match="data.subset and data.heldout_subset sample Fashion-MNIST"):
        load_config(None, ["data.subset=100"])


def test_views_are_reproducible_tensors_of_the_image_size(idx_dir):
    dataset = build_dataset(config(idx_dir, "data.image_size=24"), "train")
    dataset.set_epoch(2)
    a1, b1, index = dataset[5]
    torch.manual_seed(123)
    a2, b2, _ = dataset[5]
    assert index == 5 and a1.shape == (1, 24, 24) and a1.dtype == torch.float32
    assert torch.equal(a1, a2) and torch.equal(b1, b2) and not torch.equal(a1, b1)
    dataset.set_epoch(3)
    assert not torch.equal(dataset[5][0], a1)
    assert torch.equal(dataset.clean_item(5), dataset.clean_item(5)) and dataset.clean_item(5).shape == (1, 24, 24)


@pytest.mark.parametrize("split,subset", [("train", 20), ("heldout", 0)])
def test_make_shards_writes_the_split_and_subset_the_trainer_reads(idx_dir, tmp_path, split, subset):
    out = tmp_path / "shards"
    assert make_shards.main(["--source", "fashion-mnist", "--input", str(idx_dir), "--split", split,
                             "--subset", str(subset), "--out", str(out), "--samples-per-shard", "7"]) == 0
    shards = ShardPairs(out, config(idx_dir).data.augment, 28, seed=0)
    key = "data.subset" if split == "train" else "data.heldout_subset"
    expected = build_dataset(config(idx_dir, f"{key}={subset}"), split)
    assert shards.mode == "L" and shards.classes[0] == "T-shirt/top"
    assert np.array_equal(shards.labels, expected.labels)
    for i in (0, len(expected) - 1):
        assert np.array_equal(np.asarray(shards.load(i)), expected.load(i)[0].numpy())


def test_make_shards_names_a_missing_fashion_mnist_file(tmp_path, capsys):
    assert make_shards.main(["--source", "fashion-mnist", "--input", str(tmp_path), "--out",
                             str(tmp_path / "out")]) == 2
    assert INSTALL in capsys.readouterr().err


def test_config_file_builds_its_data_and_model(idx_dir):
    cfg = load_config(ROOT / "configs" / "fashion_mnist.yaml", [f"data.path={idx_dir}", "data.subset=30"])
    assert (cfg.train.global_batch_size, cfg.data.image_size, cfg.eval.corruptions) == (32, 28, False)
    dataset = build_dataset(cfg, "train")
    assert dataset.channels == cfg.model.in_chans and len(dataset) == 30
    views = torch.stack([dataset[i][0] for i in range(2)])
    with torch.no_grad():
        u, v, _ = build_model(cfg, num_samples=30).eval()(views, views)
    assert u.shape == (2, cfg.model.embed_dim) and torch.allclose(u, v)


@pytest.mark.parametrize("split", ["train", "heldout"])
@pytest.mark.parametrize("changed,message", [
    ("images", r"images-idx3-ubyte(\.gz)? holds 5x7 images, not Fashion-MNIST's 28x28: it is another data set"),
    ("labels", r"labels-idx1-ubyte(\.gz)? holds labels up to 255, not Fashion-MNIST's 0 to 9: it is another data set"),
])
def test_idx_files_of_another_shape_are_refused_as_not_fashion_mnist(idx_dir, split, changed, message):
    """Valid IDX files under Fashion-MNIST's names: 5x7 images, or labels up to 255, are another data set."""
    images, labels = fake_split(split)
    image_stem, label_stem = FILES[split]
    if changed == "images":
        write_idx(idx_dir / image_stem, images[:, :5, :7].copy(), gz=split == "train")
    else:
        labels[0] = 255
        write_idx(idx_dir / label_stem, labels, gz=split == "train")
    with pytest.raises(IdxError, match=message):
        build_dataset(config(idx_dir), split)
