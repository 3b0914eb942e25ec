"""Image–caption training end to end: a tiny captioned set of coloured shapes, made into img2dataset-layout shards
by dist-cl-make-shards, trained by 2 torchrun ranks with a timm image tower and an open_clip text tower, resumed
bitwise equal after a SIGKILL, and evaluated by image<->text retrieval on the held-out pairs."""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import torchrun, train_cmd
from PIL import Image
from test_captions import COLOURS, SHAPES, shape_image
from test_train_e2e import agent_at_checkpoint, assert_same_weights, final_model, kill_a_worker_then_finish

from dist_cl.cli import make_shards
from dist_cl.cli.evaluate import main as evaluate_main
from dist_cl.cli.train import main as train_main
from dist_cl.config import load_config
from dist_cl.data import build_dataset
from dist_cl.data.shards import INDEX_NAME
from dist_cl.evaluate.embed import embed_indices
from dist_cl.evaluate.metrics import image_text_recalls, zero_shot_top1
from dist_cl.learn.models import build_model

POSITIONS = {"train": ((0, 0), (3, 0), (0, 3), (3, 3)), "heldout": ((1, 2), (2, 1))}
"""Where each shape sits on its 32 px canvas, by split: the held-out images are the same captions drawn elsewhere."""
STEPS_PER_EPOCH = 4  # 36 training pairs // global batch 8


def captioned_shapes(root: Path, split: str) -> None:
    """Every shape in every colour at the split's positions, captioned "a red circle", labelled by shape."""
    for (shape, colour), (dx, dy) in itertools.product(itertools.product(SHAPES, COLOURS), POSITIONS[split]):
        image = Image.new("RGB", (32, 32), (255, 255, 255))
        image.paste(shape_image(shape, colour), (dx * 2, dy * 2))
        path = root / f"{shape}_{colour}_{dx}{dy}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        path.with_suffix(".txt").write_text(f"a {colour} {shape}")
        path.with_suffix(".cls").write_text(str(SHAPES.index(shape)))


@pytest.fixture(scope="module")
def caption_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("captions")
    for split in POSITIONS:
        captioned_shapes(root / "photos" / split, split)
        assert make_shards.main(["--source", "captions", "--input", str(root / "photos" / split),
                                 "--out", str(root / "shards" / split), "--samples-per-shard", "16"]) == 0
        index = json.loads((root / "shards" / split / INDEX_NAME).read_text())
        index["dist_cl"]["classes"] = list(SHAPES)  # names for the labels: zero-shot prompts
        (root / "shards" / split / INDEX_NAME).write_text(json.dumps(index))
    return root / "shards"


def clip_run(shards: Path, *overrides: str) -> list[str]:
    return ["data.name=captions", f"data.path={shards}", "data.image_size=16", "model.in_chans=3",
            "model.backbone=resnet10t", "model.backbone_kwargs={channels: [8, 8, 16, 16]}", "model.embed_dim=16",
            "model.proj_hidden_dim=0", "model.text_tower=RN50", "model.text_cfg={width: 64, layers: 1, heads: 2}",
            "loss.tau=0.07", "loss.learnable_tau=true", "train.global_batch_size=8", "train.lr=0.003",
            "train.warmup_epochs=0",
            "data.augment.crop_scale_min=0.8", "data.augment.color_jitter_prob=0", "data.augment.grayscale_prob=0",
            "checkpoint.every_steps=2", "checkpoint.keep=40", "eval.probe=true", *overrides]


STRATEGIES = {"random": ("selection.strategy=random",),
              "sc_global": ("selection.strategy=sc_global", "selection.warmup_epochs=0")}


@pytest.fixture(scope="module")
def reference_clip_runs(tmp_path_factory, caption_shards):
    """Uninterrupted 2-rank runs of 6 epochs, evaluated before training and after it, one per strategy."""
    runs = {}

    def get(strategy: str) -> Path:
        if strategy not in runs:
            runs[strategy] = tmp_path_factory.mktemp(f"clip_{strategy}")
            torchrun(train_cmd(runs[strategy], *clip_run(caption_shards, "train.epochs=6", "eval.every_epochs=6",
                                                         *STRATEGIES[strategy])))
        return runs[strategy]

    return get


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_image_text_training_resumes_bitwise_equal_after_a_sigkill(reference_clip_runs, caption_shards, tmp_path,
                                                                   strategy):
    """The restarted run ends where the uninterrupted one does. With sc_global the bank holds both towers' outputs
    (u = image, v = caption) and comes back with the weights and the plan made from it; a random run keeps none."""
    reference = reference_clip_runs(strategy)
    overrides = clip_run(caption_shards, "train.epochs=6", "eval.every_epochs=6", *STRATEGIES[strategy])
    kill_a_worker_then_finish(agent_at_checkpoint(tmp_path, 10, *overrides, torchrun_args=("--max-restarts=1",)))
    final = final_model(tmp_path)
    assert_same_weights(final, final_model(reference))
    assert torch.equal(final["bank"]["v"], final_model(reference)["bank"]["v"])
    assert "text_tower.token_embedding.weight" in final["model"]


