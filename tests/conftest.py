"""Test-wide settings: local Ray stays on 127.0.0.1, no usage stats, headless matplotlib."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import logging  # noqa: E402

logging.getLogger("flwr").setLevel(logging.WARNING)


import pytest  # noqa: E402


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test (as in a 1-CPU worker: reproducible float results), restored after."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def cli_refuses(tmp_path, capsys):
    """``cli_refuses(argv, field)``: ``python -m simulations.run ARGV`` exits 2 with one line
    ``error: FIELD…`` on stderr and writes nothing."""

    def check(argv: list[str], field: str) -> None:
        from simulations import run as run_cli

        out = tmp_path / "run"
        code = run_cli.main([*argv, "--out", str(out), "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert code == 2
        assert len(err.splitlines()) == 1, err
        assert err.startswith(f"error: {field}"), err
        assert not out.exists()

    return check
