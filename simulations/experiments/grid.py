"""Shared machinery of the experiment drivers.

The grid drivers (:mod:`~simulations.experiments.fedau`, :mod:`~simulations.experiments.fedins`,
:mod:`~simulations.experiments.robust`) all work the same way:

1. read an experiment YAML (:func:`load_grid`): a ``base`` run config, the axes of the grid and a
   ``quick`` section for smoke runs (``--quick``);
2. build one job per cell (a frozen dataclass on :class:`GridJob`), its run config merged from
   ``base`` and the cell's overrides (:func:`merge`) and validated up front (:func:`validate_cell`:
   a bad cell fails before anything runs, the error names the cell);
3. run the jobs ``--workers`` at a time in a spawned process pool (:func:`run_all`,
   :func:`run_simulation`) through :mod:`simulations.gridrun`, the runner user sweeps share: a run
   directory with ``summary.json`` is finished and reused unless ``--fresh``; ``--report-only``
   runs nothing;
4. report from the run directories: tables written into a docs page between markers
   (:func:`simulations.report.write_section`), figures (:func:`pyplot`, :func:`save_png`).

The pipeline itself (tuning, then the table, then the report) is
:mod:`~simulations.experiments.study`; each driver keeps its own axes, measurements, tables and
figures; :mod:`~simulations.experiments.merging` uses the run-directory and figure helpers.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedagg.errors import ConfigError
from simulations import gridrun
from simulations.cli import Parser
from simulations.gridrun import FAILED, SUMMARY, finished, read_summary  # noqa: F401 (drivers use grid.*)
from simulations.report import mean_std, table


# ------------------------------------------------------------------------------ config
def merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict update (mappings merge, anything else replaces); inputs are not modified.

    >>> merge({"a": {"x": 1, "y": 2}, "b": 1}, {"a": {"y": 3}, "b": [2]})
    {'a': {'x': 1, 'y': 3}, 'b': [2]}
    """
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_grid(path: str | Path, required: Sequence[str], optional: Sequence[str] = (),
              quick: bool = False) -> dict[str, Any]:
    """The experiment mapping of the YAML file ``path``.

    Every key of ``required`` must be there and nothing but ``required``, ``optional`` and
    ``quick`` (ConfigError naming the key). ``quick`` applies the ``quick`` section: its ``base``
    merges into ``base``, its other keys replace; the section itself is dropped either way.
    """
    from simulations.core.config import read_yaml

    exp = read_yaml(path)
    for key in required:
        if key not in exp:
            raise ConfigError(key, f"{path} has no {key!r} section")
    allowed = sorted({*required, *optional, "quick"})
    extra = sorted(set(exp) - set(allowed))
    if extra:
        raise ConfigError(extra[0], f"unknown key; allowed: {', '.join(allowed)}")
    if quick:
        q = dict(exp.get("quick") or {})
        exp["base"] = merge(exp["base"], q.pop("base", {}))
        exp.update(q)
    exp.pop("quick", None)
    return exp


def validate_cell(data: Mapping[str, Any], cell: str) -> None:
    """Check one cell's run config with :func:`simulations.core.config.build_config`; its ConfigError
    is re-raised on ``<cell>.<field>`` (e.g. ``bernoulli.fedau.lr``)."""
    from simulations.core.config import build_config

    try:
        build_config(data)
    except ConfigError as exc:
        raise ConfigError(f"{cell}.{exc.field}", exc.message) from None


class GridJob:
    """Base of a driver's ``Job`` (a frozen dataclass: one run of the grid).

    A job has ``config``, the validated run config whose ``out`` is its run directory, and a
    ``name`` (the cell, e.g. ``bernoulli/fedau/seed-0``) for progress lines and summaries.
    """

    config: dict[str, Any]

    @property
    def run_dir(self) -> Path:
        return Path(self.config["out"])

    @property
    def name(self) -> str:
        raise NotImplementedError


# ------------------------------------------------------------------------------ running
def quiet_logs(level: int = logging.WARNING, loggers: Sequence[str] = ("flwr",)) -> None:
    """Set ``loggers`` to ``level`` (Flower logs every round at INFO). Imports flwr first: its
    import sets its logger's level."""
    import flwr  # noqa: F401

    for name in loggers:
        logging.getLogger(name).setLevel(level)


def init_worker(thread_vars: Sequence[str] = (), level: int = logging.WARNING,
                loggers: Sequence[str] = ("flwr",), threadpool: bool = False) -> None:
    """Set up a process that runs jobs (a pool worker, or this process with one worker).

    ``thread_vars`` (e.g. ``OMP_NUM_THREADS``) are set to 1 and, with ``threadpool``, threadpoolctl
    limits BLAS to one thread: one thread per run, the runs are the parallelism.
    ``MPLBACKEND=Agg`` unless set; then :func:`quiet_logs`.
    """
    for var in thread_vars:
        os.environ[var] = "1"
    os.environ.setdefault("MPLBACKEND", "Agg")
    if threadpool:
        try:
            from threadpoolctl import threadpool_limits

            threadpool_limits(1)
        except ImportError:  # pragma: no cover - optional
            pass
    quiet_logs(level, loggers)


