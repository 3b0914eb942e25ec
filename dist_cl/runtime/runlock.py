"""One job per run directory: ``<run>/run.lock``, held for the run's lifetime.

Two jobs in one run directory overwrite each other's checkpoints, or resume from each other's and race
on the same temporary files. Rank 0 creates the lock file exclusively (``O_CREAT | O_EXCL``, atomic on
local file systems and NFSv3+) with its host, pid, job and start time, refreshes its modification time
every tenth of ``run.lock_stale_s`` while it trains, and removes it at the end. A job that finds the
lock held fails at once, every rank with the same error, naming the holder.

A job is its ``SLURM_JOB_ID``, or torchrun's run id; torchrun's default run id, ``none`` (no
``--rdzv-id``, no ``--standalone``), is shared by every such job and so is no job id at all. A lock left
behind by a job that died without removing it is stale and taken over (with a warning):
 - on this host, when its pid is no longer running, or is this process's (which does not hold it: the pid
   of an earlier process, reused by a restarted container);
 - from another host, whose processes cannot be seen from here, when it is the same job's, which is a
   restart of it (torchrun restarting its workers with rank 0 on another node, SLURM requeueing the job);
 - from any host, when its file has not been refreshed for ``run.lock_stale_s`` (by this host's clock
   against the file's modification time, so the setting must exceed the clock difference between the
   hosts): its holder is gone, or its pid now belongs to another process;
 - when it stays unreadable (no JSON object with host, pid, job and started; other keys are ignored) for
   ``UNREADABLE_S`` (its writer died between creating and writing it).
Two jobs that find the same stale lock within the same instant can both take it over; nothing short
of a lock service closes that window. The holder checks at each refresh that the lock is still its own:
where another job holds it, the holder's main thread is interrupted with RunLockLostError, so that the
two do not go on writing over each other.
"""

import _thread
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist

from dist_cl.runtime.distributed import world_size

log = logging.getLogger("dist_cl")

LOCK_NAME = "run.lock"
UNREADABLE_S = 5.0
_FIELDS = {"host": str, "pid": int, "job": (str, type(None)), "started": str}

_held: set[Path] = set()
"""The lock files this process holds."""


class RunDirLockedError(RuntimeError):
    """Another job holds the run directory; the message names it and what to do."""


class RunLockLostError(RunDirLockedError):
    """Another job took over the run directory's lock while this one held it; the message names that job."""


def _job_id(value: str | None) -> str | None:
    """``value`` as a job id, or None where it names no job (unset, empty, torchrun's default ``none``)."""
    return None if value in (None, "", "none") else value


def _job() -> str | None:
    return _job_id(os.environ.get("SLURM_JOB_ID")) or _job_id(os.environ.get("TORCHELASTIC_RUN_ID"))


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _describe(holder: dict) -> str:
    return f"host {holder['host']}, pid {holder['pid']}, job {holder['job']}, started {holder['started']}"


