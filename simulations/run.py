"""``python -m simulations.run``: run one federated simulation.

    python -m simulations.run --strategy fedavg --rounds 20 --num-clients 10
    python -m simulations.run --config simulations/configs/fedau_mnist1d.yaml seed=3 lr=0.1

Precedence: defaults < ``--config`` YAML < flags < ``key=value`` overrides (dotted keys reach nested
settings, e.g. ``participation.args.a=0.05``). Invalid input exits with code 2 and a one-line message
naming the field; nothing is written to disk before the input is known to be valid.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import yaml

from fedagg.errors import ConfigError

#: (flag, config key, help). Values are parsed as YAML scalars and validated by the config schema.
FLAGS: tuple[tuple[str, str, str], ...] = (
    ("--strategy", "strategy", "aggregation strategy (see the list below)"),
    ("--rounds", "rounds", "number of federated rounds"),
    ("--num-clients", "num_clients", "total number of clients N"),
    ("--clients-per-round", "clients_per_round", "clients trained per round among the available (default: all)"),
    ("--dataset", "dataset", "dataset (see the list below)"),
    ("--partition", "partition", "how data is split among clients: iid, dirichlet, shards, domain, natural"),
    ("--alpha", "alpha", "Dirichlet concentration α for label skew (dirichlet/domain partitions)"),
    ("--model", "model", "model: mlp, cnn, ..."),
    ("--local-steps", "local_steps", "local SGD steps per round"),
    ("--batch-size", "batch_size", "local minibatch size"),
    ("--lr", "lr", "client learning rate"),
    ("--server-lr", "server_lr", "server (global) learning rate η"),
    ("--seed", "seed", "run seed (data split, participation, training, attacks)"),
    ("--engine", "engine", "ray (default), flower (stock run_simulation) or inline (no Ray)"),
    ("--out", "out", "run directory (default runs/<strategy>-<timestamp>)"),
    ("--participation", "participation.process", "availability process: always, bernoulli, markov, cyclic"),
    ("--attack", "attack", "Byzantine attack applied by --num-byzantine clients"),
    ("--num-byzantine", "num_byzantine", "number of Byzantine clients"),
    ("--aggregator", "aggregator", "aggregation pipeline for robust strategies, e.g. nnm+trimmed-mean"),
    ("--checkpoint-every", "checkpoint_every", "write a checkpoint every K rounds (0: never)"),
    ("--ray-address", "ray.address", "join an existing Ray cluster: auto or HOST:PORT"),
)

#: Config keys of FLAGS whose values are names: kept as given, never parsed as YAML.
NAME_KEYS = frozenset({"strategy", "dataset", "partition", "model", "engine", "out", "attack",
                       "aggregator", "participation.process", "ray.address"})


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2
        self.exit(2, f"error: {message}\n")


def _epilog() -> str:
    import strategies
    from fedagg.data import dataset_names

    return (
        f"strategies: {', '.join(strategies.names())}\n"
        f"datasets:   {', '.join(dataset_names())}\n\n"
        "Any config key can also be set as key=value (e.g. participation.args.a=0.05)."
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m simulations.run",
        description="Run a federated simulation and write its run directory "
        "(config.yaml, metrics.csv, model.safetensors, summary.json).",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config file (keys as in docs/quickstart.md)")
    for flag, key, help_text in FLAGS:
        parser.add_argument(flag, dest=key.replace(".", "__"), metavar=key.split(".")[-1].upper(), help=help_text)
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its latest checkpoint "
                        "(its config.yaml is used; flags and overrides are not allowed)")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    parser.add_argument("--log", action="append", default=[], metavar="TRACKER",
                        help="also log to tensorboard and/or mlflow (repeat or comma list; "
                        "needs pip install 'fedagg[trackers]'; see simulations/trackers.py)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def collect_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Flags and ``key=value`` pairs as a dotted-key mapping (flags first, then pairs)."""
    from simulations.config import parse_override

    out: dict[str, Any] = {}
    for _flag, key, _help in FLAGS:
        raw = getattr(args, key.replace(".", "__"))
        if raw is not None:
            out[key] = yaml.safe_load(raw) if raw.strip() else None
            if key in NAME_KEYS:
                out[key] = raw  # names stay strings (e.g. a dataset called "on")
    for text in args.overrides:
        key, value = parse_override(text)
        out[key] = value
    return out


def resume_config(args: argparse.Namespace) -> Any:
    """The config of the run to resume (its own config.yaml, pointing at its own directory)."""
    from pathlib import Path

    from simulations.config import load_config

    if args.config or args.overrides or any(getattr(args, k.replace(".", "__")) for _, k, _ in FLAGS):
        raise ConfigError("resume", "--resume takes the run's own config.yaml; drop the other flags")
    run_dir = Path(args.resume)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError("resume", f"{run_dir} is not a run directory (no config.yaml)")
    return load_config(run_dir / "config.yaml", {"out": str(run_dir)})


def quiet_logs() -> None:
    """Flower logs every message at INFO; keep the console for the progress bar."""
    logging.getLogger("flwr").setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)  # key=value overrides may sit between flags
    if not args.verbose:
        quiet_logs()
    try:
        from simulations.config import load_config
        from simulations.runner import Simulation
        from simulations.trackers import Trackers, check_installed, parse_names

        if args.resume:
            cfg = resume_config(args)
        else:
            cfg = load_config(args.config, collect_overrides(args))
        names = parse_names(args.log)
        check_installed(names)  # before anything is written
        sim = Simulation(cfg, overwrite=args.overwrite, progress=not args.no_progress,
                         resume=bool(args.resume))
        trackers = Trackers(names, sim.run_dir, sim.config)
        trackers.attach(sim)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from simulations.runner import RunError

    try:
        result = sim.run()
        trackers.finish(result)
    except KeyboardInterrupt:
        print(f"\ninterrupted: metrics of the completed rounds are in {sim.run_dir}", file=sys.stderr)
        return 130
    except RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:  # found by the engine (e.g. a profile needs a GPU the cluster lacks)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        trackers.close()  # after a failure (finish closed them otherwise)
    s = result.summary
    print(f"{s['strategy']} on {s['dataset']}: final test accuracy {100 * s['final_test_accuracy']:.2f} % "
          f"after {s['rounds']} rounds ({s['wall_seconds']:.1f} s) → {result.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
