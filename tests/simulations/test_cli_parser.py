"""Every command line shares ``simulations.cli.Parser``: a usage error is one line on stderr
(``error: …``, no usage block) and exit status 2."""

from __future__ import annotations

import importlib
import sys

import pytest

from simulations.cli import Parser

#: module → argv with an unknown flag (job: its own flags come before ``--``).
CLIS = {
    "simulations.run": ["--no-such-flag"],
    "simulations.plot": ["runs/x", "--no-such-flag"],
    "simulations.sweep": ["sweep.yaml", "--no-such-flag"],
    "simulations.merge": ["merge.yaml", "--no-such-flag"],
    "simulations.evaluate": ["runs/x", "--no-such-flag"],
    "simulations.pretrain": ["--no-such-flag"],
    "simulations.submit": ["--address", "http://127.0.0.1:1", "--no-such-flag"],
    "simulations.job": ["--no-such-flag", "--"],
    "simulations.demo": ["--no-such-flag"],
    "simulations.bench.__main__": ["fedau", "--no-such-flag"],
    "simulations.bench.fedau": ["--no-such-flag"],
    "simulations.experiments.fedau": ["--no-such-flag"],
    "simulations.experiments.fedins": ["--no-such-flag"],
    "simulations.experiments.robust": ["--no-such-flag"],
    "simulations.experiments.merging": ["--no-such-flag"],
    "simulations.experiments.robust_leak": ["runs/x", "--no-such-flag"],
}


@pytest.mark.parametrize("module", sorted(CLIS))
def test_usage_errors_are_one_line_with_exit_2(module, capsys):
    with pytest.raises(SystemExit) as exc:
        importlib.import_module(module).main(CLIS[module])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err == "error: unrecognized arguments: --no-such-flag\n"


def test_bench_aggregators_reads_sys_argv(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["aggregators", "--repeats", "x"])
    with pytest.raises(SystemExit) as exc:
        importlib.import_module("simulations.bench.aggregators").main()
    assert exc.value.code == 2
    assert capsys.readouterr().err == "error: argument --repeats: invalid int value: 'x'\n"


def test_parser_error_is_one_line_and_help_still_works(capsys):
    p = Parser(prog="x")
    p.add_argument("--n", type=int, choices=[1, 2])
    with pytest.raises(SystemExit) as exc:
        p.parse_args(["--n", "3"])
    assert exc.value.code == 2
    assert capsys.readouterr().err == "error: argument --n: invalid choice: 3 (choose from 1, 2)\n"
    with pytest.raises(SystemExit) as exc:
        p.parse_args(["--help"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("usage: x")