def test_held_out_image_text_retrieval_rises_above_the_untrained_models(reference_clip_runs):
    """The step-0 evaluation is the untrained model's; chance is 1/18 (18 held-out pairs, each caption twice)."""
    lines = [json.loads(line) for line in (reference_clip_runs("random") / "metrics.jsonl").read_text().splitlines()]
    untrained, trained = [r for r in lines if r["kind"] == "eval"]
    assert (untrained["step"], trained["step"]) == (0, 6 * STEPS_PER_EPOCH)
    for direction in ("image_to_text", "text_to_image"):
        assert {f"{direction}_r{k}" for k in (1, 5, 10)} <= trained.keys()
    assert trained["image_to_text_r1"] > untrained["image_to_text_r1"]
    assert trained["text_to_image_r1"] > untrained["text_to_image_r1"]
    assert 0.0 <= trained["knn_top1"] <= 1.0  # on the image tower's features, by shape
    assert 0.0 <= trained["zero_shot_top1"] <= 1.0  # "a picture of circle" against the images


def test_zero_shot_top1_picks_each_images_nearest_class_prompt():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.1]])
    prompts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert zero_shot_top1(images, prompts, np.array([0, 1, 0, 1])) == 0.75  # [0.6, 0.8] is nearer class 1


def test_a_text_tower_without_captions_is_refused_before_training(tmp_path, capsys):
    code = train_main([f"run.dir={tmp_path}", "model.text_tower=RN50", "model.text_cfg={width: 64, heads: 2}"])
    assert code == 2
    assert "model.text_tower=RN50 embeds captions, and data.name=digits has none" in capsys.readouterr().err


def test_image_text_recalls_count_each_direction_against_brute_force():
    generator = torch.Generator().manual_seed(0)
    images, texts = torch.randn(12, 4, generator=generator), torch.randn(12, 4, generator=generator)
    values = image_text_recalls(images, texts)
    # one float64 score matrix: a float32 row product and a float32 dot product may round the partner's
    # score apart, and the partner would then outrank itself
    scores = images.double() @ texts.double().T
    for k in (1, 5, 10):
        ranks = (scores > scores.diag()[:, None]).sum(1)  # keys scoring above the partner, per image
        assert values[f"image_to_text_r{k}"] == pytest.approx(float((ranks < k).double().mean()))
        ranks = (scores.T > scores.diag()[:, None]).sum(1)
        assert values[f"text_to_image_r{k}"] == pytest.approx(float((ranks < k).double().mean()))


def test_clean_embeddings_of_caption_pairs_are_the_image_and_the_caption(caption_shards):
    """Unaugmented views (extraction, kNN): tower a embeds the clean image, tower b the caption's tokens."""
    cfg = load_config(None, clip_run(caption_shards))
    dataset = build_dataset(cfg, "heldout")
    model = build_model(cfg, len(dataset))
    u, v = embed_indices(model, dataset, np.arange(3), rank=0, world_size=1, device=torch.device("cpu"))
    with torch.no_grad():
        model.eval()
        images = torch.stack([dataset.clean_item(i) for i in range(3)])
        tokens = torch.stack([dataset.tokens(i) for i in range(3)])
        assert torch.allclose(u, model.embed(images, side="a")) and torch.allclose(v, model.embed(tokens, side="b"))


def test_the_emoji_config_reads_caption_shards_at_its_text_towers_context_length(caption_shards):
    config = Path(__file__).resolve().parent.parent / "configs" / "emoji_clip.yaml"
    cfg = load_config(config, [f"data.path={caption_shards}"])
    image, tokens, _ = build_dataset(cfg, "train")[0]
    assert image.shape == (3, cfg.data.image_size, cfg.data.image_size)
    assert tokens.shape == (cfg.model.text_cfg["context_length"],) and tokens.dtype == torch.int64


def test_the_evaluate_command_reports_the_image_text_recalls_the_trainer_logged(reference_clip_runs, tmp_path):
    run = reference_clip_runs("random")
    assert evaluate_main(["--checkpoint", str(run / "checkpoints" / "latest"),
                          "--json", str(tmp_path / "eval.json")]) == 0
    reported = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    logged = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"][-1]
    for key in ("image_to_text_r1", "text_to_image_r1", "image_to_text_r10", "text_to_image_r10", "knn_top1",
                "probe_top1"):
        assert reported[key] == pytest.approx(logged[key]), key
