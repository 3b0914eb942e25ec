"""Checkpoint files in <run>/checkpoints: write to a temporary file, fsync, rename, keep the newest k.

Each checkpoint ``step-00000123.pt`` has a ``.sha256`` beside it and ``latest`` names the newest. Loading
takes the newest of the listed checkpoints and the one ``latest`` names (a directory listing that lags, on
NFS, can miss it), verifies the checksum, and falls back to the previous checkpoint when the newest is
truncated or corrupt, or is no complete checkpoint at all (not a torch file, a bare state_dict, a pickle of
something else, a layout missing a component): each file skipped is named with what it is.
A checkpoint without its ``.sha256`` is refused like a corrupt one: saving renames the sidecar into place
before the checkpoint, so a file dist_cl wrote never lacks it, and one that does was copied without it or
put there by hand; loading it unchecked would let a flipped bit resume silently and spread into every
later checkpoint, under valid checksums. The error says how to restore the sidecar of a trusted file.
A save that fails (disk full, quota, I/O) removes its temporary files and raises CheckpointWriteError
with the path and the free space; the previous checkpoints and ``latest`` are untouched.
"""

import hashlib
import io
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

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


def _remove(written: list[Path]) -> None:
    """Remove the temporary files a failed write created, as far as the file system lets it: one it cannot
    remove (a directory turned read-only or unwritable) is left, hidden and overwritten by the next save, and
    logged, so that the write's own error is the one raised."""
    for tmp in written:
        try:
            tmp.unlink(missing_ok=True)
        except OSError as err:
            log.warning("cannot remove the temporary file %s: %s", tmp, err.strerror or err)


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
            _remove(written)
            raise CheckpointWriteError(
                f"cannot write checkpoint {path}: {err.strerror or err} (it needs {len(data) / 2**20:.1f} MiB, "
                f"{_free_space(self.directory)}); the previous checkpoints are kept; free space or set "
                "run.dir on another file system, then resume") from err
        for old in self.checkpoints()[: -self.keep]:
            old.unlink()
            old.with_name(old.name + ".sha256").unlink(missing_ok=True)
        return path

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` names, where it names one."""
        try:
            name = (self.directory / "latest").read_text().strip()
        except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
            return None
        return self.directory / name if _NAME.match(name) else None

    def candidates(self) -> list[Path]:
        """This directory's checkpoints, newest first: those listed and the one ``latest`` names."""
        found = {p.name: p for p in self.checkpoints()}
        named = self.latest()
        if named is not None and named.is_file():
            found.setdefault(named.name, named)
        return sorted(found.values(), key=lambda p: int(_NAME.match(p.name).group(1)), reverse=True)

    def resolve(self, which: str) -> list[Path]:
        """Candidates for ``which``, best first: 'latest' (this directory's), a checkpoint file, or a ``latest``
        pointer, checkpoints directory or run directory (that directory's checkpoints)."""
        if which == "latest":
            return self.candidates()
        path = Path(which)
        if path.is_dir():
            directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
            return Checkpointer(directory, self.keep).candidates()
        if not path.is_file():
            raise CheckpointError(f"checkpoint {which!r} does not exist; pass --resume latest, a checkpoint file, "
                                  "<run>/checkpoints/latest or a run directory")
        if path.name == "latest":
            return Checkpointer(path.parent, self.keep).candidates()
        return [path]

    @staticmethod
    def digest(path: Path) -> str:
        """The sha256 in ``path``'s sidecar (``load`` verified it against the file)."""
        return path.with_name(path.name + ".sha256").read_text().strip()

    def load(self, which: str = "latest", complete: Callable[[Any], dict] = lambda state: state
             ) -> tuple[dict, Path, list[str]]:
        """(state, path, problems): the newest candidate that verifies and that ``complete`` turns into a
        checkpoint (it raises CheckpointError saying what the file holds instead), and why newer ones were
        skipped."""
        problems = []
        for path in self.resolve(which):
            try:
                return complete(_read_verified(path)), path, problems
            except CheckpointError as err:
                problems.append(f"{path.name}: {err}")
        tried = "; ".join(problems) or f"no checkpoint in {self.directory if which == 'latest' else which}"
        raise CheckpointError(f"no usable checkpoint: {tried}")


def _read_verified(path: Path) -> Any:
    """What ``path`` unpickles to, once its checksum matches its sidecar; CheckpointError saying why not."""
    try:
        data = path.read_bytes()
    except OSError as err:  # removed meanwhile, or the file system is failing
        raise CheckpointError(f"cannot be read ({err.strerror or err})") from err
    digest_file = path.with_name(path.name + ".sha256")
    if not digest_file.is_file():
        raise CheckpointError(f"no {digest_file.name} beside it, so it cannot be verified (if you trust the file: "
                              f"sha256sum {path} | cut -d' ' -f1 > {digest_file})")
    if digest_file.read_text(errors="replace").strip() != hashlib.sha256(data).hexdigest():
        raise CheckpointError("checksum mismatch (truncated or corrupt)")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as err:  # unpickling arbitrary bytes can raise any exception type
        raise CheckpointError(f"not a torch file, or a damaged one ({type(err).__name__}: {err})") from err


def checkpoint_state(content: Any, components: Iterable[str] = ()) -> dict:
    """``content`` (what a file unpickled to) as a dist_cl checkpoint of today's layout holding ``components``;
    CheckpointError saying what the file is where it is none."""
    if not isinstance(content, dict):
        raise CheckpointError(f"a pickle of a {type(content).__name__}, not a dist_cl checkpoint")
    keys = ", ".join(map(repr, list(content)[:8])) + (", ..." if len(content) > 8 else "")
    if content and all(isinstance(value, torch.Tensor) for value in content.values()):
        raise CheckpointError(f"a bare state_dict ({len(content)} tensors: {keys}), not a dist_cl checkpoint: it "
                              "holds weights alone, no optimizer, counters or config to resume from")
    try:
        state = upgrade(content)
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"a dict without a dist_cl checkpoint's {err} (its keys: {keys or 'none'})") from err
    missing = [name for name in ("meta", "counters", *components) if name not in state]
    if missing:
        raise CheckpointError(f"a dict without a dist_cl checkpoint's {', '.join(missing)} (its keys: {keys}): "
                              "not written by dist_cl, or by another version of it")
    meta, counters = state["meta"], state["counters"]
    if not (isinstance(meta, dict) and isinstance(meta.get("config"), dict) and isinstance(meta.get("world_size"), int)
            and isinstance(counters, dict) and all(isinstance(counters.get(k), int) for k in ("epoch", "step"))):
        raise CheckpointError("a dist_cl checkpoint whose meta (config, world_size) or counters (epoch, step) are "
                              "malformed")
    return state


def _size(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"


def room_problem(directory: Path, needed: int) -> str | None:
    """Why ``directory`` cannot take a checkpoint of ``needed`` bytes (a probe file it cannot write, or too
    little free space), or None."""
    written: list[Path] = []
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _write_tmp(directory / "probe", b"dist_cl", written)
        free = shutil.disk_usage(directory).free
    except OSError as err:
        return (f"cannot write to {directory} ({err.strerror or err}), where this run saves its checkpoints: "
                "make it writable, or set run.dir to a writable directory")
    finally:
        _remove(written)
    if free < needed:
        return (f"{directory} cannot hold one checkpoint of this run: it needs about {_size(needed)} (model, "
                f"optimizer, bank and plan), and {_size(free)} are free there; free space or set run.dir on another "
                "file system")
    return None


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

    The tools take any of these as --checkpoint; a pointer or directory gives its newest checkpoint that verifies.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"--checkpoint {path} does not exist; pass a checkpoint file, <run>/checkpoints/latest "
                              "or a run directory")
    state, found, problems = Checkpointer(path if path.is_dir() else path.parent, keep=1).load(str(path),
                                                                                               checkpoint_state)
    for problem in problems:
        log.warning("skipped checkpoint %s", problem)
    return state, found
