"""``python -m simulations.sweep SWEEP.yaml``: run a grid of simulations as parallel Ray tasks.

    python -m simulations.sweep simulations/configs/sweep_example.yaml
    python -m simulations.sweep sweep.yaml --max-parallel 2 --out runs/sweeps/try2
    python -m simulations.sweep sweep.yaml --dry-run          # list the cells and their state

The sweep file (keys in :mod:`simulations.sweep_grid`) names a base run config and a grid: any run
config key (dotted for nested ones) with a list of values; the cells are the product. Each cell is
one simulation, run as one Ray task with ``cell_resources`` (default one CPU) on a local Ray instance
(or the cluster at ``--ray-address``), at most ``max_parallel`` at once. Cells run ``engine: inline``
unless the sweep says otherwise, so a cell does not start its own actor pool inside a task; for big
cells set ``engine: ray`` in ``overrides`` (their clients then run in actors next to the cells:
give the cell task few CPUs, e.g. ``cell_resources: {num_cpus: 0.5}``, and bound ``max_parallel``
and ``ray.num_workers`` so cells and their actors fit; see docs/ray.md).

Output, in ``out`` (default ``runs/sweeps/<file name>``)::

    sweep.json       # the grid, each cell's state, times and errors (rewritten as cells finish)
    sweep.yaml       # the sweep as run (base config inlined)
    cells/<name>/    # one run directory per cell (+ cell.json: start/end time, host, pid; error.txt)
    results.csv      # tidy: one row per cell × metrics row; cell, grid keys, then metrics columns
    plot.png, .pdf   # the summary plot (one panel per value of plot.panel_by)

Cells run through :mod:`simulations.gridrun`, the grid runner the study drivers
(:mod:`simulations.experiments`) use too. Resumable: a cell whose ``summary.json`` exists is
skipped (after checking that its config is the one the sweep asks for; ``--rerun`` runs every cell
again); a cell that failed or was interrupted runs again. Invalid input (bad sweep key or any invalid cell config) exits 2 with one line naming the key,
before anything is written. A failing cell writes ``error.txt`` in its directory; the other cells go
on, and the sweep exits 1 at the end with a summary of the failures.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedagg.errors import ConfigError
from simulations import gridrun
from simulations.cli import Parser
from simulations.core.results import BASE_COLUMNS, _fmt, atomic_write_text, read_metrics
from simulations.sweep_grid import Cell, Sweep, config_difference, load_sweep


# ------------------------------------------------------------------------------ one cell
def run_cell(config: dict[str, Any], cell_dir: str, name: str) -> dict[str, Any]:
    """Run one cell's simulation (in a Ray task or in-process); never raises.

    Writes ``cell.json`` (``name``, ``status`` done|failed, ``start``/``end`` Unix times, ``host``,
    ``pid``, final accuracy) and, on failure, ``error.txt`` (the traceback). Returns the same dict.
    """
    start = time.time()  # before the heavy imports: they are part of the cell's time
    info: dict[str, Any] = {"name": name, "start": start, "host": socket.gethostname(), "pid": os.getpid()}
    d = Path(cell_dir)
    try:
        (d / "error.txt").unlink(missing_ok=True)
        from simulations.core.config import build_config
        from simulations.core.runner import Simulation

        result = Simulation(build_config(config), overwrite=True).run()
        info.update(status="done", final_test_accuracy=result.summary["final_test_accuracy"])
    except Exception as exc:  # recorded; the sweep goes on with the other cells
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(d / "error.txt", traceback.format_exc())
        info.update(status="failed", error=f"{type(exc).__name__}: {exc}".splitlines()[0])
    info["end"] = time.time()
    info["seconds"] = info["end"] - start
    atomic_write_text(d / "cell.json", json.dumps(info, indent=2) + "\n")
    return info


@dataclass(frozen=True)
class CellJob:
    """One cell as a :class:`simulations.gridrun.Job`: plain data (it travels to Ray tasks)."""

    name: str
    run_dir: Path
    config: dict[str, Any]

    @classmethod
    def of(cls, cell: Cell) -> CellJob:
        return cls(cell.name, cell.dir, cell.data)


def run_cell_job(job: CellJob, fresh: bool = False) -> dict[str, Any]:
    """:func:`run_cell` as a grid runner job (a cell always starts its run afresh)."""
    return run_cell(job.config, str(job.run_dir), job.name)


# ------------------------------------------------------------------------------ state
def cell_state(cell: Cell) -> str:
    """``done`` (summary.json exists), ``failed`` (error.txt), ``partial`` (started) or ``todo``."""
    if gridrun.finished(cell.dir):
        return "done"
    if (cell.dir / "error.txt").exists():
        return "failed"
    return "partial" if cell.dir.exists() else "todo"


def check_finished(sweep: Sweep) -> None:
    """A finished cell must hold the run the sweep asks for (else ConfigError naming the cell)."""
    for cell in sweep.cells:
        if cell_state(cell) != "done":
            continue
        path = cell.dir / "config.yaml"
        found = yaml.safe_load(path.read_text()) if path.is_file() else None
        diff = config_difference(cell.config, found or {})
        if diff is not None:
            raise ConfigError(f"cells/{cell.name}", f"holds a finished run with another config "
                              f"({diff}); pass --rerun, or choose another --out")


def write_state(sweep: Sweep, infos: dict[str, dict[str, Any]], **extra: Any) -> None:
    """``sweep.json``: grid, keys, each cell's params, state and (if run now) times/error."""
    cells = []
    for c in sweep.cells:
        entry: dict[str, Any] = {"name": c.name, "params": c.params, "state": cell_state(c)}
        info = infos.get(c.name)
        if info is None and (c.dir / "cell.json").is_file():  # from an earlier invocation
            try:
                info = json.loads((c.dir / "cell.json").read_text())
            except json.JSONDecodeError:
                info = None
        if info is not None:
            entry.update({k: v for k, v in info.items() if k != "name"})
        cells.append(entry)
    doc = {"keys": sweep.keys, "grid": sweep.spec.grid, "plot": sweep.spec.plot.model_dump(),
           "cells": cells, **extra}
    atomic_write_text(sweep.out / "sweep.json", json.dumps(doc, indent=2, default=str) + "\n")


