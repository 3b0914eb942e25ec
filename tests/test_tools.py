"""The tools around training: embedding extraction, offline evaluation, and the cluster configs."""

import importlib
import json
import math

import numpy as np
import pytest
import torch
from conftest import ROOT, torchrun
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from dist_cl.cli import evaluate as evaluate_tool
from dist_cl.cli import extract_embeddings as extract_tool
from dist_cl.cli import train as train_tool
from dist_cl.config import ConfigError, load_config
from dist_cl.data import build_dataset
from dist_cl.evaluate.offline import compute_metrics
from dist_cl.learn.models import build_model
from dist_cl.plan.teacher import load_teacher

STEMS = ("u", "v", "backbone", "indices", "labels")


@pytest.fixture(scope="module")
def single_process_embeddings(one_epoch_run, tmp_path_factory):
    """The session's 2-rank digits epoch (conftest), extracted in this process: the trainer run is shared."""
    out = tmp_path_factory.mktemp("tools") / "emb-1"
    assert extract_tool.main(["--checkpoint", str(one_epoch_run / "checkpoints" / "latest"), "--out", str(out)]) == 0
    return out


def test_two_rank_extraction_equals_single_process_row_for_row(one_epoch_run, single_process_embeddings, tmp_path):
    out = tmp_path / "emb-2"
    checkpoint = next((one_epoch_run / "checkpoints").glob("step-*.pt"))
    # the training split only: its 1437 rows do not divide by 2 ranks, so the padding is exercised
    torchrun([str(ROOT / "tools" / "extract_embeddings.py"), "--checkpoint", str(checkpoint), "--out", str(out),
              "--split", "train"])
    assert not (out / "heldout").exists()
    for split, n in (("train", 1437),):
        for stem in STEMS:
            one = np.load(single_process_embeddings / split / f"{stem}.npy")
            two = np.load(out / split / f"{stem}.npy")
            assert len(one) == len(two) == n, (split, stem)
            if stem in ("indices", "labels"):
                np.testing.assert_array_equal(one, two)
            else:
                # eval mode makes every row independent of the others in its batch; the ranks only see other
                # batch shapes (719/718 rows each), which may change a kernel's float32 summation order
                np.testing.assert_allclose(one, two, rtol=1e-5, atol=1e-6, err_msg=f"{split}/{stem}")
        np.testing.assert_array_equal(np.load(out / split / "indices.npy"), np.arange(n))
        meta = json.loads((out / split / "meta.json").read_text())
        assert (meta["world_size"], meta["num_samples"], meta["shapes"]["u"]) == (2, n, [n, 64])


def test_extracted_embeddings_are_a_teacher_for_their_training_set_and_no_other(one_epoch_run,
                                                                                single_process_embeddings, tmp_path):
    cfg = load_config(one_epoch_run / "config.yaml")
    u, v = load_teacher(str(single_process_embeddings), build_dataset(cfg, "train"))
    for mine, saved in ((u, "u"), (v, "v")):
        rows = np.load(single_process_embeddings / "train" / f"{saved}.npy")
        np.testing.assert_allclose(mine, rows / np.linalg.norm(rows, axis=1, keepdims=True), rtol=1e-6)
    # the same number of digits, split another way: other samples behind the same indices
    other = build_dataset(load_config(one_epoch_run / "config.yaml", ["data.split_seed=1"]), "train")
    assert len(other) == len(u)
    with pytest.raises(ConfigError, match="was extracted from another data set .*data 'digits', split 'train'"):
        load_teacher(str(single_process_embeddings), other)
    with pytest.raises(ConfigError, match="holds embeddings of 360 samples, and this run's training set has 1,437"):
        load_teacher(str(single_process_embeddings / "heldout"), build_dataset(cfg, "train"))
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    for name in ("u.npy", "v.npy", "meta.json"):
        (shuffled / name).write_bytes((single_process_embeddings / "train" / name).read_bytes())
    np.save(shuffled / "indices.npy", np.arange(len(u))[::-1])
    with pytest.raises(ConfigError, match="its rows are not samples 0..N-1 in order"):
        load_teacher(str(shuffled), build_dataset(cfg, "train"))
    (shuffled / "meta.json").write_text("{not json")
    with pytest.raises(ConfigError, match="its files cannot be read"):
        load_teacher(str(shuffled), build_dataset(cfg, "train"))
    (shuffled / "v.npy").unlink()
    with pytest.raises(ConfigError, match="has no v.npy; point it at the output of dist-cl-extract-embeddings"):
        load_teacher(str(shuffled), build_dataset(cfg, "train"))


