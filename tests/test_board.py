"""TensorBoard as a user reads it: each step once after a resume, the config and hparams, three x-axes, and
the picture of a selected batch."""

import json

from conftest import ROOT
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
from tensorboard.plugins.hparams import plugin_data_pb2

from dist_cl.cli import train as cli
from dist_cl.report.board import Board

SYNTHETIC = ["--config", str(ROOT / "configs" / "synthetic.yaml"), "train.epochs=3", "eval.every_epochs=1",
             "selection.strategy=random", "run.log_every_steps=1", "checkpoint.keep=5"]


def board(path) -> EventAccumulator:
    """What TensorBoard shows of ``path``: every event kept, a restarted writer's purge applied."""
    accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def scalar_steps(accumulator: EventAccumulator) -> dict[str, list[int]]:
    return {tag: [event.step for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_a_resumed_run_shows_each_step_once_on_every_axis(tmp_path):
    run_dir = tmp_path / "run"
    assert cli.main([*SYNTHETIC, f"run.dir={run_dir}"]) == 0
    uninterrupted = {axis: scalar_steps(board(run_dir / "tb" / axis)) for axis in ("", "by_epoch", "by_samples")}
    for name in ("step-00000012.pt", "step-00000012.pt.sha256"):  # as if killed after epoch 3's events
        (run_dir / "checkpoints" / name).unlink()
    assert cli.main([*SYNTHETIC, f"run.dir={run_dir}"]) == 0  # resumes at step 8 and trains epoch 3 again
    assert len(list((run_dir / "tb").glob("events.*"))) == 2
    for axis, steps in uninterrupted.items():
        resumed = scalar_steps(board(run_dir / "tb" / axis))
        assert all(len(set(s)) == len(s) for s in resumed.values()), axis
        # the epoch after a resume has no previous plan to compare with (EpochPlanner.previous is not saved)
        pair_repeat = f"{axis}/selection/pair_repeat".lstrip("/")
        assert resumed.pop(pair_repeat) == steps.pop(pair_repeat)[:-1]
        assert resumed == steps, axis
    assert uninterrupted[""]["train/loss"] == list(range(1, 13))
    assert uninterrupted["by_epoch"]["by_epoch/eval/retrieval_top1"] == [0, 1, 2, 3]
    assert uninterrupted["by_samples"]["by_samples/eval/retrieval_top1"] == [0, 8, 16, 24]  # B = 2


def test_the_scalars_of_a_call_are_one_event_per_axis_that_tensorboard_reads_tag_by_tag(tmp_path):
    """One event holds every scalar of a step (one record for TensorBoard's writer thread to checksum, not one
    a scalar); TensorBoard still shows each tag on its own, at the step, epoch and samples seen."""
    writer = Board(tmp_path, 0, 0, batch_size=4)
    writer.scalars({"train/loss": 1.5, "train/lr": 0.25}, step=3)
    writer.scalars({"eval/retrieval_top1": 0.75}, step=6, epoch=2)
    writer.close()
    events = board(tmp_path)
    assert {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]} == {
        "train/loss": [(3, 1.5)], "train/lr": [(3, 0.25)], "eval/retrieval_top1": [(6, 0.75)]}
    for axis, x in (("by_epoch", 2), ("by_samples", 24)):
        assert [(e.step, e.value) for e in board(tmp_path / axis).Scalars(f"{axis}/eval/retrieval_top1")] == [(x, 0.75)]
    [path] = tmp_path.glob("events.*")
    loaded = LegacyEventFileLoader(str(path)).Load()
    summaries = [[value.tag for value in e.summary.value] for e in loaded if e.HasField("summary")]
    assert summaries == [["train/loss", "train/lr"], ["eval/retrieval_top1"]]


def test_config_text_and_hparams_are_in_the_event_files(tmp_path):
    run_dir = tmp_path / "run"
    assert cli.main([*SYNTHETIC, f"run.dir={run_dir}"]) == 0
    events = board(run_dir / "tb")
    [text] = events.Tensors("config/text_summary")
    assert "global_batch_size: 2" in text.tensor_proto.string_val[0].decode()
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["train.epochs"].number_value == 3  # the default is 30
    assert start.hparams["data.name"].string_value == "synthetic"
    assert "selection.strategy" not in start.hparams  # random, the default
    assert "train.lr" in start.hparams and "loss.tau" in start.hparams  # synthetic.yaml changes them
    assert "train.global_batch_size" in start.hparams and "seed" not in start.hparams  # seed 0 is the default
    assert not any(key.startswith(("run.", "checkpoint.")) for key in start.hparams)  # where, not what
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} >= {"eval/retrieval_top1", "train/full_batch_loss"}
    assert "train/tau" not in events.Tags()["scalars"] and "train/skipped_steps" not in events.Tags()["scalars"]


def test_an_evaluation_shows_a_selected_batch_as_a_grid_of_its_size_with_labels(one_epoch_run):
    run_dir = one_epoch_run  # the default digits config, B = 64 over 2 ranks, evaluated after its epoch
    events = board(run_dir / "tb")
    [image] = events.Images("selection/batch")
    assert (image.width, image.height) == (8 * (8 + 2) + 2, 8 * (8 + 2) + 2)  # 64 8x8 digits, 8 a row, padding 2
    [labels] = events.Tensors("selection/batch_labels/text_summary")
    table = labels.tensor_proto.string_val[0].decode().splitlines()[2:]
    assert len(table) == 8 and all(row.count("|") == 9 for row in table)
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["selection/lift"] for r in epochs if r["kind"] == "epoch"] == [1.0]  # random's lift, by definition