def run_simulation(job: GridJob, fresh: bool = False, *,
                   quiet: Callable[[], None] = quiet_logs,
                   setup: Callable[[Any, Any], None] | None = None,
                   keep_failed: bool = False) -> dict[str, Any]:
    """Run (or reuse) the simulation of ``job`` with one torch thread; return its summary plus
    ``cpu_seconds`` (of this process) and ``reused``.

    ``quiet()`` runs after the runner's imports; ``setup(sim, job)`` between building the
    :class:`~simulations.core.runner.Simulation` and running it. A
    :class:`~simulations.core.runner.RunError` (the runner stopped the run, e.g. every update of a round
    rejected) propagates unless ``keep_failed``: then ``failed.json`` records the error, the last
    evaluated round and its test accuracy, and the run counts as finished.
    """
    if finished(job.run_dir, keep_failed) and not fresh:
        return read_summary(job.run_dir, keep_failed)
    import torch

    from simulations.core.config import build_config
    from simulations.core.results import atomic_write_text
    from simulations.core.runner import RunError, Simulation

    torch.set_num_threads(1)
    quiet()
    if keep_failed:
        (job.run_dir / FAILED).unlink(missing_ok=True)
    t0 = time.process_time()
    try:
        sim = Simulation(build_config(job.config), overwrite=True)
        if setup is not None:
            setup(sim, job)
        result = sim.run()
    except RunError as exc:
        if not keep_failed:
            raise
        # diverged: keep the completed rounds, record why it stopped
        rounds, acc = run_curve(job.run_dir)
        info = {"error": str(exc), "last_round": int(rounds[-1]),
                "final_test_accuracy": float(acc[-1]), "wall_seconds": 0.0,
                "cpu_seconds": time.process_time() - t0}
        atomic_write_text(job.run_dir / FAILED, json.dumps(info))
        return {**info, "reused": False}
    return {**result.summary, "cpu_seconds": time.process_time() - t0, "reused": False}


def config_stale(job: GridJob) -> bool:
    """Whether the finished run of ``job`` was run with another config than ``job.config`` (its
    ``config.yaml`` differs in a key other than ``out``), e.g. after a tuned value changed."""
    from simulations.core.config import build_config, read_yaml
    from simulations.sweep_grid import config_difference

    path = job.run_dir / "config.yaml"
    if not path.is_file():
        return True
    return config_difference(build_config(job.config), read_yaml(path)) is not None


def progress_line(i: int, total: int, job: GridJob, summary: Mapping[str, Any],
                  elapsed: float) -> str:
    """``[i/total] name: accuracy % (run seconds, elapsed seconds)``."""
    return (f"[{i}/{total}] {job.name}: {100 * summary['final_test_accuracy']:.1f} % "
            f"({summary['wall_seconds']:.0f} s run, {elapsed:.0f} s elapsed)")


def run_all(jobs: Sequence[GridJob], run_job: Callable[[Any, bool], dict[str, Any]], *,
            initializer: Callable[[], None], workers: int = 2, fresh: bool = False,
            echo: Callable[[str], None] = print,
            line: Callable[[int, int, Any, Mapping[str, Any], float], str] = progress_line,
            keep_failed: bool = False, prepare: Callable[[list[Any]], None] | None = None,
            catch: tuple[type[BaseException], ...] = (),
            stale: Callable[[Any], bool] | None = None) -> dict[str, dict[str, Any]]:
    """Run ``jobs`` (``workers`` at a time) with :mod:`simulations.gridrun`; ``{job.name: summary}``.

    Finished runs (:func:`~simulations.gridrun.finished`; ``keep_failed``: ``failed.json`` too)
    are reused unless ``fresh``. ``prepare(todo)`` runs first, in this process, if anything is
    left to run. With ``workers <= 1`` the jobs run here after ``initializer()``; otherwise in a
    pool of spawned processes that each run ``initializer`` (``run_job`` and ``initializer`` must
    be module-level functions). ``run_job(job, fresh)`` returns the summary echoed by ``line(i,
    total, job, summary, elapsed seconds)``; an exception in ``catch`` is echoed as ``FAILED``
    and the job is left out of the result, any other propagates. A finished job for which
    ``stale(job)`` is true (e.g. its ``config.yaml`` is not the job's config) is run again, as
    with ``fresh``.
    """
    work = gridrun.plan(jobs, fresh, keep_failed, stale)
    done = {j.name: read_summary(j.run_dir, keep_failed) for j in work.done}
    if done:
        echo(f"reusing {len(done)} finished runs")
    if work.redo and not fresh:
        echo(f"redoing {len(work.redo)} finished runs whose config changed")
    if not work.todo:
        return done
    if prepare is not None:
        prepare(work.todo)
    t0 = time.perf_counter()

    def record(i: int, job: GridJob, get: Callable[[], dict[str, Any]]) -> None:
        try:
            done[job.name] = s = get()
        except catch as exc:
            echo(f"[{i}/{len(work.todo)}] {job.name}: FAILED ({exc})")
            return
        echo(line(i, len(work.todo), job, s, time.perf_counter() - t0))

    executor = (gridrun.serial(initializer) if workers <= 1
                else gridrun.process_pool(workers, initializer))
    gridrun.execute(work.todo, run_job, executor, record, work.redo)
    return done


