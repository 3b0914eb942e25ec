"""The comparison of strategies (dist_cl.report.comparison, run by tools/compare_strategies.py) and its test of
"converges faster": the training full-batch loss at equal steps."""

import json
import shlex
import subprocess
import sys

import pytest
from conftest import ROOT

from dist_cl.report import comparison as compare


def run(losses: list[float], steps_per_epoch: int = 10) -> dict:
    epochs = list(range(0, 3 * len(losses), 3))
    return {"epochs": epochs, "step": {e: e * steps_per_epoch for e in epochs},
            "train_fbl": dict(zip(epochs, losses))}


REFERENCE = [run([10, 8, 6, 5, 4]), run([10, 8.2, 6.2, 5.2, 4.2])]  # steps 0..120, final mean 4.1


def test_below_the_reference_beyond_the_seed_spread_from_the_first_third_on_passes():
    faster = [run([10, 7, 5, 4, 3.5]), run([10, 7.1, 5.1, 4.1, 3.6])]
    # step 60: 5.05 <= 6.1 - 0.14; it first reaches the reference's final 4.1 at step 90 of 120
    assert compare.against_reference(faster, REFERENCE) == ("yes", "0.75")


def test_within_the_seed_spread_fails_at_the_first_such_evaluation():
    close = [run([10, 7, 5.95, 4, 3.5]), run([10, 7.1, 6.05, 4.1, 3.6])]
    verdict, _ = compare.against_reference(close, REFERENCE)
    assert verdict.startswith("no (step 60: 6.000 vs 6.100")


def test_a_strategy_whose_evaluations_end_before_the_compared_range_is_not_applicable():
    short = [run([10, 9], steps_per_epoch=2), run([10, 9.1], steps_per_epoch=2)]  # ends at step 6
    assert compare.against_reference(short, REFERENCE) == ("n/a (ends at step 6)", "never")


def test_equal_steps_are_interpolated_on_the_reference_curve():
    """Evaluations at steps 0, 45, 90 against a reference evaluated every 30 steps."""
    offset = [run([10, 5.0, 4.0], steps_per_epoch=15), run([10, 5.0, 4.0], steps_per_epoch=15)]
    verdict, share = compare.against_reference(offset, REFERENCE)
    # step 45 is past the first third (40): the reference there is 7.1, halfway between 8.1 and 6.1
    assert (verdict, share) == ("yes", "0.75")


