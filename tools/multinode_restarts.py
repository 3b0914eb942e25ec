"""Multi-node recovery on one machine, repeated: rounds of each scenario of dist_cl.cli.multinode_restarts (two
torchrun agents joined by c10d; a worker or a whole agent SIGKILLed mid-epoch), each checked bit-identical to
an uninterrupted run, with a table of the outcomes.

    python tools/multinode_restarts.py                       # 5 rounds of each scenario, with the store setting
    python tools/multinode_restarts.py --rounds 1 --scenarios worker_kill
    python tools/multinode_restarts.py --share-store         # torchrun's default, for comparison
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from dist_cl.cli.multinode_restarts import SCENARIOS, Outcome, reference_run, run_scenario


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma list of " + ", ".join(SCENARIOS))
    parser.add_argument("--share-store", action="store_true",
                        help="leave TORCH_DISABLE_SHARE_RDZV_TCP_STORE unset (torchrun's default)")
    parser.add_argument("--kill-after-step", type=int, default=10,
                        help="a checkpoint step inside an epoch (22 steps an epoch)")
    parser.add_argument("--workdir", type=Path, help="where runs and agent logs go (default: a temporary folder)")
    args = parser.parse_args(argv)
    scenarios = [s for s in args.scenarios.split(",") if s]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="multinode-"))
    print(f"runs and agent logs under {workdir}; TORCH_DISABLE_SHARE_RDZV_TCP_STORE="
          f"{'unset' if args.share_store else '1'}", flush=True)
    reference = reference_run(workdir, args.share_store)
    print(f"{'scenario':<17} {'round':>5} {'exit codes':>10} {'resumed':>7} {'bit-identical':>13} {'seconds':>8}",
          flush=True)
    results: dict[str, list[Outcome]] = {s: [] for s in scenarios}
    for r in range(args.rounds):
        for scenario in scenarios:
            outcome = run_scenario(scenario, workdir / f"round{r}", reference, args.share_store,
                                   args.kill_after_step)
            results[scenario].append(outcome)
            codes = ",".join(str(c) for c in outcome.exit_codes)
            print(f"{scenario:<17} {r:>5} {codes:>10} {str(outcome.resumed):>7} {str(outcome.identical):>13} "
                  f"{outcome.seconds:>8.1f}", flush=True)
    print(f"\n{'scenario':<17} {'recovered':>9} {'median s':>8}")
    for scenario, outcomes in results.items():
        good = sum(o.recovered for o in outcomes)
        print(f"{scenario:<17} {f'{good}/{len(outcomes)}':>9} {statistics.median(o.seconds for o in outcomes):>8.1f}")
    return 0 if all(o.recovered for outs in results.values() for o in outs) else 1


if __name__ == "__main__":
    sys.exit(main())