def start_sweep_dir(sweep: Sweep) -> None:
    """Create ``out`` with ``sweep.yaml`` (the sweep as run, base inlined) and ``sweep.json``."""
    sweep.out.mkdir(parents=True, exist_ok=True)
    spec = sweep.spec.model_dump(mode="json")
    spec["base"] = sweep.base
    atomic_write_text(sweep.out / "sweep.yaml", yaml.safe_dump(spec, sort_keys=False))
    write_state(sweep, {})


# ------------------------------------------------------------------------------ results
def results_rows(sweep: Sweep) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and rows of ``results.csv`` over the finished cells (tidy long format)."""
    keys = sweep.keys
    metric_cols: list[str] = list(BASE_COLUMNS)
    rows: list[dict[str, Any]] = []
    done = [c for c in sweep.cells if cell_state(c) == "done"]
    per_cell = {c.name: read_metrics(c.dir) for c in done}
    for metrics in per_cell.values():
        for r in metrics:
            metric_cols += [k for k in r if k not in metric_cols]
    # A grid key that is also a metrics column is written as config.<key>.
    key_cols = {k: (f"config.{k}" if k in metric_cols or k == "cell" else k) for k in keys}
    for c in done:
        fixed = {"cell": c.name}
        for k in keys:
            v = c.params[k]
            fixed[key_cols[k]] = v if isinstance(v, (int, float, str, bool)) or v is None else \
                json.dumps(v, sort_keys=True)
        for r in per_cell[c.name]:
            rows.append({**fixed, **r})
    return ["cell", *key_cols.values(), *metric_cols], rows


def write_results(sweep: Sweep) -> int:
    """Write ``results.csv`` atomically; return its number of rows."""
    cols, rows = results_rows(sweep)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt(r.get(k, "")) for k in cols})
    atomic_write_text(sweep.out / "results.csv", buf.getvalue())
    return len(rows)


def write_plot(sweep: Sweep) -> list[Path]:
    """The summary plot over the finished cells (``plot.png`` + ``.pdf``); [] if none finished."""
    from simulations.plot import plot_panels, save_figure, sweep_defaults

    done = [c.dir for c in sweep.cells if cell_state(c) == "done"]
    if not done:
        return []
    import matplotlib.pyplot as plt

    p = sweep.spec.plot
    panel_by, group_by = sweep_defaults(sweep.keys, p.panel_by, p.group_by)
    order = [str(v) for v in sweep.spec.grid[panel_by]] if panel_by in sweep.spec.grid else None
    fig = plot_panels(done, panel_by=panel_by, group_by=group_by, metric=p.metric, x=p.x, order=order)
    try:
        return save_figure(fig, sweep.out / "plot.png")
    finally:
        plt.close(fig)


# ------------------------------------------------------------------------------ running
def _check_resources(ray: Any, sweep: Sweep) -> None:
    have = ray.cluster_resources()
    opts = sweep.spec.cell_resources.ray_options()
    need = {"CPU": opts["num_cpus"], "GPU": opts["num_gpus"], **opts.get("resources", {})}
    for name, amount in need.items():
        if amount > 0 and have.get(name, 0.0) < amount:
            field = {"CPU": "num_cpus", "GPU": "num_gpus"}.get(name, f"resources.{name}")
            raise ConfigError(f"cell_resources.{field}", f"a cell needs {amount:g} {name} but the "
                              f"cluster has {have.get(name, 0.0):g}; no cell could ever start")


def _report(i: int, n: int, info: dict[str, Any]) -> None:
    if info["status"] == "done":
        acc = info.get("final_test_accuracy")
        what = f"final test accuracy {100 * acc:.1f} %" if isinstance(acc, float) else "done"
    else:
        what = f"FAILED: {info.get('error', '')}"
    print(f"[{i}/{n}] {info['name']}: {what} ({info.get('seconds', 0.0):.1f} s)", flush=True)


def _on_done(sweep: Sweep, infos: dict[str, dict[str, Any]], n: int
             ) -> Callable[[int, CellJob, Callable[[], dict[str, Any]]], None]:
    """Record each finished cell: its info (a crashed task: ``error.txt``), a progress line and
    ``sweep.json``."""
    def record(i: int, job: CellJob, get: Callable[[], dict[str, Any]]) -> None:
        try:
            info = get()
        except Exception as exc:  # the worker died (OOM, killed): record it here
            job.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(job.run_dir / "error.txt", f"{type(exc).__name__}: {exc}\n")
            info = {"name": job.name, "status": "failed",
                    "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
        infos[job.name] = info
        _report(i, n, info)
        write_state(sweep, infos)

    return record


def run_serial(sweep: Sweep, jobs: list[CellJob]) -> dict[str, dict[str, Any]]:
    """Run the cells of ``jobs`` one after another in this process (no Ray)."""
    infos: dict[str, dict[str, Any]] = {}
    start_sweep_dir(sweep)
    gridrun.execute(jobs, run_cell_job, gridrun.serial(), _on_done(sweep, infos, len(jobs)))
    return infos


def run_ray(sweep: Sweep, jobs: list[CellJob], address: str | None, max_parallel: int | None
            ) -> dict[str, dict[str, Any]]:
    """Run the cells of ``jobs`` as Ray tasks (≤ ``max_parallel`` in flight); a crashed task is
    recorded as a failed cell."""
    from simulations.core.config import RayConfig
    from simulations.core.engine import ray_session

    infos: dict[str, dict[str, Any]] = {}
    with ray_session(RayConfig(address=address)) as ray:
        _check_resources(ray, sweep)
        start_sweep_dir(sweep)
        tasks = gridrun.ray_tasks(ray, sweep.spec.cell_resources.ray_options(), max_parallel)
        gridrun.execute(jobs, run_cell_job, tasks, _on_done(sweep, infos, len(jobs)))
    return infos


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m simulations.sweep", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="sweep YAML file (base, grid, out, cell_resources, max_parallel, plot)")
    p.add_argument("--out", default=None, help="sweep directory (overrides the file's out)")
    p.add_argument("--max-parallel", type=int, default=None, help="cells at once (overrides the file)")
    p.add_argument("--ray-address", default=None, help="run the cells on an existing cluster: auto or HOST:PORT")
    p.add_argument("--serial", action="store_true", help="run the cells one by one in this process (no Ray)")
    p.add_argument("--rerun", action="store_true", help="run finished cells again too")
    p.add_argument("--dry-run", action="store_true", help="list the cells and their state; run nothing")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import logging

    logging.getLogger("flwr").setLevel(logging.WARNING)
    t0 = time.time()
    try:
        if args.max_parallel is not None and args.max_parallel < 1:
            raise ConfigError("max_parallel", "must be ≥ 1")
        sweep = load_sweep(args.sweep, out=args.out)
        if not args.rerun:
            check_finished(sweep)
        from fedagg.io import cannot_create_dir

        why = cannot_create_dir(sweep.out)
        if why is not None:
            raise ConfigError("out", f"{why}; choose another --out")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from simulations.core.config import config_warnings

    for line in dict.fromkeys(w for c in sweep.cells for w in config_warnings(c.config)):
        print(f"warning: {line}", file=sys.stderr)
    states = {c.name: cell_state(c) for c in sweep.cells}
    work = gridrun.plan([CellJob.of(c) for c in sweep.cells], fresh=args.rerun)
    todo, skipped = work.todo, len(work.done)
    print(f"sweep {sweep.out}: {len(sweep.cells)} cells ({' × '.join(str(len(v)) for v in sweep.spec.grid.values())}"
          f" over {', '.join(sweep.keys)}); {len(todo)} to run, {skipped} skipped (finished)", flush=True)
    if args.dry_run:
        for c in sweep.cells:
            print(f"  {states[c.name]:8s} {c.name}")
        return 0
    infos: dict[str, dict[str, Any]] = {}
    from simulations.core.engine import sigterm_interrupts, termination_signal

    try:
        with sigterm_interrupts():  # SIGTERM stops the sweep like Ctrl-C
            if todo and not args.serial:
                infos = run_ray(sweep, todo, args.ray_address, args.max_parallel or sweep.spec.max_parallel)
            else:
                infos = run_serial(sweep, todo)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        signum = termination_signal(exc)
        what, code = ("terminated", 128 + signum) if signum is not None else ("interrupted", 130)
        print(f"\n{what}: finished cells are kept in {sweep.out}; run the sweep again to go on",
              file=sys.stderr)
        return code
    failed = [n for n, i in infos.items() if i.get("status") != "done"]
    ran = len(infos) - len(failed)
    write_state(sweep, infos, ran=ran, skipped=skipped, failed=len(failed), seconds=time.time() - t0)
    nrows = write_results(sweep)
    plots = write_plot(sweep)
    print(f"{len(sweep.cells)} cells: {ran} ran, {skipped} skipped, {len(failed)} failed "
          f"({time.time() - t0:.1f} s) → {sweep.out / 'results.csv'} ({nrows} rows)"
          + (f", {plots[0]}" if plots else ""))
    if failed:
        print(f"error: {len(failed)} of {len(sweep.cells)} cells failed:", file=sys.stderr)
        for n in failed:
            print(f"  {n}: {infos[n].get('error', '')} (see {sweep.out / 'cells' / n / 'error.txt'})",
                  file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
