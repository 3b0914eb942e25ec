"""One job per run directory: ``<run>/run.lock``, held for the run's lifetime.

Two jobs in one run directory overwrite each other's checkpoints, or resume from each other's and race
on the same temporary files. Rank 0 creates the lock file exclusively (``O_CREAT | O_EXCL``, atomic on
local file systems and NFSv3+) with its host, pid, job and start time, refreshes its modification time
every tenth of ``run.lock_stale_s`` while it trains, and removes it at the end. A job that finds the
lock held fails at once, every rank with the same error, naming the holder.

A lock left behind by a job that died without removing it is stale and taken over (with a warning):
 - on this host, when its pid is no longer running;
 - from another host, whose processes cannot be seen from here: when it is the same job's (the same
   ``SLURM_JOB_ID``, or torchrun's run id), which is a restart of it (torchrun restarting its workers
   with rank 0 on another node, SLURM requeueing the job), or when its file has not been refreshed for
   ``run.lock_stale_s`` (by this host's clock against the file's modification time, so the setting must
   exceed the clock difference between the hosts);
 - when it stays unreadable for ``UNREADABLE_S`` (its writer died between creating and writing it).
Two jobs that find the same stale lock within the same instant can both take it over; nothing short
of a lock service closes that window.
"""

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist

from dist_cl.runtime.distributed import world_size

log = logging.getLogger("dist_cl")

LOCK_NAME = "run.lock"
UNREADABLE_S = 5.0


class RunDirLockedError(RuntimeError):
    """Another job holds the run directory; the message names it and what to do."""


def _job() -> str | None:
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID")


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class RunLock:
    def __init__(self, run_dir: Path, stale_s: float):
        self.path = Path(run_dir) / LOCK_NAME
        self.stale_s = stale_s
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "job": _job(),
                      "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Hold the lock, taking over a stale one; RunDirLockedError where another job holds it, or where
        the lock cannot be created at all (on every rank, not on rank 0 alone while the others wait)."""
        try:
            self._acquire()
        except OSError as err:
            raise RunDirLockedError(f"cannot lock run.dir {self.path.parent}: {err}; choose a writable run.dir") \
                from err
        self.thread = threading.Thread(target=self._refresh, name="dist_cl-run-lock", daemon=True)
        self.thread.start()

    def _acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        unreadable_since = None
        while not self._create():
            holder = self._read()
            if holder is None:  # removed, or not yet written, between our attempt and the read
                unreadable_since = unreadable_since or time.monotonic()
                if time.monotonic() - unreadable_since < UNREADABLE_S:
                    time.sleep(0.1)
                    continue
                holder = {}
            why = self.stale(holder) if holder else f"it has been unreadable for {UNREADABLE_S:g} s"
            if why is None:
                raise RunDirLockedError(
                    f"run.dir {self.path.parent} is in use by another job: host {holder['host']}, pid "
                    f"{holder['pid']}, job {holder['job']}, started {holder['started']} ({self.path}); "
                    "wait for it to end or choose another run.dir; if that job is gone, delete the lock file")
            log.warning("taking over the stale lock of %s: %s", self.path.parent, why)
            self.path.unlink(missing_ok=True)

    def stale(self, holder: dict) -> str | None:
        """Why ``holder``'s lock is stale, or None while it is live."""
        if holder["host"] == self.owner["host"]:
            return None if _pid_running(holder["pid"]) else f"its pid {holder['pid']} is no longer running on this host"
        if holder["job"] is not None and holder["job"] == self.owner["job"]:
            return f"it is this job's ({holder['job']}), left on host {holder['host']} before a restart"
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "it was removed meanwhile"
        if age > self.stale_s:
            return (f"host {holder['host']} has not refreshed it for {age:.0f} s "
                    f"(run.lock_stale_s={self.stale_s:g})")
        return None

    def release(self) -> None:
        """Stop refreshing and remove the lock if it is still ours."""
        self.stopped.set()
        if self.thread is not None:
            self.thread.join()
        if self._read() == self.owner:
            self.path.unlink(missing_ok=True)

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.owner, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _read(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return holder if isinstance(holder, dict) and holder.keys() == self.owner.keys() else None

    def _refresh(self) -> None:
        while not self.stopped.wait(self.stale_s / 10):
            try:
                os.utime(self.path)
            except OSError as err:  # the lock is gone or the file system is: the job's own writes will fail too
                log.warning("cannot refresh the run directory's lock %s: %s", self.path, err)


@contextmanager
def hold_run_dir(run_dir: Path, stale_s: float, is_main: bool) -> Iterator[None]:
    """Rank 0 holds the run directory's lock for the body (a collective: every rank raises
    RunDirLockedError where another job holds it)."""
    lock = RunLock(run_dir, stale_s) if is_main else None
    error: list = [None]
    if lock is not None:
        try:
            lock.acquire()
        except RunDirLockedError as err:
            error[0] = str(err)
    if world_size() > 1:
        dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise RunDirLockedError(error[0])
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