class RunLock:
    def __init__(self, run_dir: Path, stale_s: float, on_lost: Callable[[], None] | None = None):
        """``on_lost``: called from the refreshing thread once another job holds the lock (``lost`` says which)."""
        self.path = Path(run_dir) / LOCK_NAME
        self.stale_s = stale_s
        self.on_lost = on_lost
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "job": _job(),
                      "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.lost: RunLockLostError | None = None
        self.stopped = threading.Event()
        self.stopping = threading.Lock()  # no on_lost once release() has begun
        self.thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Hold the lock, taking over a stale one; RunDirLockedError where another job holds it, or where
        the lock cannot be created at all (on every rank, not on rank 0 alone while the others wait)."""
        try:
            self._acquire()
        except OSError as err:
            raise RunDirLockedError(f"cannot lock run.dir {self.path.parent}: {err}; choose a writable run.dir") \
                from err
        _held.add(self.path.absolute())
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
            why = self.stale(holder) if holder else f"it has been unreadable for {UNREADABLE_S:g} s"
            if why is None:
                raise RunDirLockedError(
                    f"run.dir {self.path.parent} is in use by another job: {_describe(holder)} ({self.path}); "
                    "wait for it to end or choose another run.dir; if that job is gone, delete the lock file")
            log.warning("taking over the stale lock of %s: %s", self.path.parent, why)
            self.path.unlink(missing_ok=True)

    def stale(self, holder: dict) -> str | None:
        """Why ``holder``'s lock is stale, or None while it is live."""
        same_host = holder["host"] == self.owner["host"]
        if same_host and holder["pid"] == os.getpid() and self.path.absolute() not in _held:
            return (f"its pid {holder['pid']} is this process's, which does not hold it: an earlier process's pid, "
                    "reused (a restarted container)")
        if same_host and not _pid_running(holder["pid"]):
            return f"its pid {holder['pid']} is no longer running on this host"
        job = _job_id(holder["job"])
        if not same_host and job is not None and job == self.owner["job"]:
            return f"it is this job's ({job}), left on host {holder['host']} before a restart"
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "it was removed meanwhile"
        if age > self.stale_s:
            running = f" (its pid {holder['pid']} runs here, another process's now)" if same_host else ""
            return (f"host {holder['host']} has not refreshed it for {age:.0f} s{running} "
                    f"(run.lock_stale_s={self.stale_s:g})")
        return None

    def release(self) -> None:
        """Stop refreshing and remove the lock if it is still ours."""
        with self.stopping:
            self.stopped.set()
        if self.thread is not None:
            self.thread.join()
        _held.discard(self.path.absolute())
        if self._read() == self.owner:
            try:
                self.path.unlink(missing_ok=True)
            except OSError as err:  # the run directory stopped taking writes: the error that ends the job says so
                log.warning("cannot remove the run directory's lock %s: %s", self.path, err)

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
        """The holder the lock file names; None where it is missing or unreadable."""
        try:
            holder = json.loads(self.path.read_text())
        except (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not isinstance(holder, dict) or not all(isinstance(holder.get(k), t) for k, t in _FIELDS.items()):
            return None
        return {k: holder[k] for k in _FIELDS}

    def _refresh(self) -> None:
        """Refresh the lock while it is ours; stop, recording ``lost``, once another job's it is."""
        unreadable_since = None
        while not self.stopped.wait(self.stale_s / 10):
            try:
                holder = self._read()
                if holder is None and self._create():
                    log.warning("the lock of %s was removed while this job held it; created it again", self.path)
                    continue
                if holder == self.owner:
                    unreadable_since = None
                    os.utime(self.path)
                    continue
            except OSError as err:  # the file system is failing: the job's own writes will fail too
                log.warning("cannot refresh the run directory's lock %s: %s", self.path, err)
                continue
            if holder is None:  # another job's, being written; or overwritten with something unreadable
                unreadable_since = unreadable_since or time.monotonic()
                if time.monotonic() - unreadable_since < UNREADABLE_S:
                    continue
            self._lose(holder)
            return

    def _lose(self, holder: dict | None) -> None:
        who = f"now {_describe(holder)}" if holder else "overwritten with something that is no lock"
        error = RunLockLostError(
            f"run.dir {self.path.parent} was taken over by another job while this one trained: its lock "
            f"{self.path} is {who}; this job stopped so that the two do not write over each other's checkpoints "
            "and logs; let one job use the run directory, each other job a run.dir of its own")
        with self.stopping:
            if self.stopped.is_set():
                return
            self.lost = error
            if self.on_lost is not None:
                self.on_lost()


@contextmanager
def _raising_when_lost(lock: RunLock) -> Iterator[None]:
    """The main thread raises ``lock.lost`` in the body as soon as the lock is lost: the refreshing thread
    interrupts it with SIGINT, whose handler here raises that error (and passes a real Ctrl-C on)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        if lock.lost is not None:
            raise lock.lost
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    lock.on_lost = lambda: _thread.interrupt_main(signal.SIGINT)
    try:
        yield
    finally:
        with lock.stopping:  # no interrupt from here on; one already sent is handled here, by the handler above
            lock.stopped.set()
        signal.signal(signal.SIGINT, previous)


@contextmanager
def hold_run_dir(run_dir: Path, stale_s: float, is_main: bool) -> Iterator[None]:
    """Rank 0 holds the run directory's lock for the body (a collective: every rank raises
    RunDirLockedError where another job holds it). Where another job takes it over meanwhile, rank 0 raises
    RunLockLostError in the body (the other ranks then fail on their next collective, as when any rank exits)."""
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
    if lock is None:
        yield
        return
    try:
        with _raising_when_lost(lock):
            yield
    finally:
        lock.release()
    if lock.lost is not None:  # lost as the body ended, before the interrupt reached it
        raise lock.lost
