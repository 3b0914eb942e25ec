"""run_info.json (dist_cl.report.run_info): the code a run ran, its libraries and machine, recorded at its start
and at each resume."""

import json
import subprocess

import numpy as np
import pytest
import torch
from conftest import ROOT

from dist_cl.cli import train as cli
from dist_cl.report import run_info


def git(repo, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=test", "-c", "user.email=test@example.com",
                           *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def checkout(tmp_path):
    """A git repository with one commit of a package directory."""
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "module.py").write_text("x = 1\n")
    git(repo, "init", "-q")
    git(repo, "add", "pkg")
    git(repo, "commit", "-q", "-m", "first")
    return repo


def test_a_clean_checkout_records_its_commit_and_no_changes(checkout):
    code = run_info.code_state(checkout / "pkg")
    assert code["commit"] == git(checkout, "rev-parse", "HEAD")
    assert (code["dirty"], code["diff_sha256"]) == (False, None)
    assert code["version"] == run_info.dist_cl.__version__


def test_a_dirty_checkout_says_so_and_hashes_what_differs(checkout):
    (checkout / "pkg" / "module.py").write_text("x = 2\n")
    edited = run_info.code_state(checkout / "pkg")
    assert edited["commit"] == git(checkout, "rev-parse", "HEAD") and edited["dirty"] is True
    (checkout / "pkg" / "module.py").write_text("x = 3\n")
    assert run_info.code_state(checkout / "pkg")["diff_sha256"] not in (None, edited["diff_sha256"])
    (checkout / "pkg" / "module.py").write_text("x = 1\n")
    (checkout / "notes.txt").write_text("an untracked file outside the package\n")
    untracked = run_info.code_state(checkout / "pkg")
    assert untracked["dirty"] is True and untracked["diff_sha256"] not in (None, edited["diff_sha256"])


@pytest.mark.parametrize("where", ["outside any checkout", "untracked inside a checkout"])
def test_an_installed_copy_records_no_commit_and_says_why(checkout, tmp_path, where):
    source = tmp_path / "site-packages" / "pkg" if where == "outside any checkout" else checkout / "venv" / "pkg"
    source.mkdir(parents=True)
    (source / "module.py").write_text("x = 1\n")
    code = run_info.code_state(source)
    assert (code["commit"], code["dirty"], code["diff_sha256"]) == (None, None, None)
    assert code["commit_note"].startswith(f"{source} is not tracked by a git checkout")
    assert run_info.code_label(code) == f"dist_cl {code['version']} outside git"


def test_a_resume_keeps_the_start_and_adds_its_own_record_and_a_start_over_replaces_them(checkout, tmp_path):
    run = tmp_path / "run"
    run_info.record_start(run, step=0, epoch=0, source=checkout / "pkg")
    run_info.update_run_info(run, {"wall_s": 12.0})  # what tools/compare_strategies.py adds
    first = run_info.read_run_info(run)
    (checkout / "pkg" / "module.py").write_text("x = 2\n")
    git(checkout, "commit", "-q", "-a", "-m", "second")
    run_info.record_start(run, step=40, epoch=2, source=checkout / "pkg")
    resumed = run_info.read_run_info(run)
    assert {k: resumed[k] for k in first if k != "resumes"} == {k: first[k] for k in first if k != "resumes"}
    [resume] = resumed["resumes"]
    assert (resume["step"], resume["epoch"], resume["code"]["commit"]) == (40, 2, git(checkout, "rev-parse", "HEAD"))
    assert run_info.code_labels(resumed) == [first["code"]["commit"][:12], resume["code"]["commit"][:12]]
    run_info.record_start(run, step=0, epoch=0, source=checkout / "pkg")
    started_over = run_info.read_run_info(run)
    assert started_over["resumes"] == [] and started_over["code"] == resume["code"]
    assert started_over["wall_s"] == 12.0


def test_a_record_without_code_is_unknown():
    assert run_info.code_labels({"wall_s": 3.0}) == [run_info.UNKNOWN]
    resumed_by_a_newer_trainer = {"resumes": [{"code": {"version": "0.1.0", "commit": "ab" * 20, "dirty": False,
                                                        "diff_sha256": None}}]}
    assert run_info.code_labels(resumed_by_a_newer_trainer) == [run_info.UNKNOWN, "ab" * 6]


def test_a_training_run_records_its_commit_versions_and_machine_at_its_start_and_at_a_resume(tmp_path,
                                                                                             one_torch_thread):
    """A run of the synthetic config (4 steps an epoch) in this process, then a resume to a third epoch."""
    synthetic = ["--config", str(ROOT / "configs" / "synthetic.yaml"), "eval.every_epochs=0",
                 "selection.strategy=random", f"run.dir={tmp_path}"]
    for epochs in (2, 3):
        assert cli.main([*synthetic, f"train.epochs={epochs}"]) == 0
    info = json.loads((tmp_path / "run_info.json").read_text())
    commit = info["code"]["commit"]
    # others may commit to this checkout meanwhile: the recorded commit is HEAD or one of its ancestors
    assert subprocess.run(["git", "-C", str(ROOT), "merge-base", "--is-ancestor", commit, "HEAD"]).returncode == 0
    assert isinstance(info["code"]["dirty"], bool) and (info["code"]["diff_sha256"] is None) != info["code"]["dirty"]
    assert info["versions"]["torch"] == torch.__version__ and info["versions"]["numpy"] == np.__version__
    try:
        import faiss
    except ImportError:  # sc_global's k-means; the record says null where it is not installed
        faiss = None
    assert info["versions"]["faiss"] == (faiss.__version__ if faiss is not None else None)
    assert info["machine"]["threads"] >= 1 and info["machine"]["cpu"]
    [resume] = info["resumes"]
    assert (resume["step"], resume["epoch"]) == (8, 2) and resume["code"]["commit"]
