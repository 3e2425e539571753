"""CLI input validation: one-line errors naming the field, exit code 2, nothing on disk."""

from __future__ import annotations

import pytest

from simulations import run as run_cli
from simulations.core.config import load_config


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--strategy", "fedsgd"], "strategy"),
        (["--alpha", "-0.5", "--partition", "dirichlet"], "alpha"),
        (["--alpha", "0", "--partition", "dirichlet"], "alpha"),
        (["--clients-per-round", "20", "--num-clients", "10"], "clients_per_round"),
        (["colour=blue"], "colour"),
        (["--rounds", "many"], "rounds"),
        (["--engine", "spark"], "engine"),
        (["--dataset", "cifar"], "dataset"),
        (["--model", "resnet"], "model"),
        (["--partition", "iid", "--alpha", "0.3"], "alpha"),
        (["participation.process=sometimes", "--engine", "inline"], "participation"),
        (["strategy_args.proximal_mu=-1", "--strategy", "fedprox"], "strategy_args.proximal_mu"),
        (["strategy_args.server_lr=2"], "strategy_args.server_lr"),
        (["ray.num_workers=0"], "ray.num_workers"),
    ],
)
def test_invalid_input_exits_2_with_one_line_naming_the_field(argv, field, cli_refuses) -> None:
    cli_refuses(argv, field)


def test_argparse_errors_are_one_line_too(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        run_cli.main(["--rounds"])
    assert exc.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_help_lists_strategies_and_datasets(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        run_cli.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "strategies:" in text and "fedavg" in text and "mnist1d" in text and "hf:<name>" in text
    for flag in ("--rounds", "--num-clients", "--clients-per-round", "--dataset", "--partition",
                 "--alpha", "--model", "--local-steps", "--lr", "--seed", "--engine", "--out", "--config"):
        assert flag in text


def test_config_file_then_flags_then_overrides(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("rounds: 7\nlr: 0.2\nparticipation:\n  process: bernoulli\n")
    cfg = load_config(path, {"lr": 0.3, "participation.args": {}})
    assert cfg.rounds == 7 and cfg.lr == 0.3 and cfg.participation.process == "bernoulli"


def test_bad_yaml_and_missing_config_file(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: [1, 2\n")
    assert run_cli.main(["--config", str(bad)]) == 2
    assert capsys.readouterr().err.startswith("error: config")
    assert run_cli.main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "file not found" in capsys.readouterr().err


def test_garbage_collection_is_only_paused_in_the_cli_process(tmp_path) -> None:
    """``python -m simulations.run`` imports and sets up with the collector off, then freezes what it
    built and turns it back on; a caller of ``main()`` (a test, a notebook) keeps its collector as
    it was: enabled, nothing frozen."""
    import gc
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    frozen = gc.get_freeze_count()
    argv = ["--rounds", "1", "--num-clients", "4", "--engine", "inline", "--out", str(tmp_path / "a"),
            "--no-progress", "dataset_args.num_samples=400"]
    assert run_cli.main(argv) == 0
    assert gc.isenabled() and gc.get_freeze_count() == frozen
    probe = ("import gc, runpy, sys; sys.argv = ['run'] + sys.argv[1:]; "
             "import atexit; atexit.register(lambda: print('GC', gc.isenabled(), gc.get_freeze_count() > 0)); "
             "runpy.run_module('simulations.run', run_name='__main__')")
    argv[-3] = str(tmp_path / "b")
    root = str(Path(run_cli.__file__).resolve().parents[1])  # this checkout's packages
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True,
                         env=env, cwd=root, check=True).stdout
    assert "GC True True" in out, out
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["rounds"] == 1
