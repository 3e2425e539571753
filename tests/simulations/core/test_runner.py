"""End-to-end runs on the inline engine: run directory, determinism, atomic results."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from simulations import run as run_cli
from simulations.core.config import load_config
from simulations.core.results import BASE_COLUMNS, load_arrays, read_metrics
from simulations.core.runner import Simulation

SMALL = {"engine": "inline", "rounds": 3, "num_clients": 5, "model": "mlp",
         "dataset_args": {"num_samples": 1000}, "local_steps": 3}


def csv_without_time(run_dir) -> list[list[str]]:
    """metrics.csv cells, the wall-clock column removed (bit-identical comparison of the rest)."""
    lines = [ln.split(",") for ln in (run_dir / "metrics.csv").read_text().splitlines()]
    col = lines[0].index("seconds")
    return [ln[:col] + ln[col + 1 :] for ln in lines]


def run(tmp_path, name: str, **overrides):
    cfg = load_config(None, {**SMALL, **overrides, "out": str(tmp_path / name)})
    return Simulation(cfg).run()


def test_run_directory_holds_config_metrics_model_summary(tmp_path) -> None:
    res = run(tmp_path, "a")
    files = {p.name for p in res.run_dir.iterdir()}
    assert {"config.yaml", "metrics.csv", "model.safetensors", "summary.json"} <= files
    assert not [f for f in files if f.endswith(".tmp")]
    rows = read_metrics(res.run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert list(rows[0])[: len(BASE_COLUMNS)] == list(BASE_COLUMNS)
    assert rows[1]["clients"] == 5 and rows[1]["bytes_up"] > 0
    summary = json.loads((res.run_dir / "summary.json").read_text())
    assert summary["final_test_accuracy"] == rows[-1]["test_accuracy"]
    model = load_arrays(res.run_dir / "model.safetensors")
    assert set(model) == set(res.arrays) and all(np.isfinite(v).all() for v in model.values())
    cfg = load_config(res.run_dir / "config.yaml")
    assert cfg.rounds == 3 and cfg.model == "mlp"


def test_run_directory_files_follow_the_umask(tmp_path) -> None:
    """Results are shared with colleagues: not mkstemp's private 0o600."""
    old = os.umask(0o022)
    try:
        res = run(tmp_path, "perm", checkpoint_every=1)
    finally:
        os.umask(old)
    written = [p for p in res.run_dir.rglob("*") if p.is_file()]
    assert written and {stat.S_IMODE(p.stat().st_mode) for p in written} == {0o644}
    folders = [p for p in res.run_dir.rglob("*") if p.is_dir()]
    assert {stat.S_IMODE(p.stat().st_mode) for p in folders} <= {0o755}


def test_same_seed_same_numbers_different_seed_different_numbers(tmp_path) -> None:
    a, b = run(tmp_path, "a"), run(tmp_path, "b")
    c = run(tmp_path, "c", seed=1)
    for k in a.arrays:
        assert np.array_equal(a.arrays[k], b.arrays[k])
    assert csv_without_time(a.run_dir) == csv_without_time(b.run_dir)
    assert not all(np.array_equal(a.arrays[k], c.arrays[k]) for k in a.arrays)


def test_clients_per_round_samples_clients(tmp_path) -> None:
    res = run(tmp_path, "a", clients_per_round=2)
    assert all(r["clients"] == 2 for r in res.rows[1:])


def test_finished_run_is_not_overwritten_without_flag(tmp_path, capsys) -> None:
    out = tmp_path / "r"
    args = ["--engine", "inline", "--rounds", "1", "--num-clients", "3", "--model", "mlp",
            "dataset_args.num_samples=600", "--out", str(out), "--no-progress"]
    assert run_cli.main(args) == 0
    before = (out / "metrics.csv").read_text()
    assert run_cli.main(args) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert (out / "metrics.csv").read_text() == before
    assert run_cli.main([*args, "--overwrite"]) == 0


