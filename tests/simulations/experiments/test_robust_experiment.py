"""The Byzantine-robustness study driver (``simulations.experiments.robust``): the paper protocol
in its config, tuning on a seed the table does not use, the headline window, the claim table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from simulations.experiments import robust as exp_robust


def test_config_is_the_flag_papers_parameter_server_protocol():
    exp = exp_robust.load_experiment()
    base = exp["base"]
    # PS-SGD: 15 workers, one minibatch gradient each per round, sent as Δ = −g
    assert base["num_clients"] == 15 and base["local_steps"] == 1 and base["lr"] == 1.0
    assert base["momentum"] == 0.0
    # server SGD: momentum 0.9, weight decay 5e-4, step decay 0.2
    assert (base["server_momentum"], base["server_weight_decay"], base["server_lr_decay"]) == (
        0.9, 5e-4, 0.2)
    assert sorted(exp["f"]) == [0, 1, 2, 3] and len(exp["seeds"]) >= 3 and not exp["seeds_by_f"]
    # every f runs the paper's attack; a worst case needs every attack at that f
    assert all("random" in exp_robust.attacks_at(exp, f) for f in exp["f"] if f)
    assert {"random", "alie", "ipm", "signflip", "minmax"} <= set(exp["attacks"])
    assert {"flag", "multikrum", "bulyan", "median", "trimmed-mean", "meamed", "phocas",
            "geomedian", "centered-clipping"} <= set(exp["aggregators"])
    assert exp["tuning"]["seed"] not in exp["seeds"]
    for agg in exp["aggregators"]:
        key, values = exp_robust.tune_grid(exp, agg)
        assert key == "server_lr" and len(values) >= 4
        np.testing.assert_allclose(np.diff(np.log10(values)), 0.25, atol=0.01)
    out = exp_robust.Path("runs/x")
    tune = exp_robust.make_tune_jobs(exp, out)
    assert {j.seed for j in tune} == {exp["tuning"]["seed"]}
    assert all(j.config["num_byzantine"] == 0 and "attack" not in j.config for j in tune)
    mk = next(j for j in tune if j.aggregator == "multikrum")
    assert mk.config["strategy_args"]["f"] == exp["tuning"]["f"]  # the rule's tolerance
    jobs = exp_robust.make_jobs(exp, out, {a: 0.1 for a in exp["aggregators"]})
    n_aggs, n_seeds = len(exp["aggregators"]), len(exp["seeds"])
    per_cell = sum(len(exp_robust.attacks_at(exp, f)) for f in exp["f"])
    assert exp_robust.attacks_at(exp, 0) == ["none"]
    assert per_cell == 1 + 3 * len(exp["attacks"])  # f = 0 clean; every attack at f = 1, 2, 3
    assert len(jobs) == n_aggs * n_seeds * per_cell
    assert exp_robust.full_fs(exp) == [0, 1, 2, 3]
    exp["attacks_by_f"] = {1: ["random"]}  # a subset of the columns at one f
    assert exp_robust.attacks_at(exp, 1) == ["random"] and exp_robust.full_fs(exp) == [0, 2, 3]
    assert len(exp_robust.make_jobs(exp, out)) == n_aggs * n_seeds * (per_cell - 4)
    assert {j.config["server_lr"] for j in jobs} == {0.1}
    assert len({j.run_dir for j in [*jobs, *tune]}) == len(jobs) + len(tune)


@pytest.mark.parametrize(("edit", "field"), [
    (lambda e: e["tuning"].update(seed=0), "tuning.seed"),                    # a table seed
    (lambda e: e["tuning"].update(f=-1), "tuning.f"),
    (lambda e: e["tuning"].update(bogus=1), "tuning.bogus"),
    (lambda e: e["aggregators"]["flag"].update(tune={"server_lr": [0.1]}),
     "aggregators.flag.tune.server_lr"),
    (lambda e: e["aggregators"]["flag"].update(server_lr=0.1), "aggregators.flag.tune.server_lr"),
    (lambda e: e.pop("tuning"), "aggregators.bulyan.tune"),  # grid, no tuning (keys sorted)
    (lambda e: e["base"].pop("eval_last"), "last_rounds"),                    # not evaluated
    (lambda e: e.update(last_rounds=0), "last_rounds"),
    (lambda e: e.update(attacks_by_f={1: ["nope"]}), "attacks_by_f.1"),
    (lambda e: e.update(name="../elsewhere"), "name"),
    (lambda e: e.update(claims="yes"), "claims"),
])
def test_config_errors_name_the_field(edit, field, tmp_path):
    exp = yaml.safe_load(exp_robust.DEFAULT_CONFIG.read_text())
    edit(exp)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp))
    with pytest.raises(exp_robust.ConfigError) as exc:
        exp_robust.load_experiment(path)
    assert exc.value.field == field


def _cell(seeds, headline):
    return {"seeds": seeds, "headline": headline, "earlier": headline}


def test_plateau_check_names_the_cells_that_still_move():
    results = {"3": {"random": {"flag": {"headline": [0.50, 0.52], "earlier": [0.40, 0.44]},
                                "median": {"headline": [0.8, 0.8], "earlier": [0.8, 0.801]}}}}
    text = exp_robust.plateau_markdown(results)
    assert "flag (f=3, random): +9.0" in text and "median" not in text.split("point:")[1]
    assert "largest 9.00" in text


def test_paired_gaps_verdicts_and_claim_table():
    results = {"3": {"random": {"flag": _cell([0, 1, 2], [0.80, 0.82, 0.90]),
                                "median": _cell([2, 0, 1], [0.70, 0.75, 0.78]),
                                "krum": _cell([0, 1, 2], [0.85, 0.80, 0.95])},
                     "alie": {"flag": _cell([0, 1, 2], [0.5, 0.5, 0.5]),
                              "median": _cell([0, 1, 2], [0.6, 0.6, 0.6]),
                              "krum": _cell([0, 1, 2], [0.1, 0.1, 0.1])}}}
    gaps = exp_robust.paired_gap(results, 3, "random", "flag", "median")
    np.testing.assert_allclose(gaps, [0.80 - 0.75, 0.82 - 0.78, 0.90 - 0.70])  # paired by seed
    assert exp_robust.verdict(gaps) == "holds"
    assert exp_robust.verdict(np.array([-0.05, 0.02, -0.01])) == "mixed"
    assert exp_robust.verdict(np.array([-0.05, -0.02])) == "fails"
    assert exp_robust.paired_gap(results, 2, "random", "flag", "median") is None
    exp = {"f": [0, 3], "seeds": [0, 1, 2], "seeds_by_f": {}, "attacks_by_f": {},
           "attacks": {"random": {}, "alie": {}},
           "aggregators": {"flag": {}, "median": {}, "krum": {}}, "last_rounds": 50,
           "base": {"rounds": 600}}
    table = exp_robust.claims_markdown(results, exp)
    # FA − median: +0.097 mean; worst cases: FA 0.5 (alie), median min(0.743, 0.6) = 0.6
    assert "| FA − rule | `random`, f = 3 | worst case, f = 3 |" in table
    exp["attacks_by_f"] = {3: ["random"]}  # a worst case needs every attack
    assert "worst case" not in exp_robust.claims_markdown(results, exp)
    assert exp_robust.full_fs(exp) == [0]
    exp["attacks_by_f"] = {}
    assert "| median | +9.7 ± 9.0 (holds) | -10.0 |" in table
    assert "| krum | -2.7 ± 4.0 (mixed) | +40.0 |" in table


@pytest.mark.slow
def test_quick_variant_tunes_then_runs_the_table(tmp_path):
    out, doc = tmp_path / "q", tmp_path / "robust.md"
    argv = ["--quick", "--out", str(out), "--docs", str(doc), "--figures", str(tmp_path / "fig"),
            "--workers", "1"]
    assert exp_robust.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    exp = exp_robust.load_experiment(quick=True)
    for cell in res["tuning"].values():
        assert cell["chosen"] == cell["values"][int(np.nanargmax(cell["scores"]))]
    assert set(res["tuning"]) == set(exp["aggregators"])
    for agg in exp["aggregators"]:  # the table ran with the tuned learning rate
        cfg = yaml.safe_load((out / "f3" / "alie" / agg / "seed-0" / "config.yaml").read_text())
        assert cfg["server_lr"] == res["tuning"][agg]["chosen"]
        assert len(res["results"]["3"]["alie"][agg]["headline"]) == 1
    text = doc.read_text()
    assert "<!-- robust:claims -->" in text and "| mean |" in text
    assert (tmp_path / "fig" / "robust_curves.png").is_file()
    # a second invocation reuses every run
    assert exp_robust.main([*argv, "--report-only"]) == 0


def test_leak_measures_the_attackers_direction_in_each_aggregate():
    from simulations.experiments import robust_leak

    gen = np.random.default_rng(0)
    d = 2000
    honest = 0.05 * gen.standard_normal((12, d)) + 0.02 * gen.standard_normal(d)
    attackers = gen.random((3, d))
    rows = {r["rule"]: r for r in robust_leak.leak_rows(honest, attackers)}
    assert rows["mean"]["leak"] > 0.9  # the mean is 3/15 of the attackers' 0.5·1 plus noise
    np.testing.assert_allclose(rows["mean"]["along"],
                               np.vstack([attackers, honest]).mean(0).sum() / np.sqrt(d))
    # Multi-Krum and Bulyan select honest updates only; the coordinate-wise rules and FA do not
    assert rows["multikrum"]["leak"] < 0.05 and rows["bulyan"]["leak"] < 0.05
    assert rows["multikrum"]["cos_honest"] == pytest.approx(1.0)
    assert rows["flag"]["leak"] > 0.3  # the attackers' common direction is in FA's subspace
    assert rows["median"]["leak"] > 0.3 and rows["trimmed-mean"]["leak"] > 0.3
    assert all(0 <= r["leak"] <= 1 for r in rows.values())


def test_leak_cli_refuses_a_directory_without_a_model(tmp_path, capsys):
    from simulations.experiments import robust_leak

    assert robust_leak.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: run_dir:")


def test_fedavg_style_config_is_a_second_table_with_its_own_names(tmp_path):
    path = exp_robust.DEFAULT_CONFIG.parent / "robust_fedavg_mnist1d.yaml"
    exp = exp_robust.load_experiment(path)
    assert exp["name"] == "robust_fedavg" and exp["claims"] is False
    assert exp["base"]["local_steps"] > 1 and "server_momentum" not in exp["base"]
    assert exp_robust.load_experiment()["name"] == "robust"  # the default
    doc = tmp_path / "robust.md"
    exp_robust.write_docs("first", doc)
    exp_robust.write_docs("second", doc, name="robust_fedavg")
    text = doc.read_text()
    assert "<!-- robust:results -->\nfirst\n" in text
    assert "<!-- robust_fedavg:results -->\nsecond\n" in text


def test_curve_figure_of_an_f_without_finished_cells_is_drawn_empty(tmp_path):
    """``--report-only`` on a grid still running: an f with no finished cell yet gives an empty
    figure instead of failing the report."""
    path = exp_robust.plot_curves({}, 3, ["random", "alie"], ["mean", "flag"], {}, tmp_path / "c.png")
    assert path.stat().st_size > 1000


def test_a_stopped_curve_follows_the_run_configs_evaluation_schedule():
    """A stopped run's curve is laid on the rounds a complete run evaluates (every
    ``eval_every``-th and each of the last ``eval_last``), its last test carried forward."""
    from simulations.experiments import grid

    rounds, acc = grid.stopped_curve(np.array([0.0, 10.0, 14.0]), np.array([0.1, 0.5, 0.2]),
                                     {"rounds": 30, "eval_every": 10, "eval_last": 3})
    assert rounds.tolist() == [0.0, 10.0, 20.0, 28.0, 29.0, 30.0]
    assert acc.tolist() == [0.1, 0.5, 0.2, 0.2, 0.2, 0.2]