# ------------------------------------------------------------------------------ results
def run_curve(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(rounds, test accuracy)`` of the evaluated rounds of a run (round 0 included)."""
    from simulations.core.results import read_metrics

    rows = read_metrics(run_dir)
    pts = [(float(r["round"]), float(r["test_accuracy"])) for r in rows
           if r.get("test_accuracy") not in (None, "") and math.isfinite(float(r["test_accuracy"]))]
    arr = np.array(pts, dtype=np.float64).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]


def stopped_curve(rounds: np.ndarray, acc: np.ndarray, config: Mapping[str, Any]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The curve of a run the runner stopped, on the rounds a complete run of ``config``
    evaluates (0 and every round ``RunConfig.evaluates``): at each, the last test so far. The
    runner tests the model a run stops with, so past the stop this is the diverged model."""
    from simulations.core.config import build_config

    cfg = build_config(config)
    full = np.array([0.0, *(float(r) for r in range(1, cfg.rounds + 1) if cfg.evaluates(r))])
    return full, acc[np.searchsorted(rounds, full, side="right") - 1]


def train_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The ``train`` rows of a run's ``metrics.csv``."""
    from simulations.core.results import read_metrics

    return [r for r in read_metrics(run_dir) if r.get("phase") == "train"]


def method_table(results: Mapping[str, Any], methods: Sequence[str], key: str = "final") -> str:
    """Markdown table of ``results[column][method][key]``: rows = methods, columns = the keys of
    ``results``, cells mean ± std over seeds (%, :func:`~simulations.report.mean_std`), the best
    mean of each column bold."""
    columns = list(results)
    best = {}
    for col in columns:
        means = {m: float(np.mean(results[col][m][key])) for m in methods if m in results[col]}
        best[col] = max(means, key=means.__getitem__) if means else None
    rows = []
    for m in methods:
        cells = []
        for col in columns:
            text = mean_std(results[col][m][key], scale=100) if m in results[col] else "–"
            cells.append(f"**{text}**" if best[col] == m else text)
        rows.append([m, *cells])
    return table(["method", *columns], rows, "l" + "r" * len(columns))


# ------------------------------------------------------------------------------ figures
def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (unless a backend is already in use)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: Path) -> None:
    """Write ``fig`` as a PNG (atomically; no PDF twin, to keep docs/figures small)."""
    import io

    from fedagg.io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


# ------------------------------------------------------------------------------ CLI
def grid_parser(module: str, doc: str, config: Path, *, docs_help: str, figures_help: str,
                workers_help: str = "runs in parallel (default 2)") -> argparse.ArgumentParser:
    """The common flags of a grid driver ``python -m <module>`` (description: the first
    paragraph of ``doc``): ``--config --quick --out --docs --figures --workers --fresh
    --report-only``; the driver adds its own and resolves the paths (:func:`output_paths`)."""
    parser = Parser(prog=f"python -m {module}", description=doc.split("\n\n")[0])
    parser.add_argument("--config", default=str(config), help="experiment YAML")
    parser.add_argument("--quick", action="store_true", help="apply the config's quick section")
    parser.add_argument("--out", default=None, help="root of the run directories")
    parser.add_argument("--docs", default=None, help=docs_help)
    parser.add_argument("--figures", default=None, help=figures_help)
    parser.add_argument("--workers", type=int, default=2, help=workers_help)
    parser.add_argument("--fresh", action="store_true", help="redo finished runs")
    parser.add_argument("--report-only", action="store_true", help="run nothing; report what exists")
    return parser


def output_paths(args: argparse.Namespace, out: str, docs: Path, figures: Path,
                 quick_figures: bool = True) -> tuple[Path, Path | None, Path | None]:
    """``(runs root, docs page, figure folder)`` from ``--out --docs --figures``. Defaults:
    ``out`` (``<out>_quick`` with ``--quick``), ``docs`` (none with ``--quick``) and ``figures``
    (with ``--quick``: the runs root, or none unless ``quick_figures``)."""
    root = Path(args.out or (f"{out}_quick" if args.quick else out))
    page = Path(args.docs) if args.docs else (None if args.quick else docs)
    if args.figures:
        folder: Path | None = Path(args.figures)
    elif args.quick:
        folder = root if quick_figures else None
    else:
        folder = figures
    return root, page, folder
