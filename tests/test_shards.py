"""Indexed shards: written by dist-cl-make-shards, read back by index exactly, and failing loudly by name."""

import json
import os
import pickle
import subprocess
import sysconfig
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dist_cl.cli import make_shards
from dist_cl.config import AugmentConfig
from dist_cl.data.shard_writer import LabelError, npz_source
from dist_cl.data.shards import (
    INDEX_NAME,
    OFFSETS_SUFFIX,
    ShardError,
    ShardPairs,
    check_shards,
    offsets_path,
    split_dir,
)


def write_npz(path: Path, n: int = 23, shape: tuple = (6, 5, 3), labels: bool | list = True, seed: int = 0) -> dict:
    """Random images; random labels, none, or the ``labels`` given."""
    rng = np.random.default_rng(seed)
    arrays = {"images": rng.integers(0, 256, (n, *shape), dtype=np.uint8)}
    if labels is True:
        arrays["labels"] = rng.integers(0, 7, n)
    elif labels is not False:
        arrays["labels"] = np.asarray(labels)
    np.savez(path, **arrays)
    return arrays


def shards_from_npz(tmp_path: Path, samples_per_shard: int = 5, **kwargs) -> tuple[Path, dict]:
    arrays = write_npz(tmp_path / "source.npz", **kwargs)
    out = tmp_path / "shards"
    rc = make_shards.main(["--source", "npz", "--input", str(tmp_path / "source.npz"), "--out", str(out),
                           "--samples-per-shard", str(samples_per_shard)])
    assert rc == 0
    return out, arrays


def dataset(directory: Path) -> ShardPairs:
    return ShardPairs(directory, AugmentConfig(), image_size=8, seed=0)


@pytest.mark.parametrize("shape", [(6, 5, 3), (6, 5)])
def test_samples_read_by_index_in_random_order_reproduce_source_pixels_and_labels(tmp_path, shape):
    out, arrays = shards_from_npz(tmp_path, shape=shape)
    ds = dataset(out)
    assert len(ds) == 23 and len(list(out.glob("shard-*.tar"))) == 5
    assert ds.channels == (3 if len(shape) == 3 else 1)
    np.testing.assert_array_equal(ds.labels, arrays["labels"])
    for i in np.random.default_rng(1).permutation(23):
        np.testing.assert_array_equal(np.asarray(ds.load(int(i))), arrays["images"][i])


def test_reading_with_fewer_open_shards_than_shards_reopens_them_correctly(tmp_path):
    out, arrays = shards_from_npz(tmp_path)
    ds = ShardPairs(out, AugmentConfig(), image_size=8, seed=0, open_shards=2)
    for i in np.random.default_rng(3).permutation(23).tolist() * 2:
        np.testing.assert_array_equal(np.asarray(ds.load(i)), arrays["images"][i])
    assert len(ds._open) == 2


def test_npz_without_labels_gives_no_labels(tmp_path):
    out, _ = shards_from_npz(tmp_path, labels=False)
    assert dataset(out).labels is None


def test_folder_source_numbers_classes_by_sorted_name_and_keeps_pixels(tmp_path):
    rng = np.random.default_rng(0)
    images = {}
    for name in ("zebra", "ant"):
        (tmp_path / "src" / name).mkdir(parents=True)
        for j in range(3):
            images[(name, j)] = rng.integers(0, 256, (4, 7, 3), dtype=np.uint8)
            Image.fromarray(images[(name, j)]).save(tmp_path / "src" / name / f"{j}.png")
    out = tmp_path / "shards"
    assert make_shards.main(["--source", "folder", "--input", str(tmp_path / "src"), "--out", str(out),
                             "--samples-per-shard", "4"]) == 0
    ds = dataset(out)
    assert ds.classes == ["ant", "zebra"]
    np.testing.assert_array_equal(ds.labels, [0, 0, 0, 1, 1, 1])
    for i, key in enumerate([("ant", 0), ("ant", 1), ("ant", 2), ("zebra", 0), ("zebra", 1), ("zebra", 2)]):
        np.testing.assert_array_equal(np.asarray(ds.load(i)), images[key])


