"""Engine parity: the same seed gives the same final model on inline, ray and flower."""

from __future__ import annotations

import numpy as np
import pytest

from simulations.config import load_config
from simulations.runner import Simulation

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]

CFG = {"rounds": 3, "num_clients": 4, "clients_per_round": 3, "model": "cnn", "local_steps": 4,
       "dataset_args": {"num_samples": 1000}, "partition": "dirichlet", "alpha": 0.5}


def run(tmp_path, engine: str):
    cfg = load_config(None, {**CFG, "engine": engine, "out": str(tmp_path / engine),
                             "ray": {"num_workers": 2}})
    return Simulation(cfg).run()


def test_ray_and_flower_engines_match_inline_to_1e6(tmp_path) -> None:
    ref = run(tmp_path, "inline")
    for engine in ("ray", "flower"):
        res = run(tmp_path, engine)
        for k in ref.arrays:
            np.testing.assert_allclose(res.arrays[k], ref.arrays[k], rtol=0, atol=1e-6)
        assert [r["clients"] for r in res.rows] == [r["clients"] for r in ref.rows]
        assert res.rows[-1]["test_accuracy"] == pytest.approx(ref.rows[-1]["test_accuracy"], abs=1e-9)
    assert ref.rows[-1]["test_accuracy"] > ref.rows[0]["test_accuracy"]  # it trained
