"""The paper's synthetic experiment: free unit embeddings trained on the batches a strategy picks.

N pairs (u_i, v_i) in R^d are the parameters themselves, trained with plain SGD on each strategy's batches
and measured by the full-batch loss (dist_cl.evaluate.synthetic). Writes losses.csv, losses.png, table.md
and TensorBoard curves under --out, and prints the table.

    python tools/synthetic.py                      # N=8, B=2, d in {16, 4}, 6 strategies, 3 seeds
    python tools/synthetic.py --large              # N=16, B=4, d in {32, 8}
"""

import argparse
from pathlib import Path

import torch

from dist_cl.config import TOOL_OUTPUTS
from dist_cl.evaluate.synthetic import STRATEGIES, Settings, run


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=Settings.n, help="number of pairs N")
    parser.add_argument("--b", type=int, default=Settings.b, help="batch size B")
    parser.add_argument("--dims", type=int, nargs="+", help="embedding dims d (default: 2N and N/2)")
    parser.add_argument("--large", action="store_true", help="N=16, B=4 instead of N=8, B=2")
    parser.add_argument("--steps", type=int, default=Settings.steps, help="steps (epochs of the official script)")
    parser.add_argument("--seeds", type=int, default=Settings.seeds)
    parser.add_argument("--lr", type=float, default=Settings.lr, help="SGD learning rate (official lr_full)")
    parser.add_argument("--tau", type=float, default=Settings.tau,
                        help="temperature (official: 1, plain unit vectors)")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--report-steps", type=int, nargs="+", default=Settings().report_steps)
    parser.add_argument("--out", type=Path, default=TOOL_OUTPUTS / "synthetic",
                        help="output folder (default %(default)s; runs/tools/ holds no trainer run)")
    args = parser.parse_args(argv)
    if args.large:
        args.n, args.b = 16, 4
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    # tensors here are tiny: intra-op threads only add sync overhead (docs/BENCHMARKS.md)
    torch.set_num_threads(1)
    settings = Settings(n=args.n, b=args.b, dims=args.dims, steps=args.steps, seeds=args.seeds, lr=args.lr,
                        tau=args.tau, strategies=args.strategies, report_steps=args.report_steps)
    run(settings, args.out)
    print((args.out / "table.md").read_text(), end="")
    print(f"outputs in {args.out}")


if __name__ == "__main__":
    main()
