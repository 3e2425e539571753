"""Reliability: kill -9 + resume is bit-identical; injected failures are survived and counted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import strategies
from simulations.core.checkpoint import from_jsonable, read_latest, to_jsonable
from simulations.core.config import load_config
from simulations.core.results import load_arrays, read_metrics
from simulations.core.runner import RunError, Simulation

REPO = Path(__file__).resolve().parents[3]

#: Strategies whose kill/resume round trip is checked (the issue names these four), plus
#: fedavg with the server optimiser (its momentum buffer is strategy state).
RESUME_STRATEGIES = ["fedavg", "fedau", "flag", "mifa", "fedavg+server-optimizer"]
SERVER_OPTIMIZER = ["--server-momentum", "0.9", "--server-weight-decay", "5e-4",
                    "--server-lr-decay", "0.5", "--server-lr-decay-every", "3"]


def csv_without_time(run_dir: Path) -> list[list[str]]:
    lines = [ln.split(",") for ln in (run_dir / "metrics.csv").read_text().splitlines()]
    col = lines[0].index("seconds")
    return [ln[:col] + ln[col + 1 :] for ln in lines]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "simulations.run", "--no-progress", *args]


def run_args(strategy: str, out: Path) -> list[str]:
    strategy, _, variant = strategy.partition("+")
    args = SERVER_OPTIMIZER if variant == "server-optimizer" else []
    args = [*args, "--strategy", strategy, "--engine", "inline", "--rounds", "8", "--num-clients", "6",
            "--model", "cnn", "--local-steps", "15", "--out", str(out), "--checkpoint-every", "2",
            "participation.process=bernoulli", "participation.probabilities.kind=constant",
            "participation.probabilities.p=0.7", "dataset_args.num_samples=1200"]
    if strategy == "flag":
        args += ["--attack", "random", "--num-byzantine", "1"]
    return args


@pytest.mark.slow
@pytest.mark.parametrize("strategy", RESUME_STRATEGIES)
def test_kill_9_after_a_checkpoint_then_resume_equals_an_uninterrupted_run(strategy, tmp_path) -> None:
    assert strategy.partition("+")[0] in strategies.names()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    full, part = tmp_path / "full", tmp_path / "part"
    subprocess.run(cli(*run_args(strategy, full)), check=True, cwd=REPO, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    proc = subprocess.Popen(cli(*run_args(strategy, part)), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = part / "checkpoints" / "latest"
    deadline = time.monotonic() + 120
    while not latest.exists():
        assert proc.poll() is None, "the run ended before writing a checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (part / "summary.json").exists(), "the run finished before it could be killed"
    killed_at = read_latest(part).round
    assert killed_at < 8

    subprocess.run(cli("--resume", str(part)), check=True, cwd=REPO, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    a, b = load_arrays(full / "model.safetensors"), load_arrays(part / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a)  # bit for bit
    assert csv_without_time(full) == csv_without_time(part)


def test_checkpoint_state_roundtrips_through_json() -> None:
    state = {"key": np.arange(5, dtype=np.uint32), "pos": 3, "inner": {"x": np.ones((2, 2), bool)},
             "gauss": float("nan"), "names": ["a", "b"], "none": None}
    back = from_jsonable(__import__("json").loads(__import__("json").dumps(to_jsonable(state))))
    assert back["key"].dtype == np.uint32 and np.array_equal(back["key"], state["key"])
    assert back["inner"]["x"].dtype == bool and back["pos"] == 3 and np.isnan(back["gauss"])
    assert back["names"] == ["a", "b"] and back["none"] is None


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, capsys) -> None:
    from simulations import run as run_cli

    out = tmp_path / "r"
    assert run_cli.main(["--engine", "inline", "--rounds", "1", "--num-clients", "2", "--model", "mlp",
                         "dataset_args.num_samples=400", "--out", str(out), "--no-progress"]) == 0
    assert run_cli.main(["--resume", str(out)]) == 2
    assert capsys.readouterr().err.strip().startswith("error: resume")
    assert run_cli.main(["--resume", str(out), "--rounds", "3"]) == 2


def test_too_few_replies_fail_the_run_with_a_clear_message(tmp_path) -> None:
    cfg = load_config(None, {"engine": "inline", "rounds": 3, "num_clients": 4, "model": "mlp",
                             "dataset_args": {"num_samples": 600}, "min_replies": 3,
                             "faults": {"crash_prob": 0.6}, "out": str(tmp_path / "f")})
    with pytest.raises(RunError, match=r"round \d+: \d usable replies from 4 clients \(min_replies=3"):
        Simulation(cfg).run()
    assert (tmp_path / "f" / "metrics.csv").exists()
    assert not (tmp_path / "f" / "summary.json").exists()


def test_a_stopped_run_tests_the_model_it_ends_with(tmp_path) -> None:
    """The round that stops a run is evaluated even off the evaluation schedule, so the last
    metrics row measures the model the run ends with (a study counts a diverged run by it)."""
    cfg = load_config(None, {"engine": "inline", "rounds": 6, "num_clients": 4, "model": "mlp",
                             "dataset_args": {"num_samples": 600}, "min_replies": 3, "eval_every": 100,
                             "faults": {"crash_prob": 0.6}, "out": str(tmp_path / "f")})
    with pytest.raises(RunError, match=r"round (\d+)"):
        Simulation(cfg).run()
    rows = read_metrics(tmp_path / "f")
    last = rows[-1]
    assert int(last["round"]) >= 1 and int(last["clients"]) < 3 and last["test_accuracy"] != ""
    assert 0.0 <= float(last["test_accuracy"]) <= 1.0
    assert all(r["test_accuracy"] in ("", "nan") for r in rows[1:-1])  # off-schedule rounds stay untested


def test_injected_crashes_are_counted_and_the_run_goes_on(tmp_path) -> None:
    cfg = load_config(None, {"engine": "inline", "rounds": 4, "num_clients": 10, "model": "mlp",
                             "dataset_args": {"num_samples": 1000}, "faults": {"crash_prob": 0.2},
                             "out": str(tmp_path / "c")})
    rows = Simulation(cfg).run().rows[1:]
    failures = [r["failures"] for r in rows]
    assert sum(failures) > 0
    assert all(r["clients"] + r["failures"] == 10 for r in rows)
    # the same faults on a rerun (keyed by seed, round, client)
    again = Simulation(load_config(None, {**cfg.model_dump(), "out": str(tmp_path / "d")})).run().rows[1:]
    assert [r["failures"] for r in again] == failures


def test_faults_needing_ray_are_rejected_on_other_engines() -> None:
    from fedagg.errors import ConfigError

    with pytest.raises(ConfigError, match="faults"):
        load_config(None, {"engine": "inline", "faults": {"hang": [[1, 0]]}, "round_timeout": 5})
    with pytest.raises(ConfigError, match="round_timeout"):
        load_config(None, {"engine": "ray", "faults": {"hang": [[1, 0]]}})
    with pytest.raises(ConfigError, match="faults"):
        load_config(None, {"engine": "ray", "num_clients": 3, "faults": {"kill_worker": [[1, 7]]}})


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_crashes_a_hang_and_a_killed_worker_on_ray(tmp_path) -> None:
    """20 % crashes + one hanging client + one killed Ray actor: the run finishes, failures are
    counted, and accuracy stays within 3 points of a failure-free run."""
    common = {"rounds": 12, "num_clients": 10, "model": "mlp", "local_steps": 10, "lr": 0.1,
              "momentum": 0.9, "seed": 1}
    clean = Simulation(load_config(None, {**common, "engine": "inline", "out": str(tmp_path / "clean")})).run()
    cfg = load_config(None, {
        **common, "engine": "ray", "ray": {"num_workers": 2}, "round_timeout": 20,
        "faults": {"crash_prob": 0.2, "hang": [[3, 4]], "hang_seconds": 600, "kill_worker": [[5, 2]]},
        "out": str(tmp_path / "faulty"),
    })
    res = Simulation(cfg).run()
    rows = read_metrics(res.run_dir)[1:]
    assert sum(r["failures"] for r in rows) >= 12  # ~20 % of 120 client-rounds, plus the killed worker
    assert rows[2]["timeouts"] >= 1  # the hanging client of round 3
    assert rows[-1]["worker_restarts"] >= 2  # the hung worker and the killed one were replaced
    assert all(np.isfinite(v).all() for v in load_arrays(res.run_dir / "model.safetensors").values())
    assert abs(res.final_accuracy - clean.final_accuracy) <= 0.03, (res.final_accuracy, clean.final_accuracy)
