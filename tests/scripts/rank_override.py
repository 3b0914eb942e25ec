"""torchrun worker: ``rank_override.py RANK OVERRIDE [train.py arguments]`` trains with OVERRIDE added on
rank RANK only: a job whose ranks were given different configs."""

import os
import sys

from dist_cl.cli.train import run

if __name__ == "__main__":
    rank, override, *arguments = sys.argv[1:]
    sys.argv = [sys.argv[0], *arguments, *([override] if os.environ["RANK"] == rank else [])]
    run()
