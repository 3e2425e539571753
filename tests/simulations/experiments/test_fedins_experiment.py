"""The FedIns study driver: the grid it builds from the config, tuning, its diagnostics and
tables, and the ``--quick`` pipeline end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedagg.errors import ConfigError
from simulations.experiments import fedins as exp_mod
from simulations.experiments import tuning


def test_grid_from_the_shipped_config(tmp_path):
    exp = exp_mod.load_experiment()
    base = exp["base"]
    # the issue's setting: 8 sensor domains, the reference's pool, top-k and λ, plain SGD
    assert base["dataset_args"] == {"num_samples": 8000, "domain_style": "sensor"}
    assert base["partition_args"] == {"num_domains": 8, "alpha": 0.5}
    assert base["momentum"] == 0.0 and base["rounds"] >= 500
    fi = exp["methods"]["fedins"]
    assert fi["model_args"] == {"pool_size": 25, "top_k": 3} and fi["strategy_args"]["lam"] == 0.1
    assert len(exp["seeds"]) >= 3 and exp["last_rounds"] == 20 and base["eval_last"] >= 20
    assert exp["plateau_gap"] == 100 and exp["query_check"] == ["sensor-polarity", "drift"]
    # tuning: every method, a grid in steps of 10^0.25, on a seed the table does not use
    assert exp["tuning"] == {"seed": 100, "rounds": 125, "level": "8-domains"}
    for method in ("fedins", "ssf"):
        key, values = tuning.check_tune(method, exp["methods"][method])
        assert key == "lr" and len(values) >= 4
        np.testing.assert_allclose(np.diff(np.log10(values)), 0.25, atol=0.01)
    tune = exp_mod.make_tune_jobs(exp, tmp_path)
    assert len(tune) == 11 and {j.seed for j in tune} == {100}
    assert {j.level for j in tune} == {"8-domains"} and {j.config["rounds"] for j in tune} == {125}
    assert Path(tune[0].config["out"]) == tmp_path / "tune" / "8-domains" / "fedins" / "lr-0.316"
    jobs = exp_mod.make_jobs(exp, tmp_path, {lv: {"fedins": 1.0, "ssf": 0.178}
                                             for lv in exp["levels"]})
    assert len(jobs) == 1 * 2 * 3 and list(exp["levels"]) == ["8-domains"]
    by_name = {j.name: j for j in jobs}
    cell = by_name["8-domains/fedins/seed-2"].config
    assert cell["strategy"] == "fedins" and cell["model"] == "fedins" and cell["seed"] == 2
    assert cell["lr"] == 1.0 and "tune" not in cell
    assert cell["model_args"] == {"backbone": "mnist1d-transformer", "pool_size": 25, "top_k": 3}
    assert cell["partition_args"] == {"num_domains": 8, "alpha": 0.5, "domains_per_client": 8}
    assert Path(cell["out"]) == tmp_path / "8-domains" / "fedins" / "seed-2"
    ssf = by_name["8-domains/ssf/seed-0"].config
    assert ssf["strategy"] == "fedavg" and ssf["model"] == "ssf" and ssf["lr"] == 0.178
    assert ssf["model_args"] == {"backbone": "mnist1d-transformer"}
    quick = exp_mod.load_experiment(quick=True)
    assert list(quick["levels"]) == ["1-domain", "8-domains"]
    assert quick["base"]["model_args"]["backbone"].endswith("-quick")
    assert quick["base"]["rounds"] < base["rounds"]


def test_bad_cells_are_named(tmp_path):
    exp = exp_mod.load_experiment()
    exp["methods"]["ssf"]["model_args"] = {"pool_size": 3}  # not a parameter of model ssf
    with pytest.raises(ConfigError, match=r"8-domains\.ssf\.model_args"):
        exp_mod.make_jobs(exp, tmp_path)


@pytest.mark.parametrize(("edit", "field"), [
    (lambda e: e["tuning"].update(seed=0), "tuning.seed"),                     # a table seed
    (lambda e: e["tuning"].update(level="3-domains"), "tuning.level"),
    (lambda e: e["tuning"].update(pattern="each"), "tuning.pattern"),
    (lambda e: e["methods"]["fedins"].update(tune={"lr": [0.1]}), "methods.fedins.tune.lr"),
    (lambda e: e["methods"]["fedins"].update(tune={"lam": [0.1, 0.3]}),
     "methods.fedins.tune.lam"),
    (lambda e: e["methods"]["ssf"].update(lr=0.1), "methods.ssf.tune.lr"),     # set twice
    (lambda e: e.pop("tuning"), "methods.fedins.tune"),                        # grid, no tuning
    (lambda e: e["base"].pop("eval_last"), "last_rounds"),                     # not evaluated
    (lambda e: e.update(plateau_gap=600), "plateau_gap"),
    (lambda e: e.update(query_check=["camera"]), "query_check"),
])
def test_config_errors_name_the_field(edit, field, tmp_path):
    exp = yaml.safe_load(exp_mod.DEFAULT_CONFIG.read_text())
    edit(exp)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp))
    with pytest.raises(ConfigError) as exc:
        exp_mod.load_experiment(path)
    assert exc.value.field == field


def test_tuning_helpers():
    rounds = np.array([0, 10, 20, 28, 29, 30], dtype=float)
    acc = np.array([0.1, 0.2, 0.3, 0.5, 0.6, 0.7])
    assert tuning.late_mean(rounds, acc, 3) == pytest.approx(0.6)         # rounds 28–30
    assert tuning.late_mean(rounds, acc, 3, end=20) == pytest.approx(0.3)  # rounds 18–20
    assert np.isnan(tuning.late_mean(rounds, acc, 3, end=5))
    assert tuning.choose([0.1, 0.3, 1.0], [0.5, float("nan"), 0.6]) == 1.0
    with pytest.raises(ConfigError, match="every value"):
        tuning.choose([0.1, 0.3], [float("nan")] * 2)
    res = {"L": {"a": {"seeds": [0, 1, 2], "headline": [0.70, 0.60, 0.65], "best": [.8, .8, .8]},
                 "b": {"seeds": [2, 0, 1], "headline": [0.60, 0.68, 0.61], "best": [.7, .7, .7]}}}
    g = tuning.paired_gap(res, "L", "a", "b")  # paired by seed, not by position
    np.testing.assert_allclose(g, [2.0, -1.0, 5.0])
    assert tuning.gap_text(g) == "+2.0 ± 3.0"
    np.testing.assert_allclose(tuning.paired_gap(res, "L", "a", "b", "best"), [10.0] * 3)
    assert tuning.paired_gap(res, "L", "a", "c") is None and tuning.gap_text(None) == "–"


def test_routing_diagnostics():
    # purity: the share of samples in the majority label of their key
    assert exp_mod.purity(np.array([0, 0, 0, 1]), np.array([2, 2, 3, 3])) == pytest.approx(0.75)
    assert exp_mod.effective_number(np.array([5, 0, 0])) == pytest.approx(1.0)
    assert exp_mod.effective_number(np.array([2, 2, 2, 2])) == pytest.approx(4.0)
    hist = np.array([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0], [1.0, 0.5, 0.5, 0.0]])  # k = 2
    ov = exp_mod.slot_overlap(hist)
    np.testing.assert_allclose(np.diag(ov), 1.0)
    assert ov[0, 1] == 0.0 and ov[0, 2] == pytest.approx(0.75) and ov[1, 2] == pytest.approx(0.25)
    # 4 samples, pool 4, k 2: domain 0 → slots {0, 1}, domain 1 → {2, 3}, except one stray
    from simulations.core.config import RunConfig
    from simulations.evaluate import Evaluation

    ev = Evaluation(run_dir=Path("."), config=RunConfig(), logits=np.zeros((4, 3)),
                    predictions=np.zeros(4, np.int64), labels=np.array([0, 1, 0, 2]),
                    domains=np.array([0, 0, 1, 1]),
                    slots=np.array([[0, 1], [1, 0], [2, 3], [0, 3]]), pool_size=4)
    r = exp_mod.routing_stats(ev, initial=np.array([[0, 2], [1, 0], [1, 2], [0, 3]]))
    assert r["slots_used"] == 4 and r["effective_slots"] == pytest.approx(
        exp_mod.effective_number(np.array([3, 2, 1, 2])))
    # first slots 0, 1, 2, 0: slot 0 holds domains {0, 1}, so 3 of 4 samples are in its majority
    assert r["domain_purity"] == pytest.approx(0.75) and r["domain_chance"] == 0.5
    assert r["class_purity"] == pytest.approx(0.75) and r["class_chance"] == 0.5
    assert r["kept_from_init"] == pytest.approx((0.5 + 1 + 0.5 + 1) / 4)
    np.testing.assert_allclose(r["slot_histogram"], [[1, 1, 0, 0], [0.5, 0, 0.5, 1]])
    assert np.isnan(exp_mod.routing_stats(ev)["kept_from_init"])


def _cells(gaps: dict[str, list[float]]) -> dict:
    """Synthetic results: SSF at 0.6 on seeds 0–2, FedIns at 0.6 + gap/100."""
    out: dict = {}
    for lv, g in gaps.items():
        out[lv] = {"ssf": {"seeds": [0, 1, 2], "headline": [0.6] * 3, "best": [0.7] * 3,
                           "federated_scalars": [3210]},
                   "fedins": {"seeds": [0, 1, 2], "headline": [0.6 + x / 100 for x in g],
                              "best": [0.7 + x / 100 for x in g],
                              "federated_scalars": [81850]}}
    return out


def test_claim_verdicts():
    exp = {"base": {"rounds": 10}, "last_rounds": 2, "tuning": {"seed": 100}}
    rows = exp_mod.claims(exp, _cells({"1-domain": [1, -1, 0.5], "8-domains": [3, 4, 5]}), 68810)
    verdicts = {c: v for c, _, v in rows}
    numbers = {c: n for c, n, _ in rows}
    assert verdicts["FedIns above a single shared SSF (8-domains)"] == "**holds** (every seed)"
    assert numbers["FedIns above a single shared SSF (8-domains)"].startswith(
        "+4.0 ± 1.0 (seeds: +3.0, +4.0, +5.0); best over rounds +4.0 ± 1.0")
    assert verdicts["FedIns above a single shared SSF (1-domain)"].startswith("**unclear**")
    grows = "The gain over SSF grows with intra-client heterogeneity (1-domain → 8-domains)"
    assert verdicts[grows] == "**holds** (every seed)" and "+3.8 ± 1.6 (seeds: +2.0, +5.0, +4.5)" in numbers[grows]
    comm = "Less than 15 % of the communication of full-model FL"
    assert verdicts[comm].startswith("**no**") and "119 %" in numbers[comm]
    rows = exp_mod.claims(exp, _cells({"8-domains": [-1, -2, -0.5]}))
    assert rows[0][2] == "**no** (below on every seed)" and len(rows) == 1


def test_quick_variant_runs_the_whole_pipeline(tmp_path):
    """``--quick`` (the shipped config at smoke size, quick backbone): tuning on the tuning seed,
    the chosen lr in every table run, headline / best / routing / docs sections / figures, and a
    second invocation that reuses every run."""
    out, docs, fig = tmp_path / "q", tmp_path / "fedins.md", tmp_path / "fig"
    docs.write_text("# FedIns\n\n<!-- fedins:claims -->\nOLD\n<!-- /fedins:claims -->\n\n"
                    "<!-- fedins:results -->\nSTALE\n<!-- /fedins:results -->\n\nend\n")
    argv = ["--quick", "--out", str(out), "--docs", str(docs), "--figures", str(fig),
            "--workers", "1"]
    assert exp_mod.main(argv) == 0
    exp = exp_mod.load_experiment(quick=True)
    res = json.loads((out / "results.json").read_text())
    assert set(res["results"]) == set(exp["levels"])
    assert all(set(c) == {"fedins", "ssf"} for c in res["results"].values())
    # tuning: one run per value on seed 100; the chosen value has the best last-rounds mean
    cell = res["tuning"]["8-domains"]["fedins"]
    scores = []
    for v in cell["values"]:
        run = out / "tune" / "8-domains" / "fedins" / f"lr-{v:g}"
        assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == 100
        r, a = exp_mod.grid.run_curve(run)
        assert r[-1] == exp["tuning"]["rounds"]
        scores.append(a[r > r[-1] - exp["last_rounds"]].mean())
    np.testing.assert_allclose(cell["scores"], scores)
    assert cell["chosen"] == cell["values"][int(np.argmax(scores))]
    for lv in exp["levels"]:
        for s in exp["seeds"]:
            cfg = yaml.safe_load((out / lv / "fedins" / f"seed-{s}" / "config.yaml").read_text())
            assert cfg["lr"] == cell["chosen"]
    # headline = mean of the last rounds; best = max over the evaluated rounds after round 0
    fi = res["results"]["8-domains"]["fedins"]
    acc = np.asarray(fi["curves"][0])
    rounds = np.asarray(fi["rounds"])
    assert fi["headline"][0] == pytest.approx(acc[rounds > rounds[-1] - 2].mean())
    assert fi["best"][0] == pytest.approx(acc[rounds > 0].max())
    assert fi["offline"] == pytest.approx(fi["final"], abs=1e-9)
    routing = fi["routing"][0]
    assert np.asarray(routing["slot_histogram"]).shape == (8, 25)
    np.testing.assert_allclose(np.asarray(routing["slot_histogram"]).sum(1), 3.0)
    assert 3 <= routing["slots_used"] <= 25 and 0.0 <= routing["kept_from_init"] <= 1.0
    assert res["results"]["8-domains"]["ssf"]["routing"] == []
    assert set(res["query_separability"]) == {"sensor"}
    text = docs.read_text()
    assert "OLD" not in text and "STALE" not in text and text.endswith("\n\nend\n")
    assert "| paper's claim |" in text and "**FedIns routing**" in text
    assert "**Tuned learning rates**" in text and "**Plateau check**" in text
    assert (fig / "fedins_convergence.png").stat().st_size > 1000
    assert (fig / "fedins_slots.png").stat().st_size > 1000
    # a second invocation reuses every finished run
    summary = out / "8-domains" / "fedins" / "seed-0" / "summary.json"
    mtime = summary.stat().st_mtime
    assert exp_mod.main([*argv, "--report-only"]) == 0
    assert summary.stat().st_mtime == mtime

