"""The frame every command that runs under torchrun shares: the process group around its body, and
user errors (a bad config, no usable checkpoint, broken shards, impossible selection options, a run
directory another job holds) as one line on stderr and exit code 2, not a traceback from every rank.
"""

import sys
from collections.abc import Callable

from dist_cl.config import ConfigError
from dist_cl.data.shards import ShardError
from dist_cl.runtime.checkpoint import CheckpointError
from dist_cl.runtime.distributed import Backend, DistInfo, close_distributed, init_distributed, name_timeout
from dist_cl.runtime.runlock import RunDirLockedError
from dist_cl.selection import SelectionError

USER_ERRORS = (ConfigError, CheckpointError, ShardError, SelectionError, RunDirLockedError)
"""Errors whose message names the problem in the user's input and the fix."""


def run_distributed(body: Callable[[DistInfo], int], timeout_s: float = 600.0, backend: Backend = "auto") -> int:
    """The exit code of ``body(info)`` run in the process group that torchrun's environment describes.

    A user error ends it with a one-line message on stderr and exit code 2; a collective's timeout is
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
    print(f"{kind}: {err}", file=sys.stderr)
    return 2
