"""FedAU through the runner, the CLI and the experiment driver (inline engine, tiny sizes)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from simulations.core.config import build_config, load_config
from simulations.core.results import load_arrays, read_metrics
from simulations.core.runner import Simulation
from simulations.experiments import fedau as exp_fedau
from simulations.run import main as run_main

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
    assert base["num_clients"] == 100 and base["rounds"] >= 2000
    assert base["partition"] == "dirichlet" and base["alpha"] == 0.1
    assert (base["local_steps"], base["batch_size"], base["momentum"]) == (5, 16, 0.0)
    assert "server_momentum" not in base  # plain SGD on the server
    probs = base["participation"]["probabilities"]
    assert (probs["kind"], probs["mean"], probs["floor"]) == ("heterogeneous", 0.1, 0.02)
    assert exp["patterns"]["markov"]["args"] == {"a": 0.05}
    assert exp["patterns"]["cyclic"]["args"] == {"period": 100}
    assert set(exp["patterns"]) == {"bernoulli", "markov", "cyclic"}
    assert len(exp["seeds"]) >= 3
    paper = ["fedau", "fedau-k50", "fedavg-participating", "fedavg-all", "known-p", "mifa",
             "fedvarp"]
    assert set(paper) <= set(exp["methods"])
    assert exp["methods"]["fedau-k50"]["strategy_args"]["cutoff"] == 50
    # the extra rows: the two FedAvg baselines at the untuned 0.562 (their tuned lrs collapsed)
    extra = set(exp["methods"]) - set(paper)
    assert extra == {"fedavg-participating-lr0.562", "fedavg-all-lr0.562"}
    assert exp_fedau.tune_grid(exp, "fedavg-participating-lr0.562") is None
    assert exp_fedau.tune_grid(exp, "fedavg-all-lr0.562") is None
    assert exp_fedau.baseline_methods(exp) == ["fedavg-participating", "fedavg-all",
                                               "fedavg-participating-lr0.562", "fedavg-all-lr0.562"]
    # headline: the last 50 rounds, every one of them evaluated
    assert exp["last_rounds"] == 50 and base["eval_last"] >= 50
    # tuning: every method and pattern, a grid in steps of 10^0.25, on a seed the table does not
    # use, at half the table's length
    assert exp["tuning"]["seed"] not in exp["seeds"] and exp["tuning"]["pattern"] == "each"
    assert exp["tuning"]["rounds"] == base["rounds"] // 2
    for method in paper:
        key, values = exp_fedau.tune_grid(exp, method)
        assert key == "lr"
        np.testing.assert_allclose(np.diff(np.log10(values)), 0.25, atol=0.01)
    assert exp["methods"]["fedavg-all"]["server_lr"] == 10.0
    tune = exp_fedau.make_tune_jobs(exp, exp_fedau.Path("runs/x"))  # validates every config
    sizes = [len(exp_fedau.tune_grid(exp, m)[1]) for m in paper]
    assert min(sizes) >= 4 and len(tune) == 3 * sum(sizes) and {j.config["rounds"] for j in tune} == {exp["tuning"]["rounds"]}
    assert {j.seed for j in tune} == {exp["tuning"]["seed"]}
    jobs = exp_fedau.make_jobs(exp, exp_fedau.Path("runs/x"))
    assert len(jobs) == 3 * len(exp["methods"]) * len(exp["seeds"])
    assert len({j.run_dir for j in [*jobs, *tune]}) == len(jobs) + len(tune)
    quick = exp_fedau.load_experiment(quick=True)
    assert quick["seeds"] == [0] and quick["base"]["rounds"] < base["rounds"]


@pytest.mark.parametrize(("edit", "field"), [
    (lambda e: e["tuning"].update(seed=0), "tuning.seed"),                     # a table seed
    (lambda e: e["tuning"].update(pattern="poisson"), "tuning.pattern"),
    (lambda e: e["tuning"].update(bogus=1), "tuning.bogus"),
    (lambda e: e["methods"]["fedau"].update(tune={"lr": [0.1]}), "methods.fedau.tune.lr"),
    (lambda e: e["methods"]["fedau"].update(tune={"lr": [0.1, -1]}), "methods.fedau.tune.lr"),
    (lambda e: e["methods"]["fedau"].update(tune={"momentum": [0.1, 0.5]}),
     "methods.fedau.tune.momentum"),
    (lambda e: e["methods"]["fedau"].update(lr=0.1), "methods.fedau.tune.lr"),  # set twice
    (lambda e: e.pop("tuning"), "methods.fedau.tune"),                         # grid, no tuning
    (lambda e: e["base"].pop("eval_last"), "last_rounds"),                     # not evaluated
    (lambda e: e.update(last_rounds=3000), "last_rounds"),
])
def test_experiment_config_errors_name_the_field(edit, field, tmp_path):
    import yaml

    exp = yaml.safe_load(exp_fedau.DEFAULT_CONFIG.read_text())
    edit(exp)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp))
    with pytest.raises(exp_fedau.ConfigError) as exc:
        exp_fedau.load_experiment(path)
    assert exc.value.field == field


def test_late_mean_and_paired_gaps():
    rounds = np.array([0, 10, 20, 28, 29, 30], dtype=float)
    acc = np.array([0.1, 0.2, 0.3, 0.5, 0.6, 0.7])
    assert exp_fedau.late_mean(rounds, acc, 3) == pytest.approx(0.6)       # rounds 28–30
    assert exp_fedau.late_mean(rounds, acc, 3, end=20) == pytest.approx(0.3)  # rounds 18–20
    assert np.isnan(exp_fedau.late_mean(rounds, acc, 3, end=5))
    res = {"b": {"fedau": {"seeds": [0, 1, 2], "headline": [0.60, 0.62, 0.61]},
                 "fedavg-participating": {"seeds": [2, 0, 1], "headline": [0.58, 0.55, 0.63]}}}
    np.testing.assert_allclose(exp_fedau.paired_gap(res, "b", "fedau", "fedavg-participating"),
                               [5.0, -1.0, 3.0])  # paired by seed, not by position
    assert exp_fedau.paired_gap(res, "b", "fedau", "mifa") is None


def _results(gaps: dict[str, dict[str, list[float]]]) -> dict:
    """Synthetic results: FedAU at 0.6 on seeds 0–2, each other method at 0.6 − gap/100."""
    out: dict = {}
    for pattern, per in gaps.items():
        out[pattern] = {"fedau": {"seeds": [0, 1, 2], "headline": [0.6] * 3}}
        for m, g in per.items():
            out[pattern][m] = {"seeds": [0, 1, 2], "headline": [0.6 - x / 100 for x in g]}
    return out


def test_claim_verdicts():
    ok = {"fedavg-participating": [3, 4, 5], "fedavg-all": [2, -1, 5], "known-p": [-1, -1, -2],
          "fedvarp": [-1, -1, -1]}
    rows = exp_fedau.claims(_results({"b": ok, "m": ok}), ["b", "m"])
    verdicts = {c: v for c, _, v in rows}
    assert verdicts["FedAU above `fedavg-participating` in every pattern"].startswith(
        "**holds** (every pattern, every seed)")
    # fedavg-all's gap (2 ± 3) is positive on average but within seed noise: not shown
    assert verdicts["FedAU above `fedavg-all` in every pattern"] == (
        "**not shown**: above on average, but within seed noise in b, m (mean gap below its std "
        "over seeds; below in 2 of 6 seed-pattern pairs)")
    mixed = {**ok, "fedavg-all": [5, -0.2, 6]}  # 3.6 ± 3.3: above the noise, one seed below
    verdicts_mixed = {c: v for c, _, v in exp_fedau.claims(_results({"b": mixed}), ["b"])}
    assert verdicts_mixed["FedAU above `fedavg-all` in every pattern"] == \
        "**holds** on average (below in 1 of 3 seed-pattern pairs)"
    assert verdicts["FedAU within a couple of points of the `known-p` oracle"].startswith("**holds**")
    assert "higher in 2 of 2" in verdicts["`fedvarp` (O(N·d) memory) may be higher than FedAU"]
    numbers = {c: n for c, n, _ in rows}
    assert "b +4.0 ± 1.0" in numbers["FedAU above `fedavg-participating` in every pattern"]
    bad = {**ok, "fedavg-participating": [-1, -2, 0.5], "known-p": [-3, -3, -3]}
    verdicts = {c: v for c, _, v in exp_fedau.claims(_results({"b": ok, "m": bad}), ["b", "m"])}
    assert verdicts["FedAU above `fedavg-participating` in every pattern"] == \
        "**no** (not above in m)"
    assert verdicts["FedAU within a couple of points of the `known-p` oracle"].startswith("**no**")
    # a pair whose baseline run collapsed is named in the verdict
    res = _results({"b": ok})
    res["b"]["fedavg-participating"]["collapsed"] = [False, False, True]
    verdicts = {c: v for c, _, v in exp_fedau.claims(res, ["b"])}
    assert verdicts["FedAU above `fedavg-participating` in every pattern"].endswith(
        "in 1 of the 3 pairs the `fedavg-participating` run collapsed")
    assert exp_fedau.collapsed_seeds(res, "b", "fedavg-participating") == [2]


TUNED = {
    "seeds": [0, 1], "last_rounds": 2,
    "base": {**TINY, "rounds": 6, "eval_every": 3, "eval_last": 2},
    "patterns": {"bernoulli": {"process": "bernoulli"}, "markov": {"process": "markov"}},
    "tuning": {"seed": 7, "rounds": 4, "pattern": "bernoulli"},
    "methods": {"fedau": {"strategy": "fedau", "tune": {"lr": [0.01, 0.3]}},
                "fedavg-participating": {"strategy": "fedavg-participating"}},
}


def test_experiment_driver_end_to_end(tmp_path):
    """Tiny grid (2 patterns × 2 methods × 2 seeds, FedAU's lr tuned on bernoulli) in process:
    tuning, the chosen value in the table's runs, tables, figures, ω read back, reuse."""
    import yaml

    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(TUNED))
    docs = tmp_path / "fedau.md"
    docs.write_text("# FedAU\n\n<!-- fedau:claims -->\nOLD\n<!-- /fedau:claims -->\n\n"
                    "<!-- fedau:results -->\nSTALE-TEXT\n<!-- /fedau:results -->\n\nend\n")
    out = tmp_path / "runs"
    argv = ["--config", str(path), "--out", str(out), "--docs", str(docs), "--figures",
            str(tmp_path / "fig"), "--workers", "1"]
    assert exp_fedau.main(argv) == 0
    text = docs.read_text()
    assert "STALE-TEXT" not in text and "OLD" not in text
    assert text.endswith("<!-- /fedau:results -->\n\nend\n")
    assert "| paper's claim |" in text and "| fedau |" in text and " ± " in text
    assert "**Tuned learning rates**" in text
    assert (tmp_path / "fig" / "fedau_convergence.png").stat().st_size > 1000
    assert (tmp_path / "fig" / "fedau_weights.png").stat().st_size > 1000
    res = json.loads((out / "results.json").read_text())
    # tuning: two runs on seed 7, 4 rounds; the chosen lr has the best last-2-rounds mean
    cell = res["tuning"]["bernoulli"]["fedau"]
    assert cell["values"] == [0.01, 0.3] and "fedavg-participating" not in res["tuning"]["bernoulli"]
    scores = []
    for lr in (0.01, 0.3):
        run = out / "tune" / "bernoulli" / "fedau" / f"lr-{lr:g}"
        rows = [r for r in read_metrics(run) if r["phase"] == "train"]
        assert len(rows) == 4 and yaml.safe_load((run / "config.yaml").read_text())["seed"] == 7
        scores.append(np.mean([float(r["test_accuracy"]) for r in rows[-2:]]))
    np.testing.assert_allclose(cell["scores"], scores)
    best = [0.01, 0.3][int(np.argmax(scores))]
    assert cell["chosen"] == best and res["chosen"]["markov"]["fedau"] == best  # one pattern: all
    for pattern in ("bernoulli", "markov"):
        for seed in (0, 1):
            run = out / pattern / "fedau" / f"seed-{seed}"
            assert yaml.safe_load((run / "config.yaml").read_text())["lr"] == best
    cell = res["results"]["bernoulli"]["fedau"]
    assert cell["seeds"] == [0, 1] and cell["rounds"] == [0.0, 3.0, 5.0, 6.0]
    assert cell["collapsed"] == [False, False]
    rows = [r for r in read_metrics(out / "bernoulli" / "fedau" / "seed-0") if r["phase"] == "train"]
    assert cell["headline"][0] == pytest.approx(np.mean([float(r["test_accuracy"]) for r in rows[-2:]]))
    part = load_arrays(out / "bernoulli" / "fedau" / "seed-0" / "participation.safetensors")
    assert part["p"].shape == (12,) and np.array_equal(part["p"], part["rate"])
    # a second invocation reuses every finished run
    summary = out / "bernoulli" / "fedau" / "seed-0" / "summary.json"
    mtime = summary.stat().st_mtime
    assert exp_fedau.main(argv) == 0
    assert summary.stat().st_mtime == mtime
    # an unfinished run: its whole cell is left out of the tables and named as missing
    (out / "bernoulli" / "fedavg-participating" / "seed-1" / "summary.json").unlink()
    assert exp_fedau.main([*argv, "--report-only"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["missing"] == ["bernoulli/fedavg-participating (1 of 2 seeds finished)"]
    assert "fedavg-participating" not in res["results"]["bernoulli"]
    assert "**The grid is not finished**" in docs.read_text()
    assert exp_fedau.main(argv) == 0  # runs it again
    assert json.loads((out / "results.json").read_text())["missing"] == []
    # a table run the runner stopped (failed.json: every update of a round rejected) is a
    # collapse: counted with its last evaluated accuracy, its curve flat from there
    run = out / "markov" / "fedau" / "seed-1"
    lines = (run / "metrics.csv").read_text().splitlines(keepends=True)
    kept = [ln.split(",") for ln in lines[1:] if int(ln.split(",")[0]) <= 4]
    kept[-1][5] = "0.123"  # the runner tests the model a run stops with, off the schedule too
    (run / "metrics.csv").write_text(lines[0] + "".join(",".join(r) for r in kept))
    (run / "summary.json").unlink()
    acc3 = 0.123
    (run / "failed.json").write_text(json.dumps({"error": "round 4: 0 usable replies", "last_round": 4,
                                                 "final_test_accuracy": acc3, "wall_seconds": 0.0}))
    assert exp_fedau.main([*argv, "--report-only"]) == 0
    res = json.loads((out / "results.json").read_text())
    cell = res["results"]["markov"]["fedau"]
    assert res["missing"] == [] and cell["stopped"] == [None, 4] and cell["collapsed"][1]
    assert cell["headline"][1] == cell["final"][1] == pytest.approx(acc3)
    assert cell["rounds"] == [0.0, 3.0, 5.0, 6.0]  # the table's evaluation rounds
    assert len(cell["curves"][1]) == len(cell["curves"][0]) == len(cell["rounds"])
    assert cell["curves"][1][1] == pytest.approx(float(kept[3][5]))  # round 3: as it ran
    assert cell["curves"][1][2:] == pytest.approx([acc3, acc3])     # then flat at the stop's test
    assert "markov/fedau seed 1 (stopped at round 4)" in docs.read_text()
    assert exp_fedau.main(argv) == 0  # a stopped run is finished: not run again
    assert not (run / "summary.json").exists()
    # a different chosen value makes the table's runs stale: they are redone, not reused
    other = [0.01, 0.3][1 - [0.01, 0.3].index(best)]
    TUNED2 = {**TUNED, "methods": {**TUNED["methods"],
                                   "fedau": {"strategy": "fedau", "tune": {"lr": [other, 0.05]}}}}
    path.write_text(yaml.safe_dump(TUNED2))
    assert exp_fedau.main([*argv, "--report-only"]) == 1  # lr-0.05 has not run
    assert exp_fedau.main(argv) == 0
    chosen = json.loads((out / "results.json").read_text())["chosen"]["bernoulli"]["fedau"]
    lr = yaml.safe_load((out / "bernoulli" / "fedau" / "seed-0" / "config.yaml").read_text())["lr"]
    assert lr == chosen and chosen in (other, 0.05) and chosen != best
    assert summary.stat().st_mtime != mtime


@pytest.mark.slow
def test_quick_variant_runs_the_whole_pipeline(tmp_path):
    """``--quick``: tuning and table of the real config at smoke size (every pattern, method)."""
    out = tmp_path / "q"
    assert exp_fedau.main(["--quick", "--out", str(out), "--workers", "1"]) == 0
    res = json.loads((out / "results.json").read_text())
    exp = exp_fedau.load_experiment(quick=True)
    assert set(res["results"]) == set(exp["patterns"])
    assert all(set(cells) == set(exp["methods"]) for cells in res["results"].values())
    tuned = {m for m in exp["methods"] if exp_fedau.tune_grid(exp, m) is not None}
    assert set(res["chosen"]["cyclic"]) == tuned and len(tuned) == 7
    assert (out / "fedau_convergence.png").is_file()


def test_cyclic_rate_is_on_rounds_over_the_cycle():
    from fedagg.participation import build_process

    p = np.array([0.02, 0.1, 0.55])
    proc = build_process("cyclic", p, np.random.RandomState(0), period=20)
    # on max(1, round(20 p)) = 1, 2, 11 rounds; off max(1, 20 − on) = 19, 18, 9 rounds
    np.testing.assert_allclose(exp_fedau.availability_rate(proc, p), [1 / 20, 2 / 20, 11 / 20])
    np.testing.assert_array_equal(exp_fedau.availability_rate(None, p), p)


def test_collapsed_is_a_fall_below_half_the_best_or_a_non_finite_model(tmp_path):
    from simulations.core.results import save_arrays

    acc = np.array([0.1, 0.5, 0.6, 0.3])
    save_arrays(tmp_path / "model.safetensors", {"w": np.ones((2, 2)), "b": np.zeros(2)})
    assert not exp_fedau.diverged(tmp_path)
    assert not exp_fedau.collapsed(acc, 0.3, tmp_path)       # exactly half the best: kept
    assert exp_fedau.collapsed(acc, 0.29, tmp_path)
    save_arrays(tmp_path / "model.safetensors", {"w": np.ones((2, 2)), "b": np.array([0, np.nan])})
    assert exp_fedau.diverged(tmp_path) and exp_fedau.collapsed(acc, 0.6, tmp_path)
