"""Under torchrun: every recorder of collective results in tests/scripts, one after another in one process
group, so that their tests share one launch (a launch's imports cost more than all of their work).

Usage: collectives.py OUT_DIR; each recorder writes into OUT_DIR/<its module name>/.
"""

import sys
from pathlib import Path

import accumulation_steps
import bank_plan
import clip_losses
import ddp_loss_grads
import free_grads
import loss_steps

from dist_cl.runtime.distributed import close_distributed, exit_process, init_distributed

RECORDERS = (accumulation_steps, bank_plan, clip_losses, ddp_loss_grads, free_grads, loss_steps)

if __name__ == "__main__":
    info = init_distributed(60)
    for recorder in RECORDERS:
        out = Path(sys.argv[1]) / recorder.__name__
        out.mkdir(exist_ok=True)
        recorder.record(out, info)
    close_distributed()
    exit_process(0)
