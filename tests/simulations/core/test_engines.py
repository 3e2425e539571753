"""Engine parity and determinism: the same seed gives the same final model on every engine and
whatever the number of Ray workers."""

from __future__ import annotations

import os

import numpy as np
import pytest

from simulations.core.config import load_config
from simulations.core.runner import Simulation

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]

CFG = {"rounds": 3, "num_clients": 5, "clients_per_round": 4, "model": "cnn", "local_steps": 4,
       "dataset_args": {"num_samples": 1000}, "partition": "dirichlet", "alpha": 0.5}


def run(tmp_path, engine: str, workers: int = 2):
    cfg = load_config(None, {**CFG, "engine": engine, "out": str(tmp_path / f"{engine}{workers}"),
                             "ray": {"num_workers": workers, "cpus_per_worker": 2 / max(workers, 2)}})
    return Simulation(cfg).run()


def csv_without_time(run_dir) -> list[list[str]]:
    lines = [ln.split(",") for ln in (run_dir / "metrics.csv").read_text().splitlines()]
    col = lines[0].index("seconds")
    drop = {col, *(i for i, name in enumerate(lines[0]) if name == "worker_restarts")}
    return [[c for i, c in enumerate(ln) if i not in drop] for ln in lines]


def assert_same_model(a, b) -> None:
    assert a.arrays.keys() == b.arrays.keys()
    for k in a.arrays:
        assert a.arrays[k].tobytes() == b.arrays[k].tobytes(), k


def test_engines_agree_and_ray_is_deterministic_whatever_the_worker_count(tmp_path) -> None:
    import ray

    ref = run(tmp_path, "inline")
    assert ref.rows[-1]["test_accuracy"] > ref.rows[0]["test_accuracy"]  # it trained
    profiled = {"profiles": [{"name": "fast", "count": 3, "local_steps": 6},
                             {"name": "slow", "count": 2, "speed": 0.2, "resources": {"slow_worker": 1}}],
                "simulated_time": {"deadline": 0.2}}
    ref_prof = Simulation(load_config(None, {**CFG, **profiled, "engine": "inline",
                                             "out": str(tmp_path / "inline-prof")})).run()
    ray.init(include_dashboard=False, num_cpus=2, resources={"slow_worker": 1}, logging_level="WARNING")
    try:
        two = run(tmp_path, "ray", workers=2)
        one = run(tmp_path, "ray", workers=1)
        three = run(tmp_path, "ray", workers=3)
        prof = Simulation(load_config(None, {**CFG, **profiled, "engine": "ray", "ray": {"num_workers": 2},
                                             "out": str(tmp_path / "ray-prof")})).run()
    finally:
        ray.shutdown()
    # two worker pools (one needs the custom resource) give the inline result bit for bit
    assert_same_model(prof, ref_prof)
    assert csv_without_time(prof.run_dir) == csv_without_time(ref_prof.run_dir)
    assert any(r["stragglers"] > 0 for r in prof.rows[1:])
    for res in (two, one, three):  # bit-identical metrics (time aside) and model
        assert_same_model(res, ref)
        assert csv_without_time(res.run_dir) == csv_without_time(ref.run_dir)
    pythonpath = os.environ.get("PYTHONPATH")
    flower = run(tmp_path, "flower")  # stock run_simulation starts (and stops) its own Ray
    assert os.environ.get("PYTHONPATH") == pythonpath  # Flower's Ray backend rewrites it; put back
    for k in ref.arrays:
        np.testing.assert_allclose(flower.arrays[k], ref.arrays[k], rtol=0, atol=1e-6)
    assert [r["clients"] for r in flower.rows] == [r["clients"] for r in ref.rows]