def test_a_run_is_summarised_from_its_metrics_jsonl_alone(tmp_path):
    """No train.log, no TensorBoard: evaluation lines give the metrics, epoch lines the times and figures
    (averaged over the loss-aware epochs, the ones with a lift); a line cut by a kill is ignored."""
    lines = [
        {"kind": "eval", "epoch": 0, "step": 0, "loss": None, "knn_top1": 0.1, "train_full_batch_loss": 9.0},
        {"kind": "epoch", "epoch": 1, "step": 10, "steps": 10, "train_seconds": 4.0,
         "selection/seconds": 0.01, "selection/share": 0.002, "selection/label_purity": 0.2},
        {"kind": "epoch", "epoch": 2, "step": 20, "steps": 10, "train_seconds": 6.0, "selection/seconds": 1.0,
         "selection/share": 0.1, "selection/lift": 1.5, "selection/label_purity": 0.5},
        {"kind": "eval", "epoch": 2, "step": 20, "loss": 3.0, "knn_top1": 0.7, "train_full_batch_loss": 5.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"kind": "ep')
    summary = compare.summarise_run(tmp_path, epochs=2, batch_size=8)
    assert summary["knn"] == {0: 0.1, 2: 0.7} and summary["train_fbl"] == {0: 9.0, 2: 5.0}
    assert (summary["final_step"], summary["samples"], summary["step"]) == (20, 160, {0: 0, 2: 20})
    assert (summary["train_s"], summary["epoch_s"]) == (10.0, 5.0)
    assert (summary["lift"], summary["purity"], summary["selection_s"], summary["share"]) == (1.5, 0.5, 1.0, 0.1)
    assert summary["loss_aware_epochs"] == 1
    assert compare.summarise_run(tmp_path, epochs=3, batch_size=8) is None  # not finished


def test_strategy_entries_take_several_overrides_each():
    entries = compare.parse_entries("random,hcl:random:loss.name=hcl,loss.hcl_tau_plus=0.1,loss.hcl_beta=1.0,"
                                    "g4:sc_global:selection.options.group_size=4,sc_global")
    assert [(e.label, e.strategy, e.overrides) for e in entries] == [
        ("random", "random", []),
        ("hcl", "random", ["loss.name=hcl", "loss.hcl_tau_plus=0.1", "loss.hcl_beta=1.0"]),
        ("g4", "sc_global", ["selection.options.group_size=4"]),
        ("sc_global", "sc_global", []),
    ]
    with pytest.raises(SystemExit, match="overrides follow a LABEL:STRATEGY:key=value entry"):
        compare.parse_entries("random,loss.name=hcl")


def test_a_figure_one_run_lacks_is_averaged_over_the_runs_that_measured_it():
    """A run by an older trainer wrote no epoch lines: its seconds are NaN, and the table shows the others'."""
    runs = [{"epoch_s": float("nan"), "share": float("nan")}, {"epoch_s": 4.0, "share": 0.1},
            {"epoch_s": 6.0, "share": 0.3}]
    assert compare.measured_mean(runs, "epoch_s", ".1f") == "5.0"
    assert compare.measured_mean(runs, "share", ".3f") == "0.200"
    assert compare.measured_mean(runs[:1], "epoch_s", ".1f") == "-"


def test_a_relative_config_is_the_one_beside_where_the_tool_was_started(tmp_path):
    """The runs start in the repository root, so the tool hands them the config's absolute path."""
    (tmp_path / "my.yaml").write_text((ROOT / "configs" / "synthetic.yaml").read_text())
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "compare_strategies.py"), "--dry-run",
                           "--config", "my.yaml", "--nproc", "1", "--epochs", "1", "--seeds", "0", "--strategies",
                           "random", "--out", str(tmp_path / "out")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    commands = [shlex.split(line) for line in proc.stdout.splitlines()]
    [command] = commands
    assert command[command.index("--config") + 1] == str(tmp_path / "my.yaml")


def fake_run(directory, commit: str | None, **extra: float) -> None:
    """A finished two-epoch run's records: metrics.jsonl (with the metrics ``extra`` at every evaluation) and
    run_info.json with the trainer's code record (none where ``commit`` is None: a record from before
    run_info.json named one)."""
    directory.mkdir(parents=True)
    lines = [{"kind": "eval", "epoch": e, "step": 10 * e, "train_full_batch_loss": 9.0 - e, "retrieval_top1": 0.1 * e,
              "knn_top1": 0.2 * e, **extra} for e in (0, 1, 2)]
    (directory / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    code = {"version": "0.1.0", "commit": commit, "dirty": False, "diff_sha256": None}
    (directory / "run_info.json").write_text(json.dumps({"code": code, "resumes": []} if commit else {"wall_s": 1.0}))


A, B = "a" * 40, "b" * 40


def test_runs_of_different_commits_are_refused_unless_allowed_and_then_named(tmp_path):
    fake_run(tmp_path / "random-s0", A)
    fake_run(tmp_path / "random-s1", B)
    comparison = compare.collect(tmp_path, compare.parse_entries("random"), [0, 1], epochs=2, batch_size=8)
    with pytest.raises(compare.MixedCodeError, match="2 different code states") as refused:
        compare.check_one_code_state(comparison)
    assert f"- {A[:12]}: random-s0\n- {B[:12]}: random-s1" in str(refused.value)
    table = compare.results_table(comparison, "random", table_every=1, table_epochs=set())
    assert table.startswith("Code: these runs ran different code")
    assert f"- {A[:12]}: random-s0\n- {B[:12]}: random-s1\n" in table


def test_runs_of_one_commit_are_aggregated_and_the_table_names_it(tmp_path):
    fake_run(tmp_path / "random-s0", A)
    fake_run(tmp_path / "random-s1", A)
    comparison = compare.collect(tmp_path, compare.parse_entries("random"), [0, 1], epochs=2, batch_size=8)
    compare.check_one_code_state(comparison)
    table = compare.results_table(comparison, "random", table_every=1, table_epochs=set())
    assert table.startswith(f"Code: {A[:12]} for all 2 runs")


def test_tables_show_the_metrics_their_runs_measured_and_no_other(tmp_path):
    fake_run(tmp_path / "images" / "random-s0", A)
    fake_run(tmp_path / "captions" / "random-s0", A, image_to_text_r1=0.25, text_to_image_r1=0.5, zero_shot_top1=0.125)
    tables = {name: compare.results_table(compare.collect(tmp_path / name, compare.parse_entries("random"), [0],
                                                          epochs=2, batch_size=8), "random", 1, set())
              for name in ("images", "captions")}
    for name in ("held-out image→text R@1", "held-out text→image R@1", "zero-shot top-1"):
        assert name not in tables["images"] and f"{name} per evaluated epoch" in tables["captions"]
    assert "corrupted R@1" not in tables["images"] + tables["captions"]
    header, _, row = tables["captions"].split("| strategy | seeds |")[1].splitlines()[:3]
    assert row.split("|")[-8:-3] == [" 0.200 ", " 0.400 ", " 0.250 ", " 0.500 ", " 0.125 "]  # held-out R@1 .. zero-shot


def test_a_run_that_recorded_no_commit_is_an_unknown_state_refused_beside_a_known_one(tmp_path):
    fake_run(tmp_path / "random-s0", A)
    fake_run(tmp_path / "random-s1", None)
    comparison = compare.collect(tmp_path, compare.parse_entries("random"), [0, 1], epochs=2, batch_size=8)
    with pytest.raises(compare.MixedCodeError, match="- unknown: random-s1 \\(run_info.json names no commit"):
        compare.check_one_code_state(comparison)


def test_the_recorded_runs_that_predate_commits_are_aggregated_as_one_unknown_state():
    """docs/records: runs recorded before run_info.json named a commit (RESULTS re-makes its tables from them)."""
    comparison = compare.collect(ROOT / "docs" / "records" / "compare-fmnist-hcl",
                                 compare.parse_entries("random,sc_global"), [0, 1, 2], epochs=20, batch_size=32)
    compare.check_one_code_state(comparison)
    assert compare.code_lines(comparison)[0].startswith("Code: unknown for all 6 runs: their run_info.json names "
                                                        "no commit")


def test_the_tool_refuses_mixed_commits_by_name_and_tabulates_them_with_the_flag(tmp_path):
    fake_run(tmp_path / "random-s0", A)
    fake_run(tmp_path / "random-s1", B)
    command = [sys.executable, str(ROOT / "tools" / "compare_strategies.py"), "--aggregate-only", "--config",
               str(ROOT / "configs" / "synthetic.yaml"), "--epochs", "2", "--seeds", "0,1", "--strategies", "random",
               "--out", str(tmp_path)]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and not (tmp_path / "results.md").exists()
    assert f"- {A[:12]}: random-s0\n- {B[:12]}: random-s1" in refused.stderr and "--mixed-commits" in refused.stderr
    allowed = subprocess.run([*command, "--mixed-commits"], capture_output=True, text=True, timeout=120)
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert f"- {A[:12]}: random-s0\n- {B[:12]}: random-s1" in (tmp_path / "results.md").read_text()
