"""torchrun worker: ``sigterm_at_step.py STEP [train.py arguments]`` trains, and rank 0 sends itself SIGTERM as
its step STEP (0-based) starts: a stop that arrives during that step on one rank only."""

import os
import signal
import sys

from dist_cl.cli.train import run
from dist_cl.trainer import Trainer

if __name__ == "__main__":
    step, sys.argv = int(sys.argv[1]), [sys.argv[0], *sys.argv[2:]]
    train_one = Trainer.train_one

    def signalled(self, *batch):
        if os.environ["RANK"] == "0" and self.counters.step == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return train_one(self, *batch)

    Trainer.train_one = signalled
    run()
