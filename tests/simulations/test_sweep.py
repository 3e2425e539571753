"""Sweeps: grid expansion and naming, up-front validation, tidy results.csv, panels, resumability,
failure handling, and a real 2 strategies × 2 seeds sweep as parallel Ray tasks."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import pytest
import yaml

from simulations import sweep as sweep_cli
from simulations.core.config import dump_yaml
from simulations.core.results import metrics_to_csv
from simulations.sweep_grid import cell_name, load_sweep

TINY = {"dataset": "mnist1d", "dataset_args": {"num_samples": 600}, "num_clients": 4, "model": "mlp",
        "rounds": 3, "local_steps": 2, "batch_size": 16, "lr": 0.1}


def _write(tmp_path: Path, spec: dict, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open() as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


# ------------------------------------------------------------------------------ grid and names
def test_cell_names_are_deterministic_readable_and_unique():
    assert cell_name({"strategy": "fedau", "seed": 1}) == "strategy=fedau,seed=1"
    assert cell_name({"lr": 0.05, "participation.process": "markov"}) == "lr=0.05,participation.process=markov"
    assert cell_name({"flag": True, "x": None}) == "flag=true,x=null"
    lossy_a = cell_name({"aggregator": "nnm+krum/2"})
    lossy_b = cell_name({"aggregator": "nnm+krum 2"})
    assert lossy_a.startswith("aggregator=nnm+krum-2-") and len(lossy_a.split("-")[-1]) == 8
    assert lossy_a != lossy_b  # same slug, different hash
    assert lossy_a == cell_name({"aggregator": "nnm+krum/2"})
    nested = cell_name({"strategy_args": {"cutoff": 50}})
    assert "/" not in nested and nested == cell_name({"strategy_args": {"cutoff": 50}})


def test_grid_expands_to_the_product_with_base_overrides_and_dotted_keys(tmp_path):
    spec = {"base": {**TINY, "rounds": 7}, "overrides": {"rounds": 2, "participation.args.a": 0.2},
            "grid": {"strategy": ["fedavg", "fedau"], "participation.process": ["markov"], "seed": [0, 1, 2]},
            "out": str(tmp_path / "sw")}
    sw = load_sweep(data=spec)
    assert len(sw.cells) == 2 * 1 * 3
    assert [c.params for c in sw.cells] == [
        {"strategy": s, "participation.process": "markov", "seed": k}
        for s, k in itertools.product(["fedavg", "fedau"], [0, 1, 2])]
    for c in sw.cells:
        assert c.config.engine == "inline"  # default inside a Ray task
        assert c.config.rounds == 2  # overrides beat base
        assert c.config.participation.process == "markov" and c.config.participation.args == {"a": 0.2}
        assert c.config.strategy == c.params["strategy"] and c.config.seed == c.params["seed"]
        assert Path(c.config.out) == (tmp_path / "sw" / "cells" / c.name).resolve() == c.dir
    # An explicit engine (here in a base file) is kept.
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({**TINY, "engine": "ray", "out": "ignored"}))
    sw2 = load_sweep(data={"base": str(base), "grid": {"seed": [0]}, "out": str(tmp_path / "sw2")})
    assert sw2.cells[0].config.engine == "ray" and sw2.cells[0].dir.parent.parent == (tmp_path / "sw2").resolve()


@pytest.mark.parametrize("spec, field", [
    ({"grid": {"strategy": ["fedavg", "nope"]}}, "grid.strategy: unknown value 'nope'"),
    ({"grid": {"seed": 3}}, "grid.seed: must be a non-empty list"),
    ({"grid": {"seed": []}}, "grid.seed: must be a non-empty list"),
    ({"grid": {"seed": [0, 0]}}, "grid.seed: repeats a value"),
    ({"grid": {"local_stepz": [1]}}, "grid.local_stepz: unknown key"),
    ({"grid": {"lr": [0.1, -1]}}, "grid.lr: Input should be greater than 0"),
    ({"grid": {"participation.process": ["bernoulli", "nope"]}}, "grid.participation.process: unknown value"),
    ({"grid": {"seed": [0]}, "bogus": 1}, "bogus: unknown key; allowed: base, cell_resources"),
    ({"grid": {"seed": [0]}, "base": {"rounds": 0}}, "base.rounds: Input should be greater than or equal to 1"),
    ({"grid": {"seed": [0]}, "cell_resources": {"num_cpu": 1}}, "cell_resources.num_cpu: unknown key"),
    ({"grid": {"out": ["a", "b"]}}, "grid.out: the sweep sets each cell's out"),
    ({"grid": {"seed": [0]}, "base": "missing.yaml"}, "config: file not found"),
])
def test_invalid_sweep_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, spec, field):
    out = tmp_path / "out"
    path = _write(tmp_path, {"base": TINY, **spec, "out": str(out)})
    rc = sweep_cli.main([str(path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: " + field), err
    assert err.count("\n") == 1
    assert not out.exists()


def test_cells_that_no_node_could_host_are_refused():
    from fedagg.errors import ConfigError

    class FakeRay:
        @staticmethod
        def cluster_resources():
            return {"CPU": 2.0, "slow_worker": 1.0}

    def check(resources):
        sw = load_sweep(data={"base": TINY, "grid": {"seed": [0]}, "cell_resources": resources})
        sweep_cli._check_resources(FakeRay, sw)

    check({"num_cpus": 2, "resources": {"slow_worker": 0.5}})  # fits
    with pytest.raises(ConfigError, match="cell_resources.num_gpus: a cell needs 0.5 GPU but the cluster has 0"):
        check({"num_gpus": 0.5})
    with pytest.raises(ConfigError, match="cell_resources.num_cpus: a cell needs 3 CPU"):
        check({"num_cpus": 3})
    with pytest.raises(ConfigError, match="cell_resources.resources.fast: a cell needs 1 fast"):
        check({"resources": {"fast": 1}})


# ------------------------------------------------------------------------------ results and plots
def _fake_finished(cell, acc_of_round) -> None:
    """A finished run directory for ``cell`` with metrics test_accuracy = acc_of_round(round)."""
    cell.dir.mkdir(parents=True)
    (cell.dir / "config.yaml").write_text(dump_yaml(cell.config))
    rows = [{"round": r, "phase": "init" if r == 0 else "train", "clients": 0 if r == 0 else 4,
             "train_loss": float("nan") if r == 0 else 1.0 / (r + 1), "test_loss": 2.0 - r / 10,
             "test_accuracy": acc_of_round(r), "seconds": 0.5 * (r > 0)} for r in range(cell.config.rounds + 1)]
    (cell.dir / "metrics.csv").write_text(metrics_to_csv(rows))
    (cell.dir / "summary.json").write_text(json.dumps({"final_test_accuracy": rows[-1]["test_accuracy"]}))


@pytest.mark.slow  # three figures saved as PNG + PDF
def test_results_csv_is_tidy_and_the_plot_has_one_panel_per_value(tmp_path):
    import matplotlib.pyplot as plt

    from simulations import plot

    spec = {"base": TINY, "grid": {"strategy": ["fedavg", "fedau"], "lr": [0.1, 0.2, 0.4], "seed": [0, 1]},
            "out": str(tmp_path / "sw")}
    sw = load_sweep(data=spec)
    for i, c in enumerate(sw.cells):
        if c.params["lr"] == 0.4 and c.params["seed"] == 1:
            continue  # unfinished: left out of results.csv and the plot
        _fake_finished(c, lambda r, i=i: 0.1 * r + 0.001 * i)
    (sw.cells[-1].dir).mkdir(parents=True)  # a started, unfinished cell: no metrics
    sw.out.mkdir(exist_ok=True)
    sweep_cli.write_state(sw, {})
    assert sweep_cli.write_results(sw) == 10 * (TINY["rounds"] + 1)
    cols, rows = _read_csv(sw.out / "results.csv")
    assert cols[:7] == ["cell", "strategy", "lr", "seed", "round", "phase", "clients"]
    assert len(rows) == 40
    by_cell = {}
    for r in rows:
        by_cell.setdefault(r["cell"], []).append(r)
    assert len(by_cell) == 10
    for i, c in enumerate(sw.cells):
        if c.name not in by_cell:
            assert c.params["lr"] == 0.4 and c.params["seed"] == 1
            continue
        got = by_cell[c.name]
        assert [int(r["round"]) for r in got] == [0, 1, 2, 3]
        assert {r["strategy"] for r in got} == {c.params["strategy"]}
        assert {float(r["lr"]) for r in got} == {c.params["lr"]}
        assert float(got[-1]["test_accuracy"]) == pytest.approx(0.3 + 0.001 * i)
        assert got[0]["train_loss"] == ""  # NaN stays an empty cell

    paths = sweep_cli.write_plot(sw)
    assert [p.name for p in paths] == ["plot.png", "plot.pdf"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Panels: by lr (the first grid key other than strategy/seed), curves by strategy.
    assert plot.sweep_defaults(sw.keys) == ("lr", "strategy")
    assert plot.sweep_defaults(["seed", "strategy"]) == (None, "strategy")
    assert plot.sweep_defaults(["strategy", "alpha", "lr", "seed"]) == ("alpha", "strategy,lr")
    runs = plot.expand_runs([sw.out])
    assert len(runs) == 10  # finished cells only
    fig = plot.plot_panels(runs, panel_by="lr", group_by="strategy", order=["0.1", "0.2", "0.4"])
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["lr = 0.1", "lr = 0.2", "lr = 0.4"]
    labels = [t.get_text() for t in visible[2].get_legend().get_texts()]
    assert labels == ["fedau", "fedavg"]  # lr=0.4: only the seed-0 runs finished
    labels = [t.get_text() for t in visible[0].get_legend().get_texts()]
    assert labels == ["fedau (n=2)", "fedavg (n=2)"]
    plt.close(fig)
    # The CLI on the sweep directory picks the same panels.
    assert plot.main([str(sw.out), "--out", str(tmp_path / "fig.png")]) == 0
    assert (tmp_path / "fig.png").is_file() and (tmp_path / "fig.pdf").is_file()
    # Plain run directories: one panel, as before; --panel-by works for them too.
    assert plot.main([str(runs[0]), str(runs[1]), "--out", str(tmp_path / "plain.png")]) == 0
    assert plot.main([*map(str, runs), "--panel-by", "seed", "--out", str(tmp_path / "p.png")]) == 0
    assert plot.main([str(runs[0]), "--panel-by", "nope", "--out", str(tmp_path / "x.png")]) == 2
    # Several group keys are all named in each label.
    assert plot.group_labels([{"strategy": "fedau", "lr": 0.1}], "strategy,lr") == ["fedau · lr=0.1"]


def test_a_finished_cell_with_another_config_stops_the_sweep(tmp_path, capsys):
    spec = {"base": TINY, "grid": {"seed": [0, 1]}, "out": str(tmp_path / "sw")}
    sw = load_sweep(data=spec)
    _fake_finished(sw.cells[0], lambda r: 0.1 * r)
    path = _write(tmp_path, {**spec, "base": {**TINY, "lr": 0.3}})
    assert sweep_cli.main([str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: cells/{sw.cells[0].name}: holds a finished run with another config " \
                  f"(lr: 0.1 → 0.3); pass --rerun, or choose another --out\n"
    path = _write(tmp_path, spec)
    assert sweep_cli.main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 cells (2 over seed); 1 to run, 1 skipped" in out
    assert "  done     seed=0\n  todo     seed=1\n" in out


# ------------------------------------------------------------------------------ running
@pytest.mark.slow
def test_serial_sweep_records_a_failing_cell_and_finishes_the_others(tmp_path, capsys):
    # min_replies=5 with 4 clients: round 1 has too few replies, the run fails (RunError).
    spec = {"base": TINY, "grid": {"min_replies": [1, 5]}, "out": str(tmp_path / "sw")}
    path = _write(tmp_path, spec)
    assert sweep_cli.main([str(path), "--serial"]) == 1
    captured = capsys.readouterr()
    assert "2 cells: 1 ran, 0 skipped, 1 failed" in captured.out
    assert "error: 1 of 2 cells failed:\n  min_replies=5: RunError: round 1: 4 usable replies" in captured.err
    ok, bad = tmp_path / "sw" / "cells" / "min_replies=1", tmp_path / "sw" / "cells" / "min_replies=5"
    assert (ok / "summary.json").is_file() and not (ok / "error.txt").exists()
    assert not (bad / "summary.json").exists()
    assert "RunError" in (bad / "error.txt").read_text()
    state = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [c["state"] for c in state["cells"]] == ["done", "failed"]
    assert state["ran"] == 1 and state["failed"] == 1
    _, rows = _read_csv(tmp_path / "sw" / "results.csv")
    assert {r["cell"] for r in rows} == {"min_replies=1"} and len(rows) == TINY["rounds"] + 1
    summary = json.loads((ok / "summary.json").read_text())
    assert float(rows[-1]["test_accuracy"]) == pytest.approx(summary["final_test_accuracy"])
    # Resuming runs only the failed cell again (and it fails again).
    assert sweep_cli.main([str(path), "--serial"]) == 1
    assert "1 to run, 1 skipped" in capsys.readouterr().out


def _meeting_peers(marks: str, real):
    """``real`` (``run_cell_job``) that first looks (≤ 60 s) for another cell running at the same
    time: it leaves ``running/<cell>`` while it runs and writes ``met/<cell>`` when it saw another
    cell's ``running`` mark. Cells run one after another never meet, however fast they are. A
    closure, so Ray pickles it by value (its workers cannot import this test module)."""
    def run_cell_job(job, fresh=False):
        import time
        from pathlib import Path

        running, met = Path(marks, "running"), Path(marks, "met")
        mine = running / job.name
        mine.touch()
        try:
            deadline = time.monotonic() + 60.0
            while time.monotonic() < deadline and not any(met.iterdir()):
                if any(p.name != job.name for p in running.iterdir()):
                    (met / job.name).touch()
                    break
                time.sleep(0.02)
            return real(job, fresh)
        finally:
            mine.unlink()

    return run_cell_job


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_ray_sweep_runs_cells_in_parallel_and_resumes(tmp_path, capsys, monkeypatch):
    import os

    # Each cell (a Ray task) waits for a peer: proof of parallel cells that timing cannot flake.
    marks = tmp_path / "marks"
    (marks / "running").mkdir(parents=True)
    (marks / "met").mkdir()
    monkeypatch.setattr(sweep_cli, "run_cell_job", _meeting_peers(str(marks), sweep_cli.run_cell_job))
    spec = {"base": TINY, "grid": {"strategy": ["fedavg", "fedau"], "seed": [0, 1]},
            "overrides": {"participation.process": "bernoulli",
                          "participation.probabilities": {"kind": "constant", "p": 0.75}},
            "out": str(tmp_path / "sw"), "cell_resources": {"num_cpus": 1}, "max_parallel": 2}
    path = _write(tmp_path, spec)
    assert sweep_cli.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "4 cells (2 × 2 over strategy, seed); 4 to run, 0 skipped" in out
    assert "4 cells: 4 ran, 0 skipped, 0 failed" in out
    cells = sorted((tmp_path / "sw" / "cells").iterdir())
    assert [c.name for c in cells] == ["strategy=fedau,seed=0", "strategy=fedau,seed=1",
                                       "strategy=fedavg,seed=0", "strategy=fedavg,seed=1"]
    infos = [json.loads((c / "cell.json").read_text()) for c in cells]
    assert all(i["status"] == "done" for i in infos)
    # In parallel: two cells met, so they ran at once, in two Ray worker processes.
    assert any((marks / "met").iterdir()), "no two cells ran at the same time"
    assert not any((marks / "running").iterdir())
    assert len({i["pid"] for i in infos}) >= 2 and os.getpid() not in {i["pid"] for i in infos}
    # results.csv: 4 cells × (rounds + 1) rows; grid keys then metrics; final rows = summaries.
    cols, rows = _read_csv(tmp_path / "sw" / "results.csv")
    assert cols[:6] == ["cell", "strategy", "seed", "round", "phase", "clients"]
    assert "test_accuracy" in cols and "fedau_weight_mean" in cols
    assert len(rows) == 4 * (TINY["rounds"] + 1)
    assert {(r["strategy"], r["seed"]) for r in rows} == {(s, k) for s in ("fedavg", "fedau") for k in "01"}
    for c in cells:
        mine = [r for r in rows if r["cell"] == c.name]
        summary = json.loads((c / "summary.json").read_text())
        assert [int(r["round"]) for r in mine] == [0, 1, 2, 3]
        assert float(mine[-1]["test_accuracy"]) == pytest.approx(summary["final_test_accuracy"])
        assert 0.0 <= summary["final_test_accuracy"] <= 1.0
    finals = {r["cell"]: float(r["test_accuracy"]) for r in rows if r["round"] == "3"}
    assert finals["strategy=fedavg,seed=0"] != finals["strategy=fedavg,seed=1"]  # seeds matter
    png = tmp_path / "sw" / "plot.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "sw" / "plot.pdf").is_file()

    # Re-running skips every cell: no cell file is touched, results.csv is the same.
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "sw" / "cells").rglob("*") if p.is_file()}
    results = (tmp_path / "sw" / "results.csv").read_bytes()
    assert sweep_cli.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "0 to run, 4 skipped" in out and "4 cells: 0 ran, 4 skipped, 0 failed" in out
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "sw" / "cells").rglob("*") if p.is_file()}
    assert after == before
    assert (tmp_path / "sw" / "results.csv").read_bytes() == results
    state = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert state["skipped"] == 4 and state["ran"] == 0
    assert [c["state"] for c in state["cells"]] == ["done"] * 4
    assert all("start" in c for c in state["cells"])  # times kept from the first invocation
