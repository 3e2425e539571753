"""``python -m simulations.demo``: what fedagg is for, in about a minute on a laptop CPU (``make demo``).

FedAU against FedAvg over the participating clients and the known-p oracle, under *unknown,
heterogeneous* participation: 100 clients with Dirichlet(0.1) label skew, each available in a round
with its own probability p_n (mean 0.1, floor 0.02, correlated with its labels; Bernoulli draws),
1,000 rounds of 5 local SGD steps (batch 16, MLP). The server never sees p_n: fedavg-participating
averages whoever shows up, so clients that are often available dominate; FedAU estimates 1/p_n from
each client's participation intervals; known-p divides by the true p_n (an oracle). The three runs
share the seed, so they see the same availability and data; ``runs/demo/convergence.png`` draws the
three test-accuracy curves and the last line compares the mean over the last 100 rounds.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from simulations.cli import Parser

#: The demo's run config (keys as in docs/quickstart.md); one run per strategy in ``STRATEGIES``.
SETTING: dict[str, Any] = {
    "num_clients": 100, "partition": "dirichlet", "alpha": 0.1, "dataset": "mnist1d",
    "dataset_args": {"num_samples": 10000}, "test_fraction": 0.0, "model": "mlp",
    "local_steps": 5, "batch_size": 16, "lr": 0.2, "momentum": 0.0, "rounds": 1000, "eval_every": 10,
    "participation": {"process": "bernoulli",
                      "probabilities": {"kind": "heterogeneous", "alpha": 0.1, "mean": 0.1, "floor": 0.02}},
}
STRATEGIES = ("fedau", "fedavg-participating", "known-p")
#: Rounds at the end whose evaluations the summary line averages.
LAST = 100


def late_mean(rows: Sequence[dict[str, Any]], last: int = LAST) -> float:
    """Mean test accuracy of the evaluations in the last ``last`` rounds of ``rows``."""
    end = max(int(r["round"]) for r in rows)
    vals = [float(r["test_accuracy"]) for r in rows
            if int(r["round"]) > end - last and r["test_accuracy"] == r["test_accuracy"]]
    return sum(vals) / len(vals)


def main(argv: Sequence[str] | None = None) -> int:
    parser = Parser(prog="python -m simulations.demo", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="folder for the three runs and the figure")
    parser.add_argument("--rounds", type=int, default=SETTING["rounds"], help="rounds per run")
    args = parser.parse_args(argv)
    if args.rounds < LAST:
        print(f"error: rounds: must be >= {LAST} (the summary averages the last {LAST})", file=sys.stderr)
        return 2
    from fedagg.errors import ConfigError
    from simulations.core.config import load_config
    from simulations.core.runner import Simulation
    from simulations.plot import plot_runs, save_figure
    from simulations.run import quiet_logs

    quiet_logs()
    out = Path(args.out)
    dirs, lines = [], []
    try:
        for strategy in STRATEGIES:
            cfg = load_config(None, {**SETTING, "rounds": args.rounds, "strategy": strategy,
                                     "out": str(out / strategy)})
            result = Simulation(cfg, overwrite=True, progress=True).run()
            dirs.append(result.run_dir)
            lines.append(f"{strategy:>22}: {100 * late_mean(result.rows):5.1f} % "
                         f"(mean test accuracy over the last {LAST} rounds; {result.summary['wall_seconds']:.0f} s)")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=150)
    plot_runs(dirs, ax=ax, title=f"FedAU vs FedAvg under unknown participation ({args.rounds} rounds)")
    paths = save_figure(fig, out / "convergence.png")
    print("\n".join(lines))
    print(f"figure: {paths[0]}  runs: {', '.join(str(d) for d in dirs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
