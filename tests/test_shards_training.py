"""Training and --dry-run read the shards that dist-cl-make-shards writes."""

from conftest import torchrun, train_cmd

from dist_cl.cli import make_shards
from dist_cl.cli import train as cli

SHARD_RUN = ["data.name=shards", "data.image_size=8", "model.in_chans=1", "eval.every_epochs=1", "train.epochs=1",
             "train.global_batch_size=32"]


def make_digits_shards(root, splits=("train", "heldout")):
    for split in splits:
        assert make_shards.main(["--source", "digits", "--split", split, "--out", str(root / split),
                                 "--samples-per-shard", "200"]) == 0


def test_two_process_training_reads_digits_shards(tmp_path):
    make_digits_shards(tmp_path / "shards")
    run_dir = tmp_path / "run"
    proc = torchrun(train_cmd(run_dir, *SHARD_RUN, f"data.path={tmp_path / 'shards'}", "data.num_workers=1"))
    assert "epoch 1/1 step 44 " in proc.stderr  # 1437 training digits // 32
    assert (run_dir / "checkpoints" / "step-00000044.pt").exists()
    assert "knn_top1" in (run_dir / "metrics.jsonl").read_text()


def test_dry_run_names_a_truncated_shard_and_writes_nothing(tmp_path, capsys):
    make_digits_shards(tmp_path / "shards", splits=("train",))
    shard = tmp_path / "shards" / "train" / "shard-000003.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    assert cli.main(["--dry-run", *SHARD_RUN, f"data.path={tmp_path / 'shards'}", f"run.dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "shard-000003.tar" in err and "make_shards.py" in err, err[-3000:]
    assert not (tmp_path / "run").exists()


def test_dry_run_refuses_corrupted_view_retrieval_without_held_out_shards(tmp_path, capsys):
    make_digits_shards(tmp_path / "shards", splits=("train",))
    assert cli.main(["--dry-run", *SHARD_RUN, "eval.corruptions=true", f"data.path={tmp_path / 'shards'}",
                     f"run.dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "eval.corruptions=true corrupts the held-out images" in err and "--split heldout" in err, err[-3000:]
