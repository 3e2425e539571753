"""The one study pipeline (``simulations.experiments.study``) with a fake driver: two parts × two
methods, runs stubbed (a finished run directory whose accuracy depends on the cell and the
learning rate, no training). Tuning chooses the best value per cell, the table runs with it,
a second invocation runs nothing, bad input and missing runs exit with the drivers' codes."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from simulations import gridrun
from simulations.experiments import grid, study

TINY = {"dataset": "mnist1d", "dataset_args": {"num_samples": 600}, "num_clients": 4,
        "model": "mlp", "rounds": 3, "local_steps": 1, "batch_size": 16, "lr": 0.05}
#: The learning rate each cell's fake runs like best.
BEST = {"a": 0.1, "b": 1.0}
CALLS: list[str] = []


@dataclasses.dataclass(frozen=True)
class Job(study.StudyJob):
    AXES = TUNE_AXES = ("part", "method")

    part: str
    method: str


def fake_accuracy(job: Job) -> float:
    """0.9 at the cell's best learning rate, 0.2 less per decade away from it; seed adds 0.01."""
    lr = float(job.config["lr"])
    return 0.9 - 0.2 * abs(math.log10(lr / BEST[job.part])) + 0.01 * job.seed


def run_job(job: Job, fresh: bool = False) -> dict[str, Any]:
    """A finished run directory (config.yaml, metrics.csv, summary.json), no training."""
    from simulations.core.config import build_config, dump_yaml
    from simulations.core.results import metrics_to_csv

    CALLS.append(job.name)
    d = job.run_dir
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.yaml").write_text(dump_yaml(build_config(job.config)))
    acc = fake_accuracy(job)
    rows = [{"round": r, "phase": "train", "clients": 4, "train_loss": 1.0, "test_loss": 1.0,
             "test_accuracy": acc if r else 0.1, "seconds": 0.1}
            for r in range(job.config["rounds"] + 1)]
    (d / "metrics.csv").write_text(metrics_to_csv(rows))
    summary = {"final_test_accuracy": acc, "wall_seconds": 2.0}
    (d / gridrun.SUMMARY).write_text(json.dumps(summary))
    return {**summary, "reused": False}


def load_experiment(path: str, quick: bool = False) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def run_all(jobs: Sequence[Job], workers: int = 2, fresh: bool = False,
            echo: Any = print) -> dict[str, dict[str, Any]]:
    return study.run_jobs(jobs, run_job, lambda: None, 1, fresh, echo)


