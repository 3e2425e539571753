"""The FedIns experiment driver: the grid it builds from the config, and its table helpers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedagg.errors import ConfigError
from simulations.experiments import fedins as exp_mod


def test_grid_from_the_shipped_config(tmp_path):
    exp = exp_mod.load_experiment()
    jobs = exp_mod.make_jobs(exp, tmp_path)
    assert len(jobs) == 3 * 4 * 3
    by_name = {j.name: j for j in jobs}
    cell = by_name["4-domains/fedins/seed-2"].config
    assert cell["strategy"] == "fedins" and cell["model"] == "fedins" and cell["seed"] == 2
    # method, level and base merge: backbone from base, pool from the method, dpc from the level
    assert cell["model_args"] == {"backbone": "mnist1d-transformer", "pool_size": 10, "top_k": 3}
    assert cell["partition_args"] == {"num_domains": 4, "alpha": 0.5, "domains_per_client": 4}
    assert Path(cell["out"]) == tmp_path / "4-domains" / "fedins" / "seed-2"
    ssf = by_name["1-domain/ssf/seed-0"].config
    assert ssf["strategy"] == "fedavg" and ssf["model_args"] == {"backbone": "mnist1d-transformer"}
    assert ssf["partition_args"]["domains_per_client"] == 1
    sweep = exp_mod.make_sweep_jobs(exp, tmp_path)
    assert {j.seed for j in sweep} == {100} and {j.level for j in sweep} == {"4-domains"}
    assert all(j.config["rounds"] == 10 for j in sweep)
    assert len(sweep) == sum(len(v) for v in exp["sweep"]["lr"].values())
    quick = exp_mod.load_experiment(quick=True)
    assert quick["seeds"] == [0] and quick["base"]["model_args"]["backbone"].endswith("-quick")


def test_bad_cells_are_named(tmp_path):
    exp = exp_mod.load_experiment()
    exp["methods"]["ssf"]["model_args"] = {"pool_size": 3}  # not a parameter of model ssf
    with pytest.raises(ConfigError, match=r"1-domain\.ssf\.model_args"):
        exp_mod.make_jobs(exp, tmp_path)


def test_slot_overlap_and_paired_gap():
    hist = np.array([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0], [1.0, 0.5, 0.5, 0.0]])  # k = 2
    ov = exp_mod.slot_overlap(hist)
    np.testing.assert_allclose(np.diag(ov), 1.0)
    assert ov[0, 1] == 0.0 and ov[0, 2] == pytest.approx(0.75) and ov[1, 2] == pytest.approx(0.25)
    results = {"L": {"a": {"seeds": [0, 1, 2], "final": [0.70, 0.60, 0.65]},
                     "b": {"seeds": [2, 0, 1], "final": [0.60, 0.68, 0.61]}}}
    mean, std, gaps = exp_mod.paired_gap(results, "L", "a", "b")
    assert gaps == pytest.approx([2.0, -1.0, 5.0])
    assert mean == pytest.approx(2.0) and std == pytest.approx(3.0)
    table = exp_mod.accuracy_table(results, ["a", "b"])
    assert "| a | **65.0 ± 5.0** |" in table and "| b | 63.0 ± 4.4 |" in table
