"""The one grid runner (``simulations.gridrun``) behind ``python -m simulations.sweep`` and the
study drivers (``simulations.experiments.grid.run_all``): plan, executors, resume."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from simulations import gridrun
from simulations import sweep as sweep_cli
from simulations.experiments import grid


@dataclasses.dataclass(frozen=True)
class FakeJob:
    name: str
    run_dir: Path


def _finish(run_dir: Path, acc: float = 0.5, name: str = gridrun.SUMMARY) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / name).write_text(json.dumps({"final_test_accuracy": acc, "wall_seconds": 1.0}))


def test_plan_reuses_finished_runs_and_redoes_fresh_or_stale_ones(tmp_path):
    jobs = [FakeJob(n, tmp_path / n) for n in "abcd"]
    _finish(jobs[0].run_dir)
    _finish(jobs[1].run_dir)
    _finish(jobs[2].run_dir, name=gridrun.FAILED)  # stopped early: finished only with keep_failed
    p = gridrun.plan(jobs)
    assert [j.name for j in p.todo] == ["c", "d"] and [j.name for j in p.done] == ["a", "b"]
    assert p.redo == set()
    p = gridrun.plan(jobs, keep_failed=True, stale=lambda j: j.name == "b")
    assert [j.name for j in p.todo] == ["b", "d"] and p.redo == {"b"}
    p = gridrun.plan(jobs, fresh=True)
    assert [j.name for j in p.todo] == ["a", "b", "c", "d"] and p.redo == set("abcd")
    assert gridrun.read_summary(jobs[2].run_dir, failed=True) == {
        "final_test_accuracy": 0.5, "wall_seconds": 1.0, "reused": True}


def test_serial_executor_passes_fresh_and_stops_when_on_done_raises(tmp_path):
    jobs = [FakeJob(n, tmp_path / n) for n in "abc"]
    calls: list[tuple[str, bool]] = []

    def run_job(job: FakeJob, fresh: bool) -> int:
        calls.append((job.name, fresh))
        return len(calls)

    seen: list[tuple[int, str, int]] = []
    gridrun.execute(jobs, run_job, gridrun.serial(), lambda i, j, get: seen.append((i, j.name, get())),
                    redo={"b"})
    assert calls == [("a", False), ("b", True), ("c", False)]
    assert seen == [(1, "a", 1), (2, "b", 2), (3, "c", 3)]

    def stop(i: int, job: FakeJob, get) -> None:
        get()
        raise KeyboardInterrupt

    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        gridrun.execute(jobs, run_job, gridrun.serial(), stop)
    assert calls == [("a", False)]  # nothing runs after the interruption


class StudyJob(grid.GridJob):
    def __init__(self, name: str, out: Path) -> None:
        self._name, self.config = name, {"out": str(out)}

    @property
    def name(self) -> str:
        return self._name


TINY = {"dataset": "mnist1d", "dataset_args": {"num_samples": 600}, "num_clients": 4, "model": "mlp",
        "rounds": 1, "local_steps": 1, "batch_size": 16, "lr": 0.1}


def test_sweep_and_study_share_the_runner_and_resume(tmp_path, monkeypatch, capsys):
    """Both grids hand their jobs to ``gridrun.execute``; a second invocation of either runs only
    what is not finished."""
    from simulations.core.config import build_config, dump_yaml
    from simulations.core.results import metrics_to_csv

    executed: list[list[str]] = []
    real_execute = gridrun.execute

    def spy(todo, *args, **kwargs):
        executed.append([j.name for j in todo])
        return real_execute(todo, *args, **kwargs)

    monkeypatch.setattr(gridrun, "execute", spy)

    def fake_run_cell(config, cell_dir, name):  # a finished run directory, no training
        d = Path(cell_dir)
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.yaml").write_text(dump_yaml(build_config(config)))
        rows = [{"round": r, "phase": "train", "clients": 4, "train_loss": 1.0, "test_loss": 1.0,
                 "test_accuracy": 0.5, "seconds": 0.1} for r in range(2)]
        (d / "metrics.csv").write_text(metrics_to_csv(rows))
        _finish(d)
        return {"name": name, "status": "done", "final_test_accuracy": 0.5, "seconds": 0.0}

    monkeypatch.setattr(sweep_cli, "run_cell", fake_run_cell)
    monkeypatch.setattr(sweep_cli, "write_plot", lambda sweep: [])
    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump({"base": TINY, "grid": {"seed": [0, 1]},
                                    "out": str(tmp_path / "sw")}))
    assert sweep_cli.main([str(spec), "--serial"]) == 0
    assert sweep_cli.main([str(spec), "--serial"]) == 0
    out = capsys.readouterr().out
    assert "2 to run, 0 skipped" in out and "0 to run, 2 skipped" in out
    assert executed == [["seed=0", "seed=1"], []]

    executed.clear()
    jobs = [StudyJob(n, tmp_path / "study" / n) for n in ("x", "y")]
    _finish(jobs[0].run_dir, 0.25)  # finished before: reused

    def run_job(job, fresh):
        _finish(job.run_dir, 0.75)
        return {"final_test_accuracy": 0.75, "wall_seconds": 1.0}

    lines: list[str] = []
    got = grid.run_all(jobs, run_job, initializer=lambda: None, workers=1, echo=lines.append)
    assert got["x"]["reused"] is True and got["x"]["final_test_accuracy"] == 0.25
    assert got["y"] == {"final_test_accuracy": 0.75, "wall_seconds": 1.0}
    assert lines[0] == "reusing 1 finished runs" and lines[1].startswith("[1/1] y: 75.0 %")
    got = grid.run_all(jobs, run_job, initializer=lambda: None, workers=1, echo=lines.append)
    assert executed == [["y"]]  # the second invocation ran nothing
    assert {k: v["reused"] for k, v in got.items()} == {"x": True, "y": True}


def test_process_pool_runs_jobs_in_spawned_workers(tmp_path):
    import os

    # run_cell records a cell whose config is invalid as failed (cell.json), without training
    jobs = [sweep_cli.CellJob(f"c{i}", tmp_path / f"c{i}", {"rounds": -1}) for i in range(3)]
    got: dict[str, dict] = {}
    gridrun.execute(jobs, sweep_cli.run_cell_job, gridrun.process_pool(2, os.getpid),
                    lambda i, job, get: got.__setitem__(job.name, get()))
    assert sorted(got) == ["c0", "c1", "c2"]
    assert {v["status"] for v in got.values()} == {"failed"}
    assert all(v["error"].startswith("ConfigError: rounds") for v in got.values()), got
    pids = {v["pid"] for v in got.values()}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    assert all(json.loads((j.run_dir / "cell.json").read_text())["status"] == "failed" for j in jobs)


def test_process_pool_drops_queued_jobs_when_on_done_raises(tmp_path):
    """An error while handling a completion (e.g. a run that failed) stops the grid at once:
    the queued jobs are cancelled instead of all running first."""
    import os

    jobs = [sweep_cli.CellJob(f"c{i}", tmp_path / f"c{i}", {"rounds": -1}) for i in range(40)]

    def stop(i, job, get):
        raise RuntimeError(f"stop at {job.name}")

    with pytest.raises(RuntimeError, match="stop at"):
        gridrun.execute(jobs, sweep_cli.run_cell_job, gridrun.process_pool(1, os.getpid), stop)
    ran = [j for j in jobs if (j.run_dir / "cell.json").exists()]
    assert 1 <= len(ran) < 10, len(ran)  # the one that completed, at most a few in flight