def test_a_run_selects_its_first_epoch_on_the_teacher_and_says_so(one_epoch_run, single_process_embeddings, tmp_path,
                                                                    capsys):
    """End to end in one process (test_planning checks the plan itself against select_batches)."""
    run = tmp_path / "student"
    assert train_tool.main(["--config", str(one_epoch_run / "config.yaml"), f"run.dir={run}", "train.epochs=1",
                            "eval.every_epochs=0", "selection.strategy=sc_global", "selection.warmup_epochs=0",
                            "selection.options.false_negative_window=2",
                            f"selection.teacher={single_process_embeddings}"]) == 0
    assert (f"selection sc_global {{'false_negative_window': 2}} on the teacher's embeddings in "
            f"{single_process_embeddings} |") in capsys.readouterr().err
    epoch = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "epoch"]
    assert len(epoch) == 1 and epoch[0]["selection/lift"] > 1.0 and "selection/bank_staleness" not in epoch[0]


def test_evaluation_of_saved_embeddings_reproduces_the_trainers_metrics(one_epoch_run, single_process_embeddings,
                                                                        capsys, tmp_path):
    report = tmp_path / "eval.json"
    assert evaluate_tool.main(["--embeddings", str(single_process_embeddings), "--json", str(report)]) == 0
    table = capsys.readouterr().out
    metrics = json.loads(report.read_text())["metrics"]
    assert set(metrics) == {"retrieval_top1", "retrieval_recall5", "retrieval_recall10", "knn_top1", "probe_top1"}
    rows = dict(line.split() for line in table.splitlines()[3:])  # after the checkpoint line and the header
    assert rows == {key: f"{value:.4f}" for key, value in metrics.items()}
    logged = json.loads((one_epoch_run / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("retrieval_top1", "retrieval_recall5", "knn_top1"):
        assert metrics[key] == pytest.approx(logged[key], abs=1e-12), key


def brute_force_recall(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Partner among the k most similar: fewer than k columns beat it (no ties in random data), both directions."""
    sim = a.astype(np.float64) @ b.astype(np.float64).T
    hits = [(row > row[i]).sum() < k for i, row in enumerate(sim)] + \
           [(col > col[i]).sum() < k for i, col in enumerate(sim.T)]
    return float(np.mean(hits))


def brute_force_knn(train_x, train_y, test_x, test_y, k: int) -> float:
    """Majority label of the k nearest by cosine; a tie goes to the tied label met first from the nearest."""
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    sim = unit(test_x.astype(np.float64)) @ unit(train_x.astype(np.float64)).T
    correct = 0
    for row, label in zip(sim, test_y):
        nearest = [int(train_y[j]) for j in np.argsort(-row)[:k]]
        votes = {y: nearest.count(y) for y in nearest}
        best = max(votes.values())
        correct += next(y for y in nearest if votes[y] == best) == label
    return correct / len(test_y)


@pytest.fixture
def small_embeddings():
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(3, 6))

    def split(n):
        labels = rng.integers(0, 3, size=n)
        u = rng.normal(size=(n, 5)).astype(np.float32)
        v = (u + rng.normal(size=(n, 5))).astype(np.float32)
        backbone = (centres[labels] + 1.2 * rng.normal(size=(n, 6))).astype(np.float32)
        return {"u": u, "v": v, "backbone": backbone, "labels": labels, "indices": np.arange(n)}

    return split(40), split(30)


def test_metrics_equal_brute_force_numpy_and_sklearn(small_embeddings):
    train, heldout = small_embeddings
    metrics = compute_metrics(train, heldout, ks=(1, 5, 10), knn_k=7)
    for k, key in ((1, "retrieval_top1"), (5, "retrieval_recall5"), (10, "retrieval_recall10")):
        assert metrics[key] == pytest.approx(brute_force_recall(heldout["u"], heldout["v"], k), abs=1e-12), key
    assert 0 < metrics["retrieval_top1"] < metrics["retrieval_recall10"] < 1  # the inputs do not make it trivial
    expected_knn = brute_force_knn(train["backbone"], train["labels"], heldout["backbone"], heldout["labels"], 7)
    assert metrics["knn_top1"] == pytest.approx(expected_knn, abs=1e-12)
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000, random_state=0))
    probe.fit(train["backbone"].astype(np.float64), train["labels"])
    expected_probe = (probe.predict(heldout["backbone"].astype(np.float64)) == heldout["labels"]).mean()
    assert metrics["probe_top1"] == pytest.approx(expected_probe, abs=1e-12)


@pytest.mark.parametrize("block_rows", [1, 7, 1000])
def test_metrics_over_row_blocks_equal_brute_force(small_embeddings, block_rows):
    """ImageNet-size splits are scored block by block; any block size gives the whole-matrix answer."""
    from dist_cl.evaluate.metrics import full_batch_loss, knn_top1, retrieval_recall
    from dist_cl.learn.losses import batch_infonce

    train, heldout = small_embeddings
    u, v = torch.from_numpy(heldout["u"]), torch.from_numpy(heldout["v"])
    for k in (1, 5):
        assert retrieval_recall(u, v, k, block_elements=block_rows * len(v)) == pytest.approx(
            brute_force_recall(heldout["u"], heldout["v"], k), abs=1e-12)
    expected_knn = brute_force_knn(train["backbone"], train["labels"], heldout["backbone"], heldout["labels"], 7)
    assert knn_top1(torch.from_numpy(train["backbone"]), train["labels"], torch.from_numpy(heldout["backbone"]),
                    heldout["labels"], 7, block_elements=block_rows * len(train["backbone"])) == pytest.approx(
        expected_knn, abs=1e-12)
    assert full_batch_loss(u, v, 0.3, block_elements=block_rows * len(v)) == pytest.approx(
        float(batch_infonce(u.double(), v.double(), 0.3)), rel=1e-12)


def test_metrics_without_labels_or_backbone_are_left_out(small_embeddings):
    train, heldout = small_embeddings
    only_pairs = {"u": heldout["u"], "v": heldout["v"]}
    assert set(compute_metrics(None, only_pairs, ks=(1, 3))) == {"retrieval_top1", "retrieval_recall3"}


@pytest.fixture(scope="module")
def checkpoint_evaluation(one_epoch_run, tmp_path_factory) -> dict:
    """``dist-cl-evaluate --checkpoint`` of the session's 2-rank epoch without the probe, as its JSON report."""
    report = tmp_path_factory.mktemp("tools") / "eval.json"
    assert evaluate_tool.main(["--checkpoint", str(one_epoch_run), "--no-probe", "--json", str(report)]) == 0
    return json.loads(report.read_text())


def test_evaluate_from_a_checkpoint_matches_evaluate_from_its_embeddings(checkpoint_evaluation,
                                                                         single_process_embeddings, tmp_path):
    from_embeddings = tmp_path / "b.json"
    assert evaluate_tool.main(["--embeddings", str(single_process_embeddings), "--no-probe",
                               "--json", str(from_embeddings)]) == 0
    a, b = checkpoint_evaluation, json.loads(from_embeddings.read_text())
    assert a["metrics"] == b["metrics"] and a["step"] == b["step"]


def test_missing_checkpoint_is_a_named_error(tmp_path, capsys):
    assert extract_tool.main(["--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "emb")]) == 2
    assert f"--checkpoint {tmp_path / 'nothing'} does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("name,image_size,batch", [("cifar100_32px", 32, 32), ("imagenet", 224, 1024)])
def test_cluster_configs_load_and_build_their_model(tmp_path, name, image_size, batch):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml", [f"data.path={tmp_path}"])
    assert (cfg.data.name, cfg.data.image_size, cfg.model.in_chans) == ("shards", image_size, 3)
    assert (cfg.train.optimizer, cfg.train.weight_decay, cfg.loss.tau) == ("lars", 1e-6, 0.1)
    assert (cfg.train.epochs, cfg.train.warmup_epochs, cfg.train.global_batch_size) == (100, 10, batch)
    assert cfg.train.lr == pytest.approx(0.075 * math.sqrt(batch), abs=1e-5)  # square-root scaling
    model = build_model(cfg, num_samples=4).eval()
    with torch.no_grad():
        u, v, tau = model(torch.zeros(2, 3, image_size, image_size), torch.zeros(2, 3, image_size, image_size))
    assert u.shape == v.shape == (2, cfg.model.embed_dim)


def test_bench_selection_ranks_prints_a_row_per_size_with_plans_identical_on_both_ranks():
    """Two ranks deal sc_global's k-means assignment and cells; the tool checks the plans agree."""
    proc = torchrun([str(ROOT / "tools" / "bench_selection_ranks.py"), "--sizes", "3000", "--dim", "16",
                     "--batch-size", "32", "--repeats", "1"])
    rows = [line.split() for line in proc.stdout.splitlines() if line.split()[:1] == ["2"]]
    assert len(rows) == 1 and rows[0][1:4] == ["3000", "16", "32"] and float(rows[0][4]) > 0


def test_logged_training_full_batch_loss_equals_a_float64_brute_force(one_epoch_run, single_process_embeddings):
    """train_full_batch_loss / train_retrieval_top1 (the paper's objective and its "original data" metric) are
    over all 1,437 training pairs at the evaluation views; recomputed here from the extracted embeddings."""
    logged = json.loads((one_epoch_run / "metrics.jsonl").read_text().splitlines()[-1])
    u = np.load(single_process_embeddings / "train" / "u.npy").astype(np.float64)
    v = np.load(single_process_embeddings / "train" / "v.npy").astype(np.float64)
    s = u @ v.T / 0.1
    lse_rows = np.log(np.exp(s - s.max(1, keepdims=True)).sum(1)) + s.max(1)
    lse_cols = np.log(np.exp(s - s.max(0, keepdims=True)).sum(0)) + s.max(0)
    expected = float(np.mean(lse_rows + lse_cols - 2 * np.diag(s)))
    assert logged["train_pairs"] == 1437
    assert logged["train_full_batch_loss"] == pytest.approx(expected, rel=1e-5)
    assert logged["train_retrieval_top1"] == pytest.approx(brute_force_recall(u, v, 1), abs=2 / 1437)


def test_training_metrics_beyond_train_pairs_use_one_fixed_subset():
    from dist_cl.evaluate.metrics import train_pair_indices

    np.testing.assert_array_equal(train_pair_indices(10, 10), np.arange(10))
    subset = train_pair_indices(1000, 100)
    assert len(np.unique(subset)) == 100 and subset.max() < 1000 and (np.diff(subset) > 0).all()
    np.testing.assert_array_equal(subset, train_pair_indices(1000, 100))


def test_two_rank_logged_metrics_equal_the_evaluation_of_the_saved_checkpoint(one_epoch_run, checkpoint_evaluation):
    """Each rank embeds a share of the evaluation; they must all use the checkpoint's (rank 0's) BatchNorm
    statistics, not the ones their last local step left."""
    logged = json.loads((one_epoch_run / "metrics.jsonl").read_text().splitlines()[-1])
    metrics = checkpoint_evaluation["metrics"]
    for key in ("retrieval_top1", "retrieval_recall5", "knn_top1"):
        assert logged[key] == metrics[key], key


def test_the_minimal_loop_draws_distinct_rows_afresh_for_a_lookup_and_one_batch_for_images(monkeypatch):
    """The throughput check's minimal loop pays the trainer's memory traffic: a free-embedding batch of
    distinct rows per step (one batch again and again would sit in cache); images one batch."""
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    gpu_check = importlib.import_module("gpu_check")
    lookup = build_dataset(load_config(ROOT / "configs" / "synthetic.yaml", ["data.num_samples=1000"]), "train")
    rows = gpu_check._minimal_batches(lookup, 64, 5, torch.device("cpu"))
    assert len(rows) == 5 and all(len(set(b.tolist())) == 64 and b.max() < 1000 for b in rows)
    assert len({tuple(b.tolist()) for b in rows}) == 5
    digits = build_dataset(load_config(ROOT / "configs" / "digits.yaml"), "train")
    images = gpu_check._minimal_batches(digits, 8, 3, torch.device("cpu"))
    assert images[0].shape == (8, *digits[0][0].shape) and images[0].is_floating_point()
    assert all(b is images[0] for b in images)


def test_the_throughput_check_takes_a_minimal_step_after_each_of_the_trainers_and_pairs_the_middle_epochs(
        monkeypatch, tmp_path, capsys):
    """The CPU dry run of gpu_check.sh's throughput rows (a broken one would waste a device call): 5 epochs of
    16 steps, each followed by a step of the minimal loop, and figures for the 3 epochs between the first and
    the last."""
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    gpu_check = importlib.import_module("gpu_check")
    updates, update = [], torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, *a, **k: updates.append(1) or update(self, *a, **k))
    overrides = ["data.num_samples=512", "model.embed_dim=16", "train.global_batch_size=32",
                 "selection.strategy=random", f"run.dir={tmp_path / 'run'}"]
    assert gpu_check.throughput(torch.device("cpu"), str(ROOT / "configs" / "synthetic.yaml"), overrides)
    assert len(updates) == 2 * 5 * 16
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(figures["ratios"]) == 3 and figures["ratio"] == pytest.approx(np.median(figures["ratios"]), abs=1e-3)
    assert figures["trainer_samples_s"] > 0 and figures["minimal_samples_s"] > 0


def test_the_throughput_check_charges_a_plan_computed_ahead_the_wait_the_trainer_alone_would_have_had(monkeypatch):
    """Under selection.overlap the minimal steps lengthen the epoch a plan is computed beside, hiding a wait: the
    trainer is charged what its own steps would have left of the plan's seconds, or the wait recorded if more."""
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    gpu_check = importlib.import_module("gpu_check")
    records = [{"train_seconds": 0.9, "selection/seconds": 1.0, "selection/wait_seconds": 1.0},
               {"train_seconds": 0.9, "selection/seconds": 1.25, "selection/wait_seconds": 0.0},  # hidden
               {"train_seconds": 0.8, "selection/seconds": 0.25, "selection/wait_seconds": 0.125},  # recorded
               {"train_seconds": 0.9}]  # random plans record no seconds
    minimal = [(10, 0.5), (10, 0.5), (10, 0.4), (10, 0.5)]
    pairs = gpu_check.paired_rates(records, minimal, batch_size=4)
    alone = 0.9 - 0.5  # the first epoch's own steps, beside which the second's plan was computed
    assert pairs == [(pytest.approx(40 / (0.9 - 0.5 + 1.25 - alone)), pytest.approx(40 / 0.5)),
                     (pytest.approx(40 / (0.8 - 0.4 + 0.125)), pytest.approx(40 / 0.4))]
