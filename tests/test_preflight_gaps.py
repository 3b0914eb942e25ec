"""The smaller gaps of issue 28, each refused by name before training where it can be, or handled where it
cannot: a stop during an epoch's last step."""

import json
import math

import pytest
from conftest import FAST, ROOT, torchrun, train_cmd

from dist_cl.runtime.checkpoint import load_checkpoint

SYNTHETIC = ("--config", str(ROOT / "configs" / "synthetic.yaml"), "selection.strategy=random")
"""4 steps an epoch: FAST makes checkpoints at steps 4, 5 and 8."""


def epoch_records(run_dir) -> list[tuple[int, int, float]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["epoch"], r["steps"], r["loss"]) for r in lines if r["kind"] == "epoch"]


@pytest.mark.parametrize("step", [3, 7], ids=["epoch-end", "run-end"])
def test_a_stop_during_an_epochs_last_step_is_honoured_at_the_epochs_end_with_its_record(reference_runs, tmp_path,
                                                                                          step):
    """Rank 0 alone is sent SIGTERM during the last step of epoch 0 (step 3) or of the run (step 7): the epoch
    is recorded and saved as it ends, then the run stops (or, at the run's end, finishes); resumed, it writes
    no empty epoch record (steps 0, loss NaN) and ends with the uninterrupted run's weights."""
    reference = reference_runs(*SYNTHETIC)
    script = str(ROOT / "tests" / "scripts" / "sigterm_at_step.py")
    first = torchrun([script, str(step), *train_cmd(tmp_path, *FAST, *SYNTHETIC)[1:]], check=False)
    assert (first.returncode != 0) == (step == 3), first.stderr[-3000:]
    if step == 3:
        torchrun(train_cmd(tmp_path, *FAST, *SYNTHETIC))
    records = epoch_records(tmp_path)
    assert [(epoch, steps) for epoch, steps, _ in records] == [(1, 4), (2, 4)]
    assert all(math.isfinite(loss) for _, _, loss in records)
    assert records == epoch_records(reference)
    if step == 3:
        assert first.stderr.count("preempted: stopped at the end of epoch 1 (step 4)") == 2, first.stderr[-3000:]
    final, expected = load_checkpoint(tmp_path)[0], load_checkpoint(reference)[0]
    assert final["counters"] == expected["counters"]
    assert all(final["model"][key].equal(expected["model"][key]) for key in expected["model"])


@pytest.mark.parametrize("shared", [True, False], ids=["shared-store", "store-per-round"])
def test_an_elastic_job_on_torchruns_shared_store_is_refused_naming_the_variable(monkeypatch, tmp_path, shared):
    """torchrun --nnodes=1:2 restarts its workers when a second node joins, without spending a restart: on
    torchrun's shared store they would wait for each other under stale names. Refused before the first step
    (here a dry run of one rank, which such a job grows out of); with the variable set it runs."""
    if shared:
        monkeypatch.delenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", raising=False)
    else:
        monkeypatch.setenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    proc = torchrun([*train_cmd(tmp_path, *SYNTHETIC), "--dry-run"], nproc=1, check=False,
                    extra=["--nnodes=1:2", "--rdzv-conf=last_call_timeout=1"])
    message = ("rank 0: an elastic job (torchrun --nnodes=1:2) needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in every "
               "torchrun's environment")
    assert (message in proc.stderr) == shared, proc.stderr[-3000:]
    assert (proc.returncode == 0) != shared, proc.stderr[-3000:]
