"""The frame every command that runs under torchrun shares: the process group around its body, and
user errors (a bad config, no usable checkpoint, broken shards, impossible selection options, a run
directory another job holds) as one line on stderr and exit code 2, not a traceback from every rank.

Under torchrun the line goes to the rank's error file instead of stderr, so that it is printed once per
failed rank, not twice: torchrun's failure summary shows it where it would otherwise say ``error_file: <N/A>``.
torchrun itself still ends with its ChildFailedError traceback and exit code 1.
"""

import json
import os
import sys
import time
from collections.abc import Callable

from dist_cl.config import ConfigError
from dist_cl.data.shards import ShardError
from dist_cl.runtime.checkpoint_files import CheckpointError
from dist_cl.runtime.distributed import Backend, DistInfo, close_distributed, init_distributed, name_timeout
from dist_cl.runtime.runlock import RunDirLockedError
from dist_cl.selection import SelectionError

USER_ERRORS = (ConfigError, CheckpointError, ShardError, SelectionError, RunDirLockedError)
"""Errors whose message names the problem in the user's input and the fix."""


def run_distributed(body: Callable[[DistInfo], int], timeout_s: float = 600.0, backend: Backend = "auto") -> int:
    """The exit code of ``body(info)`` run in the process group that torchrun's environment describes.

    A user error ends it with a one-line message (``user_error``) and exit code 2; a collective's timeout is
    raised again as a RankTimeoutError that names the rank that stopped answering. The group is destroyed
    however ``body`` ends, so that no process exits with a live group (torch warns that this leaks resources).
    """
    try:
        info = init_distributed(timeout_s, backend)
    except ConfigError as err:  # a dist.backend this host cannot run
        return user_error("config error", err)
    try:
        return body(info)
    except USER_ERRORS as err:
        return user_error("error", err)
    except RuntimeError as err:
        named = name_timeout(err, timeout_s)
        if named is None:
            raise
        raise named from err
    finally:
        close_distributed()


def user_error(kind: str, err: Exception) -> int:
    """Exit code 2 after the line ``kind: err`` in torchrun's error file, or on stderr outside torchrun."""
    message = f"{kind}: {err}"
    if not record_for_torchrun(message):
        print(message, file=sys.stderr)
    return 2


def record_for_torchrun(message: str) -> bool:
    """Write ``message`` where torchrun's agent reads this worker's failure (TORCHELASTIC_ERROR_FILE, set by
    torchrun only), so that its failure summary shows it; False outside torchrun or where it cannot be written.

    The format is the one torch's ErrorHandler.record_exception writes, less the ``py_callstack`` whose
    traceback the summary would show instead of the message.
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return False
    error = {"message": message, "extraInfo": {"timestamp": str(int(time.time()))}}
    try:
        with open(path, "w") as file:
            json.dump({"message": error}, file)
    except OSError:  # the line then goes to stderr: a user error must not end in a traceback
        return False
    return True
