"""torchrun worker: ``rank_cwd.py ROOT [train.py arguments]`` trains in ROOT/rank<RANK> as its working
directory, so that a relative run.dir is a directory of each rank's own, as node-local disks are."""

import os
import sys
from pathlib import Path

from dist_cl.cli.train import run

if __name__ == "__main__":
    os.chdir(Path(sys.argv[1]) / f"rank{os.environ['RANK']}")
    sys.argv = [sys.argv[0], *sys.argv[2:]]
    run()
