"""Atomic checkpoints in <run>/checkpoints: write to a temporary file, fsync, rename, keep the newest k.

Each checkpoint ``step-00000123.pt`` has a ``.sha256`` beside it and ``latest`` names the newest. Loading
verifies the checksum and falls back to the previous checkpoint when the newest is truncated or corrupt.
A checkpoint without its ``.sha256`` is refused like a corrupt one: saving renames the sidecar into place
before the checkpoint, so a file dist_cl wrote never lacks it, and one that does was copied without it or
put there by hand; loading it unchecked would let a flipped bit resume silently and spread into every
later checkpoint, under valid checksums. The error says how to restore the sidecar of a trusted file.
A save that fails (disk full, quota, I/O) removes its temporary files and raises CheckpointWriteError
with the path and the free space; the previous checkpoints and ``latest`` are untouched.
What goes in one is composed: ``RunCheckpoints`` saves a ``{name: component}`` map, each component its own
state, so a component registered there cannot be forgotten by resume.
"""

import hashlib
import io
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

_NAME = re.compile(r"^step-(\d+)\.pt$")

log = logging.getLogger("dist_cl.runtime.checkpoint")


class CheckpointError(RuntimeError):
    """No usable checkpoint; the message says which files were tried and why they failed."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written; the message names the file, the error and the free space."""


class CheckpointDisagreementError(CheckpointError):
    """A rank cannot load the checkpoint rank 0 resumes from; the message names the rank, the file and why."""


def _write_tmp(path: Path, data: bytes, written: list[Path]) -> Path:
    """Write ``data`` to ``path``'s temporary name and fsync it; the name is appended to ``written`` first,
    so that a write that fails half way is cleaned up too."""
    tmp = path.with_name(f".{path.name}.tmp")
    written.append(tmp)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _free_space(directory: Path) -> str:
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    return f"{shutil.disk_usage(existing).free / 2**20:.1f} MiB free on {existing}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpointer:
    def __init__(self, directory: Path, keep: int):
        self.directory = Path(directory)
        self.keep = keep

    def checkpoints(self) -> list[Path]:
        """Checkpoint files, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _NAME.match(p.name))]
        return [p for _, p in sorted(found)]

    def save(self, state: dict, step: int) -> Path:
        """Write ``state`` atomically as step-<step>.pt, point ``latest`` at it, prune old ones.

        Both files are written and synced under temporary names before either is renamed, the sidecar
        first: an error while writing leaves no trace, and a crash between the renames leaves a sidecar
        without its checkpoint (ignored) or a checkpoint whose checksum fails (skipped), never an unchecked one.
        """
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
        path = self.directory / f"step-{step:08d}.pt"
        sidecar = path.with_name(path.name + ".sha256")
        written: list[Path] = []
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp_sidecar = _write_tmp(sidecar, hashlib.sha256(data).hexdigest().encode(), written)
            tmp_data = _write_tmp(path, data, written)
            tmp_latest = _write_tmp(self.directory / "latest", path.name.encode(), written)
            os.replace(tmp_sidecar, sidecar)
            os.replace(tmp_data, path)
            os.replace(tmp_latest, self.directory / "latest")
            _fsync_dir(self.directory)
        except OSError as err:
            for tmp in written:
                tmp.unlink(missing_ok=True)
            raise CheckpointWriteError(
                f"cannot write checkpoint {path}: {err.strerror or err} (it needs {len(data) / 2**20:.1f} MiB, "
                f"{_free_space(self.directory)}); the previous checkpoints are kept; free space or set "
                "run.dir on another file system, then resume") from err
        for old in self.checkpoints()[: -self.keep]:
            old.unlink()
            old.with_name(old.name + ".sha256").unlink(missing_ok=True)
        return path

    def resolve(self, which: str) -> list[Path]:
        """Candidates for ``which`` ('latest' or a path), best first."""
        if which != "latest":
            path = Path(which)
            if not path.is_file():
                raise CheckpointError(f"checkpoint {which!r} does not exist; pass --resume latest or a file path")
            return [path]
        return list(reversed(self.checkpoints()))

    @staticmethod
    def digest(path: Path) -> str:
        """The sha256 in ``path``'s sidecar (``load`` verified it against the file)."""
        return path.with_name(path.name + ".sha256").read_text().strip()

    def load(self, which: str = "latest") -> tuple[dict, Path, list[str]]:
        """(state, path, problems): the newest checkpoint that verifies, and why newer ones were skipped."""
        problems = []
        for path in self.resolve(which):
            data = path.read_bytes()
            digest_file = path.with_name(path.name + ".sha256")
            if not digest_file.is_file():
                problems.append(f"{path.name}: no {digest_file.name} beside it, so it cannot be verified (if you "
                                f"trust the file: sha256sum {path} | cut -d' ' -f1 > {digest_file})")
                continue
            if digest_file.read_text().strip() != hashlib.sha256(data).hexdigest():
                problems.append(f"{path.name}: checksum mismatch (truncated or corrupt)")
                continue
            try:
                state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
            except (RuntimeError, EOFError, OSError) as err:
                problems.append(f"{path.name}: cannot be read ({err})")
                continue
            return state, path, problems
        tried = "; ".join(problems) or f"no checkpoint in {self.directory}"
        raise CheckpointError(f"no usable checkpoint: {tried}")


