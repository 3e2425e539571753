"""``python -m simulations.run``: run one federated simulation.

    python -m simulations.run --strategy fedavg --rounds 20 --num-clients 10
    python -m simulations.run --config simulations/configs/fedau_mnist1d.yaml seed=3 lr=0.1

Precedence: defaults < ``--config`` YAML < flags < ``key=value`` overrides (dotted keys reach nested
settings, e.g. ``participation.args.a=0.05``). Invalid input exits with code 2 and a one-line message
naming the field; nothing is written to disk before the input is known to be valid. Ctrl-C exits
130 and SIGTERM 143, each with one line saying where the completed rounds are.
"""

from __future__ import annotations

import gc

#: Run as ``python -m simulations.run``: no cyclic garbage collection while the process imports
#: torch, Flower and the runner and sets the run up (hundreds of thousands of long-lived objects,
#: several full collections of ~0.1 s each), then those objects are frozen out of later collections
#: (:func:`main`). Only for the process itself: a caller of :func:`main` keeps its collector.
_OWN_PROCESS = __name__ == "__main__"
if _OWN_PROCESS:
    gc.disable()

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

import yaml  # noqa: E402

from fedagg.errors import ConfigError  # noqa: E402
from simulations.cli import Parser  # noqa: E402
from simulations.core.config import ENGINES  # noqa: E402

#: (flag, config key, help). Values are parsed as YAML scalars and validated by the config schema.
FLAGS: tuple[tuple[str, str, str], ...] = (
    ("--strategy", "strategy", "aggregation strategy (see the list below)"),
    ("--rounds", "rounds", "number of federated rounds"),
    ("--num-clients", "num_clients", "total number of clients N"),
    ("--clients-per-round", "clients_per_round", "clients trained per round among the available (default: all)"),
    ("--dataset", "dataset", "dataset (see the list below)"),
    ("--partition", "partition", "how data is split among clients (see the list below)"),
    ("--alpha", "alpha", "Dirichlet concentration α for label skew (dirichlet/domain partitions)"),
    ("--model", "model", "model (see the list below); a strategy that needs one selects it"),
    ("--local-steps", "local_steps", "local SGD steps per round"),
    ("--batch-size", "batch_size", "local minibatch size"),
    ("--lr", "lr", "client learning rate"),
    ("--server-lr", "server_lr", "server (global) learning rate η"),
    ("--server-momentum", "server_momentum", "server heavy-ball momentum m in [0, 1) on the aggregate "
     "(delta strategies; fedavgm: its β)"),
    ("--server-weight-decay", "server_weight_decay", "server weight decay λ >= 0 (torch SGD's weight_decay)"),
    ("--server-lr-decay", "server_lr_decay", "multiply server_lr by this factor in (0, 1] every "
     "--server-lr-decay-every rounds"),
    ("--server-lr-decay-every", "server_lr_decay_every", "rounds between server_lr decays (>= 1)"),
    ("--seed", "seed", "run seed (data split, participation, training, attacks)"),
    ("--engine", "engine", "where clients run: auto (inline unless the run needs Ray; it prints its "
     "choice), ray, flower (stock run_simulation) or inline (no Ray)"),
    ("--out", "out", "run directory (default runs/<strategy>-<timestamp>)"),
    ("--participation", "participation.process", "client availability process (see the list below)"),
    ("--attack", "attack", "Byzantine attack applied by --num-byzantine clients (see the list below)"),
    ("--num-byzantine", "num_byzantine", "number of Byzantine clients (needs --attack)"),
    ("--aggregator", "aggregator", "aggregation pipeline for robust strategies, e.g. nnm+trimmed-mean "
     "(stages: see the list below)"),
    ("--checkpoint-every", "checkpoint_every", "write a checkpoint every K rounds (0: never)"),
    ("--ray-address", "ray.address", "join an existing Ray cluster: auto or HOST:PORT"),
)

#: Config keys of FLAGS whose values are names: kept as given, never parsed as YAML.
NAME_KEYS = frozenset({"strategy", "dataset", "partition", "model", "engine", "out", "attack",
                       "aggregator", "participation.process", "ray.address"})


def _epilog() -> str:
    """The allowed names of every family, from the registries."""
    import textwrap

    import strategies
    from fedagg import aggregators, attacks
    from fedagg.data import PARTITIONERS, dataset_names
    from fedagg.models import model_names
    from fedagg.participation import PROBABILITIES, PROCESSES

    families = (
        ("strategies", strategies.names()),
        ("datasets", dataset_names()),
        ("partitions", PARTITIONERS.names()),
        ("models", model_names()),
        ("participation", PROCESSES.names()),
        ("participation.probabilities.kind", PROBABILITIES.names()),
        ("attacks", attacks.names()),
        ("aggregators", aggregators.names()),
        ("engines", list(ENGINES)),
    )
    lines = [textwrap.fill(", ".join(names), width=100, initial_indent=f"{family}: ",
                           subsequent_indent="    ", break_on_hyphens=False) for family, names in families]
    return "\n".join([*lines, "", "Any config key can also be set as key=value (e.g. participation.args.a=0.05)."])