def test_digits_shards_hold_the_digits_split(tmp_path):
    from dist_cl.data.digits import digits_split

    out = tmp_path / "digits" / "heldout"
    assert make_shards.main(["--source", "digits", "--split", "heldout", "--out", str(out),
                             "--samples-per-shard", "100"]) == 0
    images, labels = digits_split(0.2, 0, "heldout")
    ds = dataset(out)
    np.testing.assert_array_equal(ds.labels, labels)
    for i in (0, 99, 100, len(ds) - 1):
        np.testing.assert_array_equal(np.rint(np.asarray(ds.load(i)) / 255 * 16), images[i, 0] * 16)


def test_dataloader_workers_in_random_order_give_the_same_views_as_one_process(tmp_path):
    out, _ = shards_from_npz(tmp_path)
    ds = dataset(out)
    ds.set_epoch(3)
    ds.load(0)  # open a shard in the parent: workers must not depend on (or share) it
    order = np.random.default_rng(2).permutation(len(ds)).tolist()
    loader = DataLoader(ds, batch_size=4, sampler=order, num_workers=2)
    seen = []
    for view_a, view_b, index in loader:
        for a, b, i in zip(view_a, view_b, index.tolist()):
            ref_a, ref_b, _ = ds[i]
            torch.testing.assert_close(a, ref_a, rtol=0, atol=0)
            torch.testing.assert_close(b, ref_b, rtol=0, atol=0)
            seen.append(i)
    assert seen == order


def test_dataset_pickles_after_opening_shards(tmp_path):
    out, arrays = shards_from_npz(tmp_path)
    ds = dataset(out)
    ds.load(7)
    copy = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(np.asarray(copy.load(7)), arrays["images"][7])


def test_truncated_shard_is_an_error_naming_the_shard(tmp_path):
    out, _ = shards_from_npz(tmp_path)
    shard = out / "shard-000002.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    with pytest.raises(ShardError, match="shard-000002.tar.*truncated"):
        check_shards(out)
    ds = dataset(out)
    ds.load(0)
    with pytest.raises(ShardError, match="shard-000002.tar"):
        ds.load(11)


def _overwrite_member(shard: Path, name: str, data: bytes) -> None:
    """Replace a member's bytes in place (same length), as disk corruption would."""
    with tarfile.open(shard) as tar:
        member = tar.getmember(name)
    assert len(data) == member.size
    with open(shard, "r+b") as f:
        f.seek(member.offset_data)
        f.write(data)


def test_corrupt_image_member_is_an_error_naming_shard_and_member(tmp_path):
    out, _ = shards_from_npz(tmp_path)
    with tarfile.open(out / "shard-000001.tar") as tar:
        size = tar.getmember("000000006.png").size
    _overwrite_member(out / "shard-000001.tar", "000000006.png", b"\0" * size)
    with pytest.raises(ShardError, match=r"shard-000001\.tar member 000000006\.png"):
        dataset(out).load(6)


def test_corrupt_tar_header_is_an_error_naming_the_shard_when_it_must_be_parsed(tmp_path):
    """With its offsets table a shard's headers are never parsed (the data is still checked by its .idx
    and by decoding); without one (shards from other tools) wids parses them and a bad one is named."""
    out, arrays = shards_from_npz(tmp_path)
    shard = out / "shard-000003.tar"
    data = bytearray(shard.read_bytes())
    data[124:136] = b"zzzzzzzzzzz\0"  # the size field of the first header
    shard.write_bytes(bytes(data))
    np.testing.assert_array_equal(np.asarray(dataset(out).load(15)), arrays["images"][15])
    offsets_path(shard).unlink()
    with pytest.raises(ShardError, match="shard-000003.tar"):
        dataset(out).load(15)