class Stateful(Protocol):
    """A checkpoint component. ``collective = True`` marks one whose ``state_dict`` is a collective."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class RunCheckpoints:
    """A run's checkpoints as a ``{name: component}`` map; the checkpoint is ``{name: state}`` plus ``meta``.

    Saving is a collective: a component marked ``collective`` (the per-rank RNGs) gives its state on every
    rank, the others on rank 0 alone, which writes while the other ranks wait on ``group``.
    """

    def __init__(self, directory: Path, keep: int, components: dict[str, Stateful], is_main: bool, group=None):
        self.checkpointer = Checkpointer(directory, keep)
        self.components = components
        self.is_main = is_main
        self.group = group

    def save(self, step: int, meta: dict) -> Path | None:
        """Write every component's state and ``meta`` as step ``step``; the path on rank 0, else None."""
        gathered = {name: c.state_dict() for name, c in self.components.items() if getattr(c, "collective", False)}
        path = None
        if self.is_main:
            state = {name: gathered[name] if name in gathered else c.state_dict()
                     for name, c in self.components.items()}
            path = self.checkpointer.save({**state, "meta": meta}, step)
        dist.barrier(group=self.group)
        return path

    def load(self, which: str) -> tuple[dict, Path, list[str]]:
        """(state, path, problems) of ``which`` ('latest' or a path), checked, not yet restored."""
        state, path, problems = self.checkpointer.load(which)
        return upgrade(state), path, problems

    def load_agreed(self, which: str) -> tuple[dict, Path, list[str]] | None:
        """``load(which)`` with every rank on rank 0's choice (a collective); None where ``which`` is 'auto'
        and rank 0 finds no checkpoint.

        Rank 0 alone resolves ``which`` and broadcasts the identity of what it chose (file, step, sha256);
        every other rank loads that file and checks both. Ranks that resolved 'latest' themselves resumed
        from different steps where their listings differed (node-local run directories, a lagging NFS
        listing) and trained on mismatched state. Any rank that cannot load rank 0's choice makes every
        rank raise CheckpointDisagreementError, naming it, before anything trains.
        """
        chosen: list = [None, None]  # (path, step, sha256) or None; rank 0's error
        if self.is_main:
            try:
                if which != "auto" or self.checkpointer.checkpoints():
                    state, path, problems = self.load("latest" if which == "auto" else which)
                    chosen[0] = (str(path), state["counters"]["step"], self.checkpointer.digest(path))
            except (CheckpointError, OSError) as err:  # on every rank, not on rank 0 alone while the others wait
                chosen[1] = str(err)
        dist.broadcast_object_list(chosen, src=0, group=self.group)
        if chosen[1] is not None:
            raise CheckpointError(chosen[1])
        if chosen[0] is None:
            return None
        name, step, digest = chosen[0]
        problem = None
        if not self.is_main:
            try:
                state, path, problems = self.load(name)
                mine = (state["counters"]["step"], self.checkpointer.digest(path))
                if mine != (step, digest):
                    problem = (f"its copy is another checkpoint (step {mine[0]}, sha256 {mine[1][:12]}) than rank "
                               f"0's (step {step}, sha256 {digest[:12]})")
            except (CheckpointError, OSError) as err:
                problem = str(err)
        problems_by_rank: list = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(problems_by_rank, problem, group=self.group)
        failed = [(rank, p) for rank, p in enumerate(problems_by_rank) if p is not None]
        if failed:
            raise CheckpointDisagreementError(
                "; ".join(f"rank {rank} cannot load {name}, the checkpoint rank 0 resumes from (step {step}): {p}"
                          for rank, p in failed)
                + "; every rank must see the same run.dir (a file system shared by all nodes), so nothing was trained")
        return state, path, problems

    def restore(self, state: dict) -> None:
        """Give every component its state back."""
        missing = [name for name in self.components if name not in state]
        if missing:
            raise CheckpointError(f"the checkpoint holds no state for {', '.join(missing)}; it was written by "
                                  "another version of dist_cl; start a new run.dir")
        for name, component in self.components.items():
            component.load_state_dict(state[name])


def upgrade(state: dict) -> dict:
    """A checkpoint of an earlier layout in today's: dist_cl 0.1.0's had counters and meta at the top level,
    none before SogCLR had the ``loss`` component (no loss had state then), and the planner's state was
    ``next_plan`` until the package was split into layers."""
    upgraded = {"loss": {}, **state}
    if "next_plan" in upgraded:
        upgraded["planner"] = upgraded.pop("next_plan")
    if "meta" in state:
        return upgraded
    upgraded = {k: v for k, v in upgraded.items() if k not in ("epoch", "step", "skipped_steps", "config",
                                                                   "world_size", "version")}
    upgraded["counters"] = {k: state[k] for k in ("epoch", "step", "skipped_steps")}
    upgraded["meta"] = {k: state[k] for k in ("config", "world_size", "version")}
    return upgraded


def load_checkpoint(path: str | Path) -> tuple[dict, Path]:
    """(state, file) for a checkpoint file, a ``latest`` pointer, a checkpoints directory or a run directory.

    The tools take any of these as --checkpoint; a directory gives its newest checkpoint that verifies.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"--checkpoint {path} does not exist; pass a checkpoint file, <run>/checkpoints/latest "
                              "or a run directory")
    if path.is_dir():
        directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        which = "latest"
    elif path.name == "latest":
        directory, which = path.parent, "latest"
    else:
        directory, which = path.parent, str(path)
    state, found, problems = Checkpointer(directory, keep=1).load(which)
    for problem in problems:
        log.warning("skipped checkpoint %s", problem)
    return upgrade(state), found