def _with_default(key: str, help_text: str) -> str:
    """``help_text`` plus the config default of ``key`` (dotted), read from the schema."""
    from simulations.core.config import config_default

    if "(default" in help_text:
        return help_text
    value = config_default(key)
    return f"{help_text} (default: {'none' if value is None else value})"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m simulations.run",
        description="Run a federated simulation and write its run directory "
        "(config.yaml, metrics.csv, model.safetensors, summary.json).",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config file (keys as in docs/quickstart.md)")
    for flag, key, help_text in FLAGS:
        parser.add_argument(flag, dest=key.replace(".", "__"), metavar=key.split(".")[-1].upper(),
                            help=_with_default(key, help_text))
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the interrupted run in RUN_DIR from its "
                        "newest intact checkpoint (its config.yaml is used; flags and overrides are not allowed)")
    parser.add_argument("--overwrite", action="store_true", help="clear the run directory --out (checkpoints "
                        "included) before running; other non-empty folders are never cleared")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    parser.add_argument("--log", action="append", default=[], metavar="TRACKER",
                        help="also log to tensorboard and/or mlflow (repeat or comma list; "
                        "needs pip install 'fedagg[trackers]'; see simulations/core/trackers.py)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def collect_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Flags and ``key=value`` pairs as a dotted-key mapping (flags first, then pairs)."""
    from simulations.core.config import parse_override

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

    from simulations.core.config import load_config

    if args.config or args.overrides or any(getattr(args, k.replace(".", "__")) for _, k, _ in FLAGS):
        raise ConfigError("resume", "--resume takes the run's own config.yaml; drop the other flags")
    run_dir = Path(args.resume)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError("resume", f"{run_dir} is not a run directory (no config.yaml)")
    return load_config(run_dir / "config.yaml", {"out": str(run_dir)})


def check_config_outside(args: argparse.Namespace, run_dir: Any) -> None:
    """Refuse ``--overwrite`` when the ``--config`` file lies in the directory it would clear."""
    from pathlib import Path

    if args.overwrite and args.config and Path(run_dir).resolve() in Path(args.config).resolve().parents:
        raise ConfigError("overwrite", f"--config {args.config} lies in {run_dir}, which --overwrite "
                          "would clear; move the config or choose another --out")


def quiet_logs() -> None:
    """Flower logs every message at INFO; keep the console for the progress bar."""
    logging.getLogger("flwr").setLevel(logging.WARNING)


def check_out(cfg: Any) -> None:
    """ConfigError naming ``out`` when the run directory could not be created or written."""
    from fedagg.io import cannot_create_dir

    why = cannot_create_dir(cfg.run_dir())
    if why is not None:
        raise ConfigError("out", f"{why}; choose another --out")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)  # key=value overrides may sit between flags
    if not args.verbose:
        quiet_logs()
    from simulations.core.engine import sigterm_interrupts, termination_signal

    sim = None
    with sigterm_interrupts():  # SIGTERM: stop like Ctrl-C (Ray shuts down), exit 143
        try:
            try:
                from simulations.core.config import config_warnings, load_config
                from simulations.core.runner import Simulation
                from simulations.core.trackers import Trackers, check_installed, parse_names

                if args.resume:
                    cfg = resume_config(args)
                else:
                    cfg = load_config(args.config, collect_overrides(args))
                    check_config_outside(args, cfg.run_dir())
                check_out(cfg)
                names = parse_names(args.log)
                check_installed(names)  # before anything is written
                for line in config_warnings(cfg):
                    print(f"warning: {line}", file=sys.stderr)
                sim = Simulation(cfg, overwrite=args.overwrite, progress=not args.no_progress,
                                 resume=bool(args.resume))
                trackers = Trackers(names, sim.run_dir, sim.cfg)
                trackers.attach(sim)
            except ConfigError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            finally:
                _collect_again()
            return _run(sim, trackers)
        except KeyboardInterrupt as exc:
            signum = termination_signal(exc)
            what, code = ("terminated", 128 + signum) if signum is not None else ("interrupted", 130)
            where = (f"metrics of the completed rounds are in {sim.run_dir}" if sim is not None
                     else "nothing was written")
            print(f"\n{what}: {where}", file=sys.stderr)
            return code


def _collect_again() -> None:
    """End of set-up in our own process: what exists now lives to the end of the run, so move it
    out of the collector's generations (``gc.freeze``) and turn the collector back on."""
    if _OWN_PROCESS and not gc.isenabled():
        gc.freeze()
        gc.enable()


def _run(sim: Any, trackers: Any) -> int:
    """Run ``sim`` (logging to ``trackers``); print its one-line result or error; the exit code."""
    from simulations.core.runner import RunError

    try:
        result = sim.run()
        trackers.finish(result)
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
