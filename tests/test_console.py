"""What a run prints and keeps: throttled epoch lines on the terminal, every line in train.log, the banner,
the end-of-run summary and the "already complete" message."""

import json
import logging

from conftest import ROOT

from dist_cl.cli import train as cli
from dist_cl.report.console import Throttle, best_of, summary

TINY = ["--config", str(ROOT / "configs" / "synthetic.yaml"), "train.epochs=3", "eval.every_epochs=2",
        "selection.strategy=random"]


def record(throttled: bool) -> logging.LogRecord:
    item = logging.LogRecord("dist_cl", logging.INFO, __file__, 1, "line", None, None)
    if throttled:
        item.throttled = True
    return item


def test_throttle_lets_one_marked_line_through_per_window_and_every_other_line():
    throttle = Throttle(3600.0)
    assert [throttle.filter(record(t)) for t in (True, True, False, True, False)] == [True, False, True, False, True]
    assert all(Throttle(0.0).filter(record(True)) for _ in range(3))


def test_best_takes_the_lowest_loss_and_the_highest_of_the_rest():
    evaluations = [
        {"kind": "eval", "epoch": 0, "step": 0, "loss": None, "knn_top1": 0.5, "full_batch_loss": 9.0},
        {"kind": "eval", "epoch": 2, "step": 8, "loss": 1.0, "knn_top1": 0.9, "full_batch_loss": 5.0,
         "selection/lift": 2.0},
        {"kind": "eval", "epoch": 4, "step": 16, "loss": 0.5, "knn_top1": 0.8, "full_batch_loss": 6.0},
    ]
    assert best_of(evaluations) == {"knn_top1": (0.9, 2), "full_batch_loss": (5.0, 2)}


def test_summary_reports_final_and_best_evaluation_and_the_outputs(tmp_path):
    lines = [{"kind": "eval", "epoch": 0, "knn_top1": 0.5}, {"kind": "epoch", "epoch": 1, "loss": 3.0},
             {"kind": "eval", "epoch": 2, "knn_top1": 0.75}, {"kind": "eval", "epoch": 3, "knn_top1": 0.625}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    got = summary(tmp_path / "metrics.jsonl", tmp_path, 3, 12, 3725.0, tmp_path / "step-00000012.pt")
    assert got == ["done: 3 epochs, 12 steps; this attempt took 1:02:05",
                   "final (epoch 3): knn_top1 0.6250",
                   "best: knn_top1 0.7500 (epoch 2)",
                   f"outputs in {tmp_path}: checkpoint step-00000012.pt, metrics.jsonl, train.log; "
                   f"TensorBoard: tensorboard --logdir {tmp_path / 'tb'}"]


def test_terminal_is_throttled_while_train_log_keeps_every_line(tmp_path, capsys):
    assert cli.main([*TINY, f"run.dir={tmp_path / 'run'}", "run.print_every_s=3600"]) == 0
    terminal = capsys.readouterr().err
    kept = (tmp_path / "run" / "train.log").read_text()
    for epoch in (1, 2, 3):
        assert f"INFO epoch {epoch}/3 step {4 * epoch} |" in kept
    assert "INFO epoch 1/3 step 4 |" in terminal and "INFO epoch 3/3 step 12 |" in terminal
    assert "INFO epoch 2/3 step 8 |" not in terminal  # within the hour of epoch 1's line
    assert "eval epoch 2/3 step 8 |" in terminal and "eval epoch 3/3 step 12 |" in terminal
    assert "saved checkpoint" in kept and "saved checkpoint" not in terminal
    assert "run synthetic in" in terminal and "selection random | global batch 2 (2 a rank) | 3 epochs" in terminal
    assert "done: 3 epochs, 12 steps" in terminal and "best: train_full_batch_loss" in terminal


def test_rerunning_a_finished_run_says_it_is_complete_and_how_to_go_on(tmp_path, capsys):
    args = [*TINY, f"run.dir={tmp_path / 'run'}"]
    assert cli.main(args) == 0
    capsys.readouterr()
    assert cli.main(args) == 0
    assert (f"run already complete at epoch 3/3 (step 12) in {tmp_path / 'run'}: raise train.epochs to train on, "
            "or set a new run.dir to start again") in capsys.readouterr().err
