"""The trainer's command line: ``launch/train.py`` and the ``dist-cl-train`` script.

It checks the config before any process group starts, then trains inside ``run_distributed``
(dist_cl.cli.torchrun), so a user error ends with exit code 2 and one line: on stderr, or under torchrun in
its failure summary.
"""

import argparse
import logging
import os
import sys
from functools import partial
from pathlib import Path

from dist_cl.cli.torchrun import run_distributed, user_error
from dist_cl.config import Config, ConfigError, describe, load_config
from dist_cl.data.shards import check_shards
from dist_cl.learn.models import check_backbone
from dist_cl.report.console import setup_console
from dist_cl.runtime.distributed import DistInfo, exit_process
from dist_cl.runtime.preemption import REQUEUE_EXIT_CODE, Preempted
from dist_cl.runtime.runlock import hold_run_dir
from dist_cl.trainer import Trainer

USAGE = """Train dist_cl: ``torchrun --standalone --nproc_per_node=2 launch/train.py [--config PATH] [key=value ...]``.

Also runs as one plain ``python launch/train.py`` process, and installed as ``dist-cl-train`` (under torchrun:
``torchrun ... --no-python dist-cl-train ...``). With no arguments it trains configs/digits.yaml.
"""

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "digits.yaml"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/digits.yaml)")
    parser.add_argument("--resume", default="auto",
                        help="'auto' (resume from the run directory's newest checkpoint; start from step 0 only "
                             "where the directory shows no earlier training), 'latest' (a checkpoint is required), "
                             "'none' (start from step 0 on purpose, in a run directory without checkpoints), or a "
                             "checkpoint file, <run>/checkpoints/latest or a run directory")
    parser.add_argument("--dry-run", action="store_true", help="validate the config and its data, then exit")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config, each key with what it means, then exit")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=0.01 selection.strategy=sc")
    return parser.parse_intermixed_args(argv)  # overrides may come before and after --config


def main(argv: list[str] | None = None) -> int:
    """Train as the command line (``sys.argv[1:]`` by default) asks; returns the exit code."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:  # before the process group: its timeout and backend are in the config
        cfg = load_config(args.config, args.overrides, world_size=int(os.environ.get("WORLD_SIZE", 1)))
        check_backbone(cfg.model.backbone)
    except ConfigError as err:
        return user_error("config error", err)
    if args.print_config:
        print(describe(cfg))
        return 0
    return run_distributed(partial(train, cfg, args), cfg.dist.timeout_s, cfg.dist.backend)


def train(cfg: Config, args: argparse.Namespace, info: DistInfo) -> int:
    setup_console(info.rank, cfg.run.print_every_s)
    trainer = Trainer(cfg, info)
    try:  # the planner's thread, the metrics and the log file are closed on every way out
        if args.dry_run:
            if cfg.data.name == "shards":
                check_shards(cfg.data.path)
            logging.getLogger("dist_cl").info("dry run: config and data are valid (%d training samples)",
                                              len(trainer.train_set))
            return 0
        with hold_run_dir(cfg.run_dir, cfg.run.lock_stale_s, info.is_main), trainer.stop.handling():
            trainer.resume(args.resume)
            try:
                trainer.fit()
            except Preempted as stopped:
                logging.getLogger("dist_cl").warning("preempted: %s; exit code %d asks to be requeued", stopped,
                                                     REQUEUE_EXIT_CODE)
                return REQUEUE_EXIT_CODE
        return 0
    finally:
        trainer.close()


def run() -> None:
    """The ``dist-cl-train`` script: ``main``, then the end that gloo needs (``exit_process``, not sys.exit)."""
    exit_process(main())