def collect(exp: Mapping[str, Any], jobs: Sequence[Job]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for job in study.complete(jobs):
        rounds, acc = grid.run_curve(job.run_dir)
        cell = study.slot(out, job.cell, {"seeds": [], "headline": [], "wall_seconds": []})
        cell["seeds"].append(job.seed)
        cell["headline"].append(float(acc[-1]))
        cell["wall_seconds"].append(float(grid.read_summary(job.run_dir)["wall_seconds"]))
    return out


RUNS: list[study.Run] = []


def report(run: study.Run) -> int:
    RUNS.append(run)
    walls = run.walls()
    study.write_results(run, walls, study.missing_cells(run.jobs), extra_number=7)
    study.publish(run, "claims here", "tables here", ("fake:claims", "fake:results"),
                  {"fake.txt": lambda path: path.write_text("figure")})
    return 0


GRID = study.MethodGrid(Job, "part", "parts")
STUDY = GRID.study("fake", __doc__, Path("unused.json"), "runs/fake",
                   load_experiment=load_experiment, run_all=run_all, collect=collect,
                   report=report)


def _experiment(tmp_path: Path, where: str = "each", **changes: Any) -> Path:
    exp = {"seeds": [0, 1], "base": TINY, "parts": {"a": {}, "b": {"batch_size": 8}},
           "methods": {"tuned": {"tune": {"lr": [0.01, 0.1, 1.0]}}, "plain": {}},
           "tuning": {"seed": 9, "rounds": 2, "part": where}, "last_rounds": 1, **changes}
    path = tmp_path / "exp.json"
    path.write_text(json.dumps(exp))
    return path


def _main(tmp_path: Path, config: Path, *extra: str) -> int:
    CALLS.clear()
    RUNS.clear()
    return STUDY.main(["--config", str(config), "--out", str(tmp_path / "runs"), "--figures",
                       str(tmp_path / "fig"), "--docs", str(tmp_path / "page.md"), *extra])


def test_tuning_chooses_the_best_value_per_cell_and_the_table_uses_it(tmp_path, capsys):
    config = _experiment(tmp_path)
    assert _main(tmp_path, config) == 0
    # tuning: 3 values × 2 cells on seed 9 (2 rounds); table: 2 cells × 2 methods × 2 seeds
    tune = [c for c in CALLS if c.startswith("tune/")]
    assert sorted(tune) == sorted(f"tune/{c}/tuned/lr={v:g}" for c in "ab" for v in (0.01, 0.1, 1))
    assert len(CALLS) == 6 + 8
    run = RUNS[0]
    assert run.chosen == {"a": {"tuned": 0.1}, "b": {"tuned": 1.0}}
    a = run.tuning["a"]["tuned"]
    assert a["key"] == "lr" and a["values"] == [0.01, 0.1, 1.0]
    assert a["scores"] == pytest.approx([0.7 + 0.09, 0.9 + 0.09, 0.7 + 0.09])  # seed 9: +0.09
    assert all(j.config["rounds"] == 2 and j.seed == 9 for j in run.tune_jobs)
    lrs = {j.cell: j.config["lr"] for j in run.jobs}
    assert lrs == {("a", "tuned"): 0.1, ("b", "tuned"): 1.0, ("a", "plain"): 0.05,
                   ("b", "plain"): 0.05}
    assert {j.config["batch_size"] for j in run.jobs if j.part == "b"} == {8}  # the cell's layer
    assert run.results["b"]["tuned"]["headline"] == pytest.approx([0.9, 0.91])
    plain = 0.9 - 0.2 * math.log10(0.1 / 0.05)  # base lr 0.05, cell a likes 0.1
    assert run.results["a"]["plain"]["headline"] == pytest.approx([plain, plain + 0.01])
    assert (tmp_path / "runs" / "b" / "tuned" / "seed-1" / "summary.json").is_file()
    saved = json.loads((tmp_path / "runs" / "results.json").read_text())
    assert saved["chosen"] == {"a": {"tuned": 0.1}, "b": {"tuned": 1.0}}
    assert saved["missing"] == [] and saved["extra_number"] == 7
    assert saved["wall_seconds"]["tuning_count"] == 6 and saved["wall_seconds"]["table_runs"] == 16
    page = (tmp_path / "page.md").read_text()
    assert "claims here" in page and "tables here" in page
    assert (tmp_path / "fig" / "fake.txt").read_text() == "figure"
    out = capsys.readouterr().out
    assert "tuning: 6 runs → " in out and "table: 8 runs (2 parts × 2 methods × 2 seeds) → " in out

    # a second invocation reuses every finished run and reports the same
    assert _main(tmp_path, config) == 0
    assert CALLS == []
    out = capsys.readouterr().out
    assert "reusing 6 finished runs" in out and "reusing 8 finished runs" in out
    assert RUNS[0].chosen == run.chosen and RUNS[0].results == run.results

    # a changed cell config redoes only its runs
    config = _experiment(tmp_path, parts={"a": {}, "b": {"batch_size": 4}})
    assert _main(tmp_path, config) == 0
    assert sorted(CALLS) == sorted([f"tune/b/tuned/lr={v:g}" for v in (0.01, 0.1, 1)]
                                   + [f"b/{m}/seed-{s}" for m in ("tuned", "plain") for s in (0, 1)])


def test_tuning_on_one_cell_serves_every_cell(tmp_path):
    assert _main(tmp_path, _experiment(tmp_path, where="b")) == 0
    assert len([c for c in CALLS if c.startswith("tune/b/")]) == 3 == len(RUNS[0].tune_jobs)
    run = RUNS[0]
    assert run.chosen == {"a": {"tuned": 1.0}, "b": {"tuned": 1.0}}
    assert run.tuning["a"]["tuned"]["from"] == "b"
    assert {j.config["lr"] for j in run.jobs if j.method == "tuned"} == {1.0}


def test_an_axis_named_like_a_job_attribute_is_refused():
    with pytest.raises(TypeError, match="axis 'cell'"):
        @dataclasses.dataclass(frozen=True)
        class Bad(study.StudyJob):
            AXES = ("cell",)
            cell: str


def test_missing_runs_and_bad_cells_exit_with_the_drivers_codes(tmp_path, capsys):
    config = _experiment(tmp_path)
    assert _main(tmp_path, config, "--report-only") == 1  # nothing ran: tuning not finished
    assert CALLS == [] and RUNS == []
    err = capsys.readouterr().err
    assert "error: tuning: run tune/a/tuned/lr=0.01 is not finished" in err
    bad = _experiment(tmp_path, methods={"plain": {"batch_size": 0}})
    assert _main(tmp_path, bad) == 2 and CALLS == []  # validated before anything runs
    assert capsys.readouterr().err.startswith("error: a.plain.batch_size")
    untuned = _experiment(tmp_path, methods={"plain": {}}, tuning=None)
    assert _main(tmp_path, untuned, "--report-only") == 1
    assert capsys.readouterr().err == "error: no finished runs to report\n"
