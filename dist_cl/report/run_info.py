"""A run's run_info.json: the code it ran (commit, uncommitted changes, package version), the libraries and the
machine, so a reported number can be traced to what produced it, and runs of different code are not averaged.

Rank 0 records them where training starts (``record_start``, called by dist_cl.report.training):

- a run that starts at step 0 writes ``code``, ``versions``, ``machine`` and ``started_at``, and an empty
  ``resumes``: the weights were made by this code, so an earlier start's record in the same run directory (a
  start over) is replaced;
- a resumed run keeps the first start's record and appends ``{step, epoch, started_at, code, versions,
  machine}`` to ``resumes``: a resume on another commit or machine is as much a part of the run as its start.
  A resume of a run whose start recorded nothing (an older trainer) appends too, and its start stays unknown.

``code``: ``commit`` (HEAD of the git checkout the package is imported from), ``dirty`` (tracked changes or
untracked files), ``diff_sha256`` (of ``git diff HEAD`` and the untracked files' names; null when clean) and
``version`` (dist_cl's). An installed copy, or a machine without git, has ``commit``, ``dirty`` and
``diff_sha256`` null and ``commit_note`` saying why. Other writers (tools/compare_strategies.py: wall time,
command, load average) merge their fields into the same file with ``update_run_info``.
"""

import datetime
import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path

import numpy as np
import torch

import dist_cl

RUN_INFO_NAME = "run_info.json"
PACKAGE_SOURCE = Path(dist_cl.__file__).resolve().parent
"""Where the running code lives: the checkout whose commit a run records."""
UNKNOWN = "unknown"
"""The code state of a run whose record names no code (run_info.json from before it did, or none)."""


def git(directory: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(directory), *args], capture_output=True, timeout=60)


def code_state(source: Path = PACKAGE_SOURCE) -> dict:
    """The commit of the git checkout that tracks ``source``, whether its tree differs from that commit, a hash
    of the difference, and the package version."""
    state = {"version": dist_cl.__version__, "commit": None, "dirty": None, "diff_sha256": None}
    try:
        tracked = git(source, "ls-files", "--error-unmatch", ".")
    except FileNotFoundError:
        return {**state, "commit_note": "git is not installed"}
    if tracked.returncode != 0:  # not a checkout, or one that only holds the package as an untracked file
        reason = tracked.stderr.decode(errors="replace").strip().splitlines()[:1]
        return {**state, "commit_note": f"{source} is not tracked by a git checkout (an installed copy?)"
                                        + (f": {reason[0]}" if reason else "")}
    top = Path(git(source, "rev-parse", "--show-toplevel").stdout.decode().strip())
    head = git(top, "rev-parse", "HEAD")
    if head.returncode != 0:
        return {**state, "commit_note": f"{top} has no commit yet"}
    diff = git(top, "diff", "--no-ext-diff", "--binary", "HEAD").stdout
    untracked = git(top, "ls-files", "--others", "--exclude-standard", "-z").stdout
    dirty = bool(diff or untracked)
    return {**state, "commit": head.stdout.decode().strip(), "dirty": dirty,
            "diff_sha256": hashlib.sha256(diff + b"\0" + untracked).hexdigest() if dirty else None}


def library_versions() -> dict:
    try:
        import faiss  # sc_global's k-means; absent where it is not installed
    except ImportError:
        faiss = None
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "faiss": faiss.__version__ if faiss is not None else None}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # no /proc: not Linux
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """This process's host, CPU model, torch's intra-op thread count and CUDA device (null without one)."""
    return {"host": platform.node(), "cpu": cpu_model(), "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def start_record(source: Path = PACKAGE_SOURCE) -> dict:
    return {"started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "code": code_state(source), "versions": library_versions(), "machine": machine()}


def read_run_info(directory: Path) -> dict:
    path = directory / RUN_INFO_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


def update_run_info(directory: Path, fields: dict) -> None:
    """Merge ``fields`` into the run directory's run_info.json (written whole, then renamed: never half)."""
    info = {**read_run_info(directory), **fields}
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / f".{RUN_INFO_NAME}.{os.getpid()}"
    partial.write_text(json.dumps(info, indent=1) + "\n")
    partial.replace(directory / RUN_INFO_NAME)


def record_start(directory: Path, step: int, epoch: int, source: Path = PACKAGE_SOURCE) -> None:
    """Rank 0, where training starts: a new record at step 0, one more resume after it."""
    now = start_record(source)
    if step == 0:
        update_run_info(directory, {**now, "resumes": []})
    else:
        resumes = read_run_info(directory).get("resumes", [])
        update_run_info(directory, {"resumes": [*resumes, {"step": step, "epoch": epoch, **now}]})


def code_label(code: dict | None) -> str:
    """One code state as text: the commit (and the hash of uncommitted changes), or why there is none."""
    if code is None:
        return UNKNOWN
    if code["commit"] is None:
        return f"dist_cl {code['version']} outside git"
    return code["commit"][:12] + (f" + changes {code['diff_sha256'][:12]}" if code["dirty"] else "")


def code_labels(info: dict) -> list[str]:
    """The code states a run ran: its start's, then each resume's that differs, in order."""
    labels = [code_label(info.get("code"))]
    for resume in info.get("resumes", []):
        label = code_label(resume.get("code"))
        if label not in labels:
            labels.append(label)
    return labels