def test_samples_read_through_offsets_tables_equal_samples_parsed_by_wids(tmp_path):
    out, _ = shards_from_npz(tmp_path, n=12, labels=False)
    with_tables = dataset(out)
    members = {i: {k: v.read() if k != "__key__" else v for k, v in with_tables._shard(i // 5)[i % 5].items()}
               for i in range(12)}
    assert members[7].keys() == {"__key__", ".png", ".idx"}  # unlabelled: no .cls member
    for table in out.glob("*" + OFFSETS_SUFFIX):
        table.unlink()
    parsed = dataset(out)
    for i in range(12):
        assert {k: v.read() if k != "__key__" else v for k, v in parsed._shard(i // 5)[i % 5].items()} == members[i]


@pytest.mark.parametrize("damage", ["other_shards_table", "garbage"])
def test_offsets_table_that_does_not_fit_its_shard_is_an_error_naming_it(tmp_path, damage):
    out, _ = shards_from_npz(tmp_path)  # shard-000004 holds 3 samples, the others 5
    table = offsets_path(out / "shard-000004.tar")
    if damage == "garbage":
        table.write_bytes(b"not an array")
    else:
        table.write_bytes(offsets_path(out / "shard-000000.tar").read_bytes())
    with pytest.raises(ShardError, match=r"offsets table .*shard-000004\.tar\.offsets\.npy"):
        dataset(out).load(21)


@pytest.mark.parametrize("stored", [b"3", b"9"], ids=["duplicated", "out_of_range"])
def test_stored_index_not_equal_to_position_is_an_error_naming_shard_and_member(tmp_path, stored):
    out, _ = shards_from_npz(tmp_path, n=8)  # shard-000001 holds 5..7
    _overwrite_member(out / "shard-000001.tar", "000000007.idx", stored)
    with pytest.raises(ShardError, match=r"shard-000001\.tar member 000000007\.idx holds index"):
        dataset(out).load(7)


def test_missing_index_is_an_error_naming_the_fix(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match=f"{INDEX_NAME}.*make_shards"):
        ShardPairs(tmp_path / "empty", AugmentConfig(), image_size=8, seed=0)
    with pytest.raises(ShardError, match="make_shards"):
        check_shards(tmp_path / "empty")


def test_missing_shard_is_an_error_naming_it(tmp_path):
    out, _ = shards_from_npz(tmp_path)
    (out / "shard-000004.tar").unlink()
    with pytest.raises(ShardError, match="shard-000004.tar is missing"):
        check_shards(out)
    with pytest.raises(ShardError, match="shard-000004.tar is missing"):
        dataset(out).load(22)


def test_empty_shard_list_is_an_error(tmp_path):
    (tmp_path / INDEX_NAME).write_text(json.dumps({"__kind__": "wids-shard-index-v1", "wids_version": 1,
                                                   "shardlist": []}))
    with pytest.raises(ShardError, match="lists no shards"):
        check_shards(tmp_path)


def test_split_dirs_under_data_path(tmp_path):
    out, _ = shards_from_npz(tmp_path)
    assert split_dir(out, "train") == out and split_dir(out, "heldout") is None
    (tmp_path / "both").mkdir()
    os.symlink(out, tmp_path / "both" / "train")
    os.symlink(out, tmp_path / "both" / "heldout")
    assert split_dir(tmp_path / "both", "heldout") == tmp_path / "both" / "heldout"
    assert check_shards(tmp_path / "both") == {"train": 23, "heldout": 23}


def test_the_installed_make_shards_command_lists_its_options():
    """``pip install`` puts dist-cl-make-shards beside the interpreter; its help names every option."""
    command = Path(sysconfig.get_path("scripts")) / "dist-cl-make-shards"
    proc = subprocess.run([str(command), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage: dist-cl-make-shards")
    for option in ("--source", "--input", "--out", "--samples-per-shard", "--split", "--holdout-fraction",
                   "--split-seed", "--subset", "--mode", "--force"):
        assert option in proc.stdout, option


def test_make_shards_refuses_to_overwrite_without_force(tmp_path, capsys):
    out, _ = shards_from_npz(tmp_path)
    args = ["--source", "npz", "--input", str(tmp_path / "source.npz"), "--out", str(out), "--samples-per-shard", "5"]
    assert make_shards.main(args) == 2
    assert "--force" in capsys.readouterr().err
    write_npz(tmp_path / "source.npz", n=12, seed=5)
    assert make_shards.main(args + ["--force"]) == 0
    assert len(dataset(out)) == 12 and len(list(out.glob("shard-*.tar"))) == 3


@pytest.mark.parametrize("labels,message", [
    ([0.0, 1.0, float("nan"), 2.0], "label 2 is nan; every labelled sample needs a class id"),
    (["cat", "dog", "cat", "cat"], "label 0 is 'cat', a string; shards store integer class ids"),
    ([0.0, 1.0, 1.0, 2.5], "label 3 is 2.5, not a whole number; class ids are integers"),
    ([0, -1, 1, 1], "label 1 is -1; class ids count from 0"),
], ids=["nan", "string", "fractional", "negative"])
def test_make_shards_rejects_labels_that_are_not_class_ids(tmp_path, capsys, labels, message):
    write_npz(tmp_path / "source.npz", n=4, labels=labels)
    with pytest.raises(LabelError, match=message):
        npz_source(tmp_path / "source.npz")
    assert make_shards.main(["--source", "npz", "--input", str(tmp_path / "source.npz"),
                             "--out", str(tmp_path / "out")]) == 2
    assert f"make_shards: error: {tmp_path / 'source.npz'}: {message}" in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("shard-*"))


def test_whole_float_labels_are_class_ids(tmp_path):
    write_npz(tmp_path / "source.npz", n=3, labels=[2.0, 0.0, 1.0])
    assert [npz_source(tmp_path / "source.npz").read(i)[2] for i in range(3)] == [2, 0, 1]


def test_make_shards_refuses_a_foreign_non_empty_directory(tmp_path, capsys):
    write_npz(tmp_path / "source.npz")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert make_shards.main(["--source", "npz", "--input", str(tmp_path / "source.npz"),
                             "--out", str(tmp_path / "out")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_make_shards_resumes_without_rewriting_complete_shards(tmp_path):
    out, arrays = shards_from_npz(tmp_path)
    first_index = json.loads((out / INDEX_NAME).read_text())
    # an interrupted run: no index, one shard missing, one half-written temporary
    (out / INDEX_NAME).unlink()
    (out / "shard-000003.tar").unlink()
    (out / "shard-000004.tar").rename(out / "shard-000004.tar.tmp")
    os.utime(out / "shard-000000.tar", ns=(1, 1))
    args = ["--source", "npz", "--input", str(tmp_path / "source.npz"), "--out", str(out), "--samples-per-shard", "5"]
    assert make_shards.main(args) == 0
    assert (out / "shard-000000.tar").stat().st_mtime_ns == 1
    assert json.loads((out / INDEX_NAME).read_text()) == first_index
    assert not list(out.glob("*.tmp"))
    ds = dataset(out)
    for i in (15, 22):
        np.testing.assert_array_equal(np.asarray(ds.load(i)), arrays["images"][i])


def test_make_shards_will_not_resume_with_other_arguments(tmp_path, capsys):
    out, _ = shards_from_npz(tmp_path)
    (out / INDEX_NAME).unlink()
    assert make_shards.main(["--source", "npz", "--input", str(tmp_path / "source.npz"), "--out", str(out),
                             "--samples-per-shard", "7"]) == 2
    assert "other arguments" in capsys.readouterr().err


def test_index_is_read_by_wids_shard_list_dataset(tmp_path):
    import wids

    out, _ = shards_from_npz(tmp_path)
    ds = wids.ShardListDataset(str(out / INDEX_NAME), localname=str, transformations=[])
    assert len(ds) == 23
    sample = ds[13]
    assert sample["__key__"] == "000000013" and sample[".idx"].read() == b"13"


@pytest.mark.parametrize("labels,message", [
    (lambda labels: labels[:-1], r"entry 'shard-000002.tar' has 4 labels for its 5 samples"),
    (lambda labels: [*labels, 0], r"entry 'shard-000002.tar' has 6 labels for its 5 samples"),
    (lambda labels: [-1, *labels[1:]], r"entry 'shard-000002.tar' has labels that are not non-negative integers"),
], ids=["short", "long", "negative"])
def test_a_label_list_that_does_not_fit_its_shard_is_refused_by_check_shards(tmp_path, labels, message):
    """The kNN evaluation reads sample i's label at position i: a list that does not fit fails at the dry run."""
    out, _ = shards_from_npz(tmp_path)
    index = json.loads((out / INDEX_NAME).read_text())
    index["shardlist"][2]["labels"] = labels(index["shardlist"][2]["labels"])
    (out / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ShardError, match=message):
        check_shards(out)