def test_interrupted_run_leaves_only_complete_files(tmp_path) -> None:
    """Ctrl-C after round 2: config + metrics of completed rounds, no model/summary, no temp files."""
    cfg = load_config(None, {**SMALL, "rounds": 5, "out": str(tmp_path / "i")})

    def interrupt(row):
        if row["round"] == 2:
            raise KeyboardInterrupt

    sim = Simulation(cfg, on_round=interrupt)
    with pytest.raises(KeyboardInterrupt):
        sim.run()
    files = sorted(p.name for p in (tmp_path / "i").iterdir())
    assert files == ["config.yaml", "metrics.csv"]
    assert [r["round"] for r in read_metrics(tmp_path / "i")] == [0, 1, 2]


@pytest.mark.slow
def test_fedavg_iid_mnist1d_reaches_85_percent_and_dirichlet_is_lower(tmp_path) -> None:
    common = {"engine": "inline", "rounds": 30, "num_clients": 10, "model": "cnn", "lr": 0.1,
              "momentum": 0.9, "local_steps": 20}
    iid = Simulation(load_config(None, {**common, "out": str(tmp_path / "iid")})).run()
    skew = Simulation(load_config(None, {**common, "partition": "dirichlet", "alpha": 0.1,
                                         "out": str(tmp_path / "dir")})).run()
    assert iid.final_accuracy >= 0.85, iid.final_accuracy
    assert skew.final_accuracy <= iid.final_accuracy - 0.05, (skew.final_accuracy, iid.final_accuracy)


def test_idle_clients_cost_no_model_memory(tmp_path) -> None:
    """200 clients, 10 per round: one model instance in the process, a bounded tensor cache, and
    per-client server state limited to partition indices."""
    import gc

    from fedagg.models import MLP
    from simulations.core.client_app import TENSOR_CACHE

    def live_models() -> int:
        gc.collect()
        return sum(type(o) is MLP for o in gc.get_objects())

    before = live_models()
    cfg = load_config(None, {**SMALL, "num_clients": 200, "clients_per_round": 10, "rounds": 2,
                             "dataset_args": {"num_samples": 2000}, "out": str(tmp_path / "m")})
    sim = Simulation(cfg)
    sim.run()
    assert live_models() - before == 1
    assert len(sim.runtime._tensors) <= min(TENSOR_CACHE, 20)
    per_client = sum(a.nbytes for a in [*sim.data.client_train, *sim.data.client_test]) / 200
    assert per_client < 100  # ~8 samples x 8-byte indices


# ------------------------------------------------------------------------------ eval schedule
def test_eval_last_evaluates_every_round_at_the_end(tmp_path) -> None:
    res = run(tmp_path, "ev", rounds=10, eval_every=4, eval_last=3)
    evaluated = [r["round"] for r in res.rows if np.isfinite(float(r["test_accuracy"]))]
    assert evaluated == [0, 4, 8, 9, 10]  # every 4th, then each of the last 3
    cfg = load_config(None, {**SMALL, "rounds": 10, "eval_every": 4, "eval_last": 3})
    assert [r for r in range(1, 11) if cfg.evaluates(r)] == [4, 8, 9, 10]
    assert [r for r in range(1, 11) if cfg.model_copy(update={"eval_last": 0}).evaluates(r)] == [4, 8, 10]


@pytest.mark.parametrize(("over", "hint"), [({"eval_last": 5}, "eval_every > 1"),
                                            ({"eval_every": 5, "eval_last": 11}, "at most rounds")])
def test_eval_last_that_does_nothing_or_exceeds_the_run_is_an_error(over, hint) -> None:
    from fedagg.errors import ConfigError

    with pytest.raises(ConfigError) as exc:
        load_config(None, {**SMALL, "rounds": 10, **over})
    assert exc.value.field == "eval_last" and hint in str(exc.value)
