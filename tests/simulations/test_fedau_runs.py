"""FedAU through the runner, the CLI and the experiment driver (inline engine, tiny sizes)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from simulations.config import build_config, load_config
from simulations.experiments import fedau as exp_fedau
from simulations.results import load_arrays, read_metrics
from simulations.run import main as run_main
from simulations.runner import Simulation

TINY = {
    "dataset": "mnist1d", "dataset_args": {"num_samples": 1000}, "num_clients": 12,
    "partition": "dirichlet", "alpha": 0.5, "test_fraction": 0.0, "model": "mlp",
    "model_args": {"hidden": [16]}, "local_steps": 2, "batch_size": 8, "lr": 0.1,
    "engine": "inline",
    "participation": {"process": "bernoulli", "probabilities": {"kind": "heterogeneous", "mean": 0.4}},
}


def test_cli_runs_fedau_with_markov_availability(tmp_path, capsys):
    out = tmp_path / "run"
    code = run_main(["--strategy", "fedau", "--participation", "markov", "--engine", "inline",
                     "--num-clients", "12", "--rounds", "6", "--model", "mlp", "--out", str(out),
                     "--no-progress", "participation.args.a=0.5", "dataset_args.num_samples=1000",
                     "model_args.hidden=[16]", "local_steps=2", "strategy_args.cutoff=3"])
    assert code == 0, capsys.readouterr().err
    rows = [r for r in read_metrics(out) if r["phase"] == "train"]
    assert len(rows) == 6
    assert "fedau_weight_mean" in rows[0]
    state = load_arrays(out / "strategy_state.safetensors")
    assert state["fedau.weights"].shape == (12,)
    assert state["fedau.cutoff"].tolist() == [3] and state["fedau.server_round"].tolist() == [6]
    # every accepted reply is one participation: count them against the estimator's state
    participations = sum(int(r["clients"]) for r in rows)
    last = state["fedau.last_participation"]
    assert participations > 0
    assert int((last > 0).sum()) == len({c for c in range(12) if last[c] > 0})
    weights = [r["fedau_weight_max"] for r in rows if r["clients"] > 0]
    assert all(1.0 <= w <= 3.0 for w in weights)  # intervals are capped at K = 3


def test_fedau_estimator_counts_every_accepted_reply(tmp_path):
    cfg = build_config({**TINY, "strategy": "fedau", "rounds": 8, "out": str(tmp_path / "r")})
    res = Simulation(cfg).run()
    rows = [r for r in res.rows if r["phase"] == "train"]
    state = load_arrays(res.run_dir / "strategy_state.safetensors")
    # K = ∞: each participation closes exactly one interval
    assert int(state["fedau.interval_count"].sum()) == sum(int(r["clients"]) for r in rows)
    # the first weight of a client is 1; weights never fall below 1
    assert all(r["fedau_weight_min"] >= 1.0 for r in rows if r["clients"] > 0)


def test_known_p_receives_the_runs_probabilities(tmp_path):
    cfg = build_config({**TINY, "strategy": "known-p", "rounds": 1, "out": str(tmp_path / "k")})
    sim = Simulation(cfg)
    np.testing.assert_array_equal(sim.strategy.probabilities, sim.probabilities)
    assert sim.probabilities.min() >= 0.02 and sim.probabilities.std() > 0  # heterogeneous


@pytest.mark.parametrize("name", ["fedavg-participating", "fedavg-all", "mifa", "fedvarp"])
def test_baselines_validate_through_the_config(name):
    cfg = load_config(None, {"strategy": name, "participation.process": "cyclic",
                             "participation.args": {"period": 10}})
    assert cfg.strategy == name and cfg.clients_per_round is None


def test_experiment_config_has_the_required_grid():
    exp = exp_fedau.load_experiment()
    base = exp["base"]
    assert base["num_clients"] >= 100
    assert base["partition"] == "dirichlet" and base["alpha"] == 0.1
    assert base["participation"]["probabilities"]["kind"] == "heterogeneous"
    assert set(exp["patterns"]) == {"bernoulli", "markov", "cyclic"}
    assert len(exp["seeds"]) == 5
    assert set(exp["methods"]) == {"fedau", "fedau-k50", "fedavg-participating", "fedavg-all",
                                   "known-p", "mifa", "fedvarp"}
    assert exp["methods"]["fedau-k50"]["strategy_args"]["cutoff"] == 50
    jobs = exp_fedau.make_jobs(exp, exp_fedau.Path("runs/x"))  # validates all 105 configs
    assert len(jobs) == 3 * 7 * 5
    assert len({j.run_dir for j in jobs}) == len(jobs)
    quick = exp_fedau.load_experiment(quick=True)
    assert quick["seeds"] == [0] and quick["base"]["rounds"] < base["rounds"]
    assert quick["base"]["num_clients"] == base["num_clients"]


def test_experiment_driver_end_to_end(tmp_path):
    """Tiny grid (1 pattern × 2 methods × 2 seeds) in process: runs, table, figures, ω read back."""
    cfg = {
        "seeds": [0, 1],
        "base": {**TINY, "rounds": 4, "eval_every": 2},
        "patterns": {"bernoulli": {"process": "bernoulli"}},
        "methods": {"fedau": {"strategy": "fedau"},
                    "fedavg-participating": {"strategy": "fedavg-participating"}},
    }
    import yaml

    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    docs = tmp_path / "fedau.md"
    docs.write_text("# FedAU\n\n<!-- fedau:results -->\nSTALE-TEXT\n<!-- /fedau:results -->\n\nend\n")
    out = tmp_path / "runs"
    code = exp_fedau.main(["--config", str(path), "--out", str(out), "--docs", str(docs),
                           "--figures", str(tmp_path / "fig"), "--workers", "1"])
    assert code == 0
    text = docs.read_text()
    assert "STALE-TEXT" not in text and text.endswith("<!-- /fedau:results -->\n\nend\n")
    assert "| fedau |" in text and "| fedavg-participating |" in text and " ± " in text
    assert (tmp_path / "fig" / "fedau_convergence.png").stat().st_size > 1000
    assert (tmp_path / "fig" / "fedau_weights.png").stat().st_size > 1000
    res = json.loads((out / "results.json").read_text())
    cell = res["results"]["bernoulli"]["fedau"]
    assert cell["seeds"] == [0, 1] and len(cell["final"]) == 2
    assert cell["rounds"] == [0.0, 2.0, 4.0]
    part = load_arrays(out / "bernoulli" / "fedau" / "seed-0" / "participation.safetensors")
    assert part["p"].shape == (12,) and np.array_equal(part["p"], part["rate"])
    # a second invocation reuses the finished runs
    mtime = (out / "bernoulli" / "fedau" / "seed-0" / "summary.json").stat().st_mtime
    assert exp_fedau.main(["--config", str(path), "--out", str(out), "--docs", str(docs),
                           "--figures", str(tmp_path / "fig"), "--workers", "1"]) == 0
    assert (out / "bernoulli" / "fedau" / "seed-0" / "summary.json").stat().st_mtime == mtime


def test_cyclic_rate_is_on_rounds_over_the_cycle():
    from fedagg.participation import build_process

    p = np.array([0.02, 0.1, 0.55])
    proc = build_process("cyclic", p, np.random.RandomState(0), period=20)
    # on max(1, round(20 p)) = 1, 2, 11 rounds; off max(1, 20 − on) = 19, 18, 9 rounds
    np.testing.assert_allclose(exp_fedau.availability_rate(proc, p), [1 / 20, 2 / 20, 11 / 20])
    np.testing.assert_array_equal(exp_fedau.availability_rate(None, p), p)
