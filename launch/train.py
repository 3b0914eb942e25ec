"""Train dist_cl: ``torchrun --standalone --nproc_per_node=2 launch/train.py [--config PATH] [key=value ...]``.

Also runs as one plain ``python launch/train.py`` process. With no arguments it trains configs/digits.yaml.
"""

import argparse
import logging
import os
import sys
from pathlib import Path

from dist_cl.checkpoint import CheckpointError
from dist_cl.config import ConfigError, load_config, validate
from dist_cl.data.shards import ShardError, check_shards
from dist_cl.distributed import close_distributed, exit_process, init_distributed
from dist_cl.trainer import Trainer

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "digits.yaml"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/digits.yaml)")
    parser.add_argument("--resume", default="auto",
                        help="'auto' (resume from the run directory's newest checkpoint if any), 'latest', or a path")
    parser.add_argument("--dry-run", action="store_true", help="validate the config and its data, then exit")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=0.01 selection.strategy=sc")
    return parser.parse_intermixed_args(argv)  # overrides may come before and after --config


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, args.overrides)
        validate(cfg, world_size=int(os.environ.get("WORLD_SIZE", 1)))
        info = init_distributed(cfg.dist.timeout_s, cfg.dist.backend)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO if info.is_main else logging.WARNING,
        format=f"%(asctime)s [rank {info.rank}] %(levelname)s %(message)s",
    )
    try:
        trainer = Trainer(cfg, info)
        if args.dry_run:
            if cfg.data.name == "shards":
                check_shards(cfg.data.path)
            logging.getLogger("dist_cl").info("dry run: config and data are valid (%d training samples)",
                                              len(trainer.train_set))
            return 0
        trainer.resume(args.resume)
        trainer.fit()
        trainer.close()
    except (ConfigError, CheckpointError, ShardError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        close_distributed()
    return 0


if __name__ == "__main__":
    exit_process(main())
