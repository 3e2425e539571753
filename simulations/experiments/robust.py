"""``python -m simulations.experiments.robust``: the Byzantine-robustness grid of docs/robust.md.

    nice -n 10 python -m simulations.experiments.robust            # the full grid
    python -m simulations.experiments.robust --quick               # smoke run: 1 seed, 3 rounds

Runs every (f × attack × aggregator × seed) of ``simulations/configs/robust_mnist1d.yaml`` (f = 0:
every aggregator without attack) with the inline engine, ``--workers`` runs at a time (process
pool, at most 2), into ``--out/f<f>/<attack>/<aggregator>/seed-<s>/`` (default
``runs/robust_mnist1d``; ``--quick`` uses ``runs/robust_mnist1d_quick``). Finished runs are reused
(``--fresh`` redoes them; ``--report-only`` runs nothing).

Then it writes ``results.json`` into ``--out``, the tables between ``<!-- robust:results -->`` and
``<!-- /robust:results -->`` in ``--docs`` (default ``docs/robust.md``; ``--quick`` writes no docs
unless ``--docs`` is given) and three figures into ``--figures`` (default ``docs/figures``):
``robust_heatmap.png`` (aggregator × attack at the largest f, final test accuracy, with the
worst case over attacks as ByzFL reports it), ``robust_curves.png`` (test accuracy per round at
the largest f, one panel per attack) and ``robust_vs_f.png`` (worst case over attacks against f).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedagg.errors import ConfigError
from simulations.experiments import grid, study
from simulations.experiments import tuning as tuning_lib
from simulations.report import mean_std, table, write_section

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "robust_mnist1d.yaml"
#: Keys an aggregator's ``tune`` grid may name.
TUNABLE = tuning_lib.TUNABLE
#: The plateau check compares the headline with the same window this many rounds earlier.
PLATEAU_GAP = 100
#: The paper's attack and the baselines its claim names (FA "consistently outperforms" them).
PAPER_ATTACK = "random"
NO_ATTACK = "none"
#: Written instead of summary.json when the runner stops a run early (``RunError``): e.g. the mean
#: under ipm(100) diverges until every update is rejected as non-finite or absurd.
FAILED = grid.FAILED
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


# ------------------------------------------------------------------------------ config
def load_experiment(path: str | Path = DEFAULT_CONFIG, quick: bool = False) -> dict[str, Any]:
    """The experiment mapping, checked; ``quick`` applies the ``quick`` section (its ``base``
    merges into ``base``, other keys replace). Optional keys: ``seeds_by_f``, ``attacks_by_f``
    (``{f: [attack names]}``: a subset of the columns at that f), ``name`` (default ``robust``:
    the docs markers ``<name>:results``/``<name>:claims``, the figures ``<name>_*.png`` and the
    default output ``runs/<name>_mnist1d``), ``claims`` (default true: write the FA claim table),
    ``last_rounds``
    (default 1: the final accuracy) and ``tuning`` (``seed``, ``f``) with a ``tune`` grid
    (``{server_lr: [values]}`` or ``{lr: [...]}``) on aggregators."""
    exp = grid.load_grid(path, ("seeds", "f", "base", "attacks", "aggregators"),
                         ("seeds_by_f", "attacks_by_f", "tuning", "last_rounds", "name", "claims"),
                         quick=quick)
    name = exp.setdefault("name", "robust")
    if not isinstance(name, str) or not name.replace("_", "").isalnum():
        raise ConfigError("name", f"letters, digits and '_' (got {name!r}); it names the docs "
                          "section, the figures and the default output folder")
    if not isinstance(exp.setdefault("claims", True), bool):
        raise ConfigError("claims", f"true or false (got {exp['claims']!r})")
    exp["seeds_by_f"] = {int(k): [int(s) for s in v] for k, v in (exp.get("seeds_by_f") or {}).items()}
    exp["attacks_by_f"] = {int(k): list(v) for k, v in (exp.get("attacks_by_f") or {}).items()}
    for f, names in exp["attacks_by_f"].items():
        bad = [a for a in names if a not in exp["attacks"]]
        if bad or not names:
            raise ConfigError(f"attacks_by_f.{f}", f"{bad or names!r}; allowed: a non-empty list of "
                              + ", ".join(exp["attacks"]))
    if not exp["seeds"] or not exp["f"] or not exp["attacks"] or not exp["aggregators"]:
        raise ConfigError("seeds", "need at least one seed, f, attack and aggregator")
    if NO_ATTACK in exp["attacks"]:
        raise ConfigError(f"attacks.{NO_ATTACK}", "reserved for the f = 0 runs")
    last = exp.setdefault("last_rounds", 1)
    if not isinstance(last, int) or isinstance(last, bool) or last < 1:
        raise ConfigError("last_rounds", f"must be an integer >= 1 (got {last!r})")
    exp["aggregators"] = {a: dict(over or {}) for a, over in exp["aggregators"].items()}
    tuned = [a for a, over in exp["aggregators"].items() if "tune" in over]
    for agg in tuned:
        tune_grid(exp, agg)
    tuning_lib.check_pairing(exp, tuned, "aggregators", "aggregator",
                             lambda spec: _check_tuning(spec, exp), "seed, f")
    _check_last_rounds(exp)
    return exp


def tune_grid(exp: Mapping[str, Any], agg: str) -> tuple[str, list[float]] | None:
    """``(key, values)`` of the aggregator's ``tune`` grid, or None."""
    over = exp["aggregators"][agg]
    return tuning_lib.check_tune(f"aggregators.{agg}.tune", over, TUNABLE) if "tune" in over else None


def _check_tuning(spec: Any, exp: Mapping[str, Any]) -> dict[str, Any]:
    """The ``tuning`` section: ``seed`` (required, not a table seed) and ``f`` (the tolerance the
    rules are set to while every client is honest; default 0)."""
    if not isinstance(spec, Mapping):
        raise ConfigError("tuning", "a mapping with seed and f")
    extra = sorted(set(spec) - {"seed", "f"})
    if extra:
        raise ConfigError(f"tuning.{extra[0]}", "unknown key; allowed: f, seed")
    seed, f = spec.get("seed"), spec.get("f", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError("tuning.seed", f"required, an integer >= 0 (got {seed!r})")
    if seed in exp["seeds"] or any(seed in v for v in exp["seeds_by_f"].values()):
        raise ConfigError("tuning.seed", f"{seed} is also a table seed; tune on a seed the table "
                          "does not use")
    if not isinstance(f, int) or isinstance(f, bool) or f < 0:
        raise ConfigError("tuning.f", f"an integer >= 0 (got {f!r})")
    return {"seed": seed, "f": f}


def _check_last_rounds(exp: Mapping[str, Any]) -> None:
    """Every run must evaluate each of the last ``last_rounds`` rounds
    (:func:`~simulations.experiments.tuning.check_last_rounds`)."""
    tuning_lib.check_last_rounds(exp["last_rounds"], exp["base"],
                                 {"base.rounds": exp["base"].get("rounds", 20)})


@dataclasses.dataclass(frozen=True)
class Job(study.StudyJob):
    """One run: of the table (``value`` None) or of tuning (``value`` the tuned key's value)."""

    AXES = ("f", "attack", "aggregator")
    TUNE_AXES = ("aggregator",)

    f: int
    attack: str
    aggregator: str

    @staticmethod
    def label(axis: str, value: Any) -> str:
        return f"f{value}" if axis == "f" else str(value)

    @property
    def keeps_failed(self) -> bool:
        """Every run: a run the runner stops (diverged) is reported, its last evaluation
        carried forward (:func:`collect`)."""
        return True


def _cell(exp: Mapping[str, Any], axes: Mapping[str, Any], seed: int, out: Path,
          extra: Mapping[str, Any]) -> dict[str, Any]:
    """The validated run config of one cell: ``base`` ← aggregator ← attack ← ``extra``."""
    f, attack, agg = axes["f"], axes["attack"], axes["aggregator"]
    a_over = exp["attacks"].get(attack, {}) if attack != NO_ATTACK else {}
    return study.cell_config(exp["base"], exp["aggregators"][agg], [a_over or {}], extra,
                             seed=seed, out=out, name=f"f{f}.{attack}.{agg}",
                             fixed={"num_byzantine": f},
                             drop=("attack", "attack_args") if f == 0 else ())


def _grids(exp: Mapping[str, Any]) -> dict[str, tuple[str, list[float]]]:
    return {agg: spec for agg in exp["aggregators"] if (spec := tune_grid(exp, agg)) is not None}


def _declares_f(strategy: str) -> bool:
    import strategies

    return strategies.REGISTRY.entry(strategy).param("f") is not None


def make_tune_jobs(exp: Mapping[str, Any], out: Path) -> list[Job]:
    """Every (tuned aggregator, value) on the tuning seed, every client honest, the rule set to
    tolerate ``tuning.f`` (``strategy_args.f`` where the strategy takes one)."""
    if not exp.get("tuning"):
        return []
    t = exp["tuning"]
    cells = []
    for agg, spec in _grids(exp).items():
        strategy = grid.merge(exp["base"], exp["aggregators"][agg]).get("strategy", "fedavg")
        extra_f = {"strategy_args": {"f": t["f"]}} if t["f"] and _declares_f(strategy) else {}
        cells.append(({"f": 0, "attack": NO_ATTACK, "aggregator": agg}, spec, extra_f))
    return study.tune_jobs(Job, out, cells, t["seed"], functools.partial(_cell, exp))


def make_jobs(exp: Mapping[str, Any], out: Path,
              chosen: Mapping[str, float] | None = None) -> list[Job]:
    """Every cell of the table, validated up front (a ConfigError names the cell). A tuned
    aggregator gets ``chosen[agg]``; without ``chosen`` (checking the configs before tuning has
    run) the first value of its grid."""
    cells = [({"f": int(f), "attack": attack, "aggregator": agg},
              exp["seeds_by_f"].get(int(f), exp["seeds"]))
             for f in exp["f"] for attack in attacks_at(exp, int(f)) for agg in exp["aggregators"]]
    return study.table_jobs(Job, out, cells, _grids(exp), chosen, functools.partial(_cell, exp))


# ------------------------------------------------------------------------------ running
def run_job(job: Job, fresh: bool = False) -> dict[str, Any]:
    """Run (or reuse) one simulation; return its summary (plus ``cpu_seconds``, ``reused``). A run
    the runner stops (diverged) keeps its completed rounds and writes ``failed.json``."""
    return grid.run_simulation(job, fresh, quiet=_quiet_logs, keep_failed=True)


def _quiet_logs() -> None:
    """Flower logs every round at INFO; keep errors only (rejections are expected here)."""
    grid.quiet_logs(logging.ERROR, ("flwr", "fedagg"))


def _quiet_worker() -> None:
    """Pool worker set-up: one BLAS/OpenMP thread per run (runs are the parallelism)."""
    grid.init_worker(_THREAD_VARS, logging.ERROR, ("flwr", "fedagg"), threadpool=True)


def _progress(i: int, total: int, job: Job, s: Mapping[str, Any], elapsed: float) -> str:
    stopped = f", stopped: {s['error']}" if "error" in s else ""
    return (f"[{i}/{total}] {job.name}: {100 * s['final_test_accuracy']:.1f} % "
            f"({s.get('cpu_seconds', 0.0):.1f} s CPU, {elapsed:.0f} s elapsed{stopped})")


def _one_thread(_todo: Sequence[Job]) -> None:
    """One BLAS/OpenMP thread, set here so spawned workers inherit it before importing numpy."""
    for var in _THREAD_VARS:
        os.environ[var] = "1"


def run_all(jobs: Sequence[Job], workers: int = 2, fresh: bool = False,
            echo: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Run ``jobs`` (``workers`` ≤ 2 at a time); ``{job.name: summary}``."""
    return study.run_jobs(jobs, run_job, _quiet_worker, max(1, min(int(workers), 2)), fresh,
                          echo, line=_progress, prepare=_one_thread)


# ------------------------------------------------------------------------------ results
def _column_total(run_dir: Path, key: str) -> float:
    vals = [r.get(key) for r in grid.train_rows(run_dir)]
    return float(sum(float(v) for v in vals if v not in (None, "") and math.isfinite(float(v))))




def collect(exp: Mapping[str, Any], jobs: Sequence[Job]) -> dict[str, Any]:
    """``results[f][attack][aggregator]``: per-seed headline (mean test accuracy over the last
    ``last_rounds`` rounds), final accuracy, the same window ``PLATEAU_GAP`` rounds earlier,
    curves, rejected/infeasible counts, wall seconds; JSON-ready. A run the runner stopped carries
    its last test forward on the scheduled evaluation rounds (the runner tests the model a run
    stops with, so that is the diverged model's accuracy)."""
    last = exp["last_rounds"]
    out: dict[str, Any] = {}
    for job in jobs:
        if not study.usable(job):
            continue
        rounds, acc = grid.run_curve(job.run_dir)
        summary = grid.read_summary(job.run_dir, failed=True)
        stopped = "error" in summary
        if stopped:
            rounds, acc = grid.stopped_curve(rounds, acc, job.config)
        cell = out.setdefault(str(job.f), {}).setdefault(job.attack, {}).setdefault(
            job.aggregator, {"seeds": [], "headline": [], "final": [], "earlier": [],
                             "rounds": rounds.tolist(), "curves": [], "rejected": [],
                             "infeasible": [], "wall_seconds": [], "stopped": []})
        cell["stopped"].append(int(stopped))
        cell["seeds"].append(job.seed)
        cell["headline"].append(tuning_lib.late_mean(rounds, acc, last))
        cell["final"].append(float(acc[-1]))
        cell["earlier"].append(tuning_lib.late_mean(rounds, acc, last, float(rounds[-1]) - PLATEAU_GAP))
        cell["curves"].append(acc.tolist())
        cell["rejected"].append(_column_total(job.run_dir, "rejected"))
        cell["infeasible"].append(_column_total(job.run_dir, "infeasible"))
        cell["wall_seconds"].append(float(summary["wall_seconds"]))
    return out


def collect_tuning(exp: Mapping[str, Any], jobs: Sequence[Job]) -> dict[str, Any]:
    """``{aggregator: {key, values, scores, chosen, edge}}``: a score is the headline of the
    tuning run (NaN if the runner stopped it); ``chosen`` has the best score; ``edge`` says it is
    the first or last value of the grid. ConfigError("tuning", ...) if a run is not finished or
    every value failed (:func:`.study.collect_tuning`)."""
    return study.collect_tuning(exp, jobs, edge=True)


def attacks_at(exp: Mapping[str, Any], f: int) -> list[str]:
    """The attacks run at ``f`` (``[NO_ATTACK]`` at f = 0)."""
    if f == 0:
        return [NO_ATTACK]
    return list(exp["attacks_by_f"].get(f, exp["attacks"]))


def full_fs(exp: Mapping[str, Any]) -> list[int]:
    """The f values (sorted) at which every attack ran, f = 0 included: where a worst case over
    attacks exists."""
    return sorted(int(f) for f in exp["f"]
                  if int(f) == 0 or attacks_at(exp, int(f)) == list(exp["attacks"]))


def cell_mean(results: Mapping[str, Any], f: int, attack: str, agg: str) -> float:
    cell = results.get(str(f), {}).get(attack, {}).get(agg)
    return float(np.mean(cell["headline"])) if cell and cell["headline"] else float("nan")


def worst_case(results: Mapping[str, Any], f: int, agg: str, attacks: Sequence[str]) -> float:
    """ByzFL's worst case: the minimum over attacks of the seed-averaged final accuracy (f = 0:
    the clean accuracy); NaN if a cell is missing."""
    if f == 0:
        return cell_mean(results, 0, NO_ATTACK, agg)
    vals = [cell_mean(results, f, a, agg) for a in attacks]
    return float("nan") if not vals or any(math.isnan(v) for v in vals) else min(vals)


def _fmt(values: Sequence[float] | None, stopped: int = 0) -> str:
    if not values:
        return "–"
    return mean_std(values, scale=100) + (" †" * (stopped > 0))


def _cell_text(cell: Mapping[str, Any] | None) -> str:
    return _fmt(cell["headline"], sum(cell.get("stopped", []))) if cell else "–"


def _bold_best(cells: dict[str, str], means: dict[str, float]) -> dict[str, str]:
    finite = {k: v for k, v in means.items() if not math.isnan(v)}
    if finite:
        best = max(finite.values())
        for k, v in finite.items():
            if v >= best - 1e-12:
                cells[k] = f"**{cells[k]}**"
    return cells


def attack_table(results: Mapping[str, Any], f: int, attacks: Sequence[str],
                 aggs: Sequence[str], labels: Mapping[str, str], worst: bool = True) -> str:
    """Rows = aggregators; columns = clean (f = 0), each attack at ``f``, worst case (unless
    ``worst`` is False: ``attacks`` is not every attack). Cells: headline test accuracy, mean ±
    std over seeds (%); the best of each column in bold."""
    cols = ["clean (f=0)", *[labels.get(a, a) for a in attacks], *(["worst case"] if worst else [])]
    grid: dict[str, dict[str, str]] = {a: {} for a in aggs}
    for j, col in enumerate(cols):
        cells, means = {}, {}
        for agg in aggs:
            if j == 0:
                cell = results.get("0", {}).get(NO_ATTACK, {}).get(agg)
                cells[agg], means[agg] = _cell_text(cell), cell_mean(results, 0, NO_ATTACK, agg)
            elif worst and j == len(cols) - 1:
                w = worst_case(results, f, agg, attacks)
                cells[agg], means[agg] = ("–" if math.isnan(w) else f"{100 * w:.1f}"), w
            else:
                a = attacks[j - 1]
                cell = results.get(str(f), {}).get(a, {}).get(agg)
                cells[agg], means[agg] = _cell_text(cell), cell_mean(results, f, a, agg)
        for agg, text in _bold_best(cells, means).items():
            grid[agg][col] = text
    return table(["aggregator", *cols], [[agg, *(grid[agg][c] for c in cols)] for agg in aggs],
                 "l" + "r" * len(cols))


def worst_table(results: Mapping[str, Any], fs: Sequence[int], attacks: Sequence[str],
                aggs: Sequence[str]) -> str:
    """Rows = aggregators, columns = f: worst case over attacks (f = 0: clean), % ."""
    grid: dict[str, dict[int, str]] = {a: {} for a in aggs}
    for f in fs:
        means = {agg: worst_case(results, f, agg, attacks) for agg in aggs}
        cells = {agg: "–" if math.isnan(v) else f"{100 * v:.1f}" for agg, v in means.items()}
        for agg, text in _bold_best(cells, means).items():
            grid[agg][f] = text
    return table(["aggregator", *(f"f={f}" for f in fs)],
                 [[agg, *(grid[agg][f] for f in fs)] for agg in aggs], "l" + "r" * len(fs))


# ------------------------------------------------------------------------------ figures
def _style(agg: str, i: int) -> dict[str, Any]:
    """Line style: FA variants thick red, the mean black, the others tab10 dashed."""
    import matplotlib.pyplot as plt

    if agg == "flag":
        return {"color": "tab:red", "lw": 2.4, "ls": "-"}
    if agg.startswith("flag"):
        return {"color": "darkred", "lw": 2.0, "ls": "-."}
    if agg == "mean":
        return {"color": "black", "lw": 1.6, "ls": "-"}
    others = [c for c in plt.get_cmap("tab10").colors if c != plt.get_cmap("tab10").colors[3]]
    return {"color": others[i % len(others)], "lw": 1.2, "ls": "--"}


def plot_heatmap(results: Mapping[str, Any], f: int, attacks: Sequence[str], aggs: Sequence[str],
                 labels: Mapping[str, str], path: Path) -> Path:
    plt = grid.pyplot()
    cols = ["clean\n(f=0)", *[labels.get(a, a) for a in attacks], "worst\ncase"]
    M = np.full((len(aggs), len(cols)), np.nan)
    for i, agg in enumerate(aggs):
        M[i, 0] = cell_mean(results, 0, NO_ATTACK, agg)
        for j, a in enumerate(attacks, 1):
            M[i, j] = cell_mean(results, f, a, agg)
        M[i, -1] = worst_case(results, f, agg, attacks)
    fig, ax = plt.subplots(figsize=(1.1 * len(cols) + 2.5, 0.45 * len(aggs) + 1.6))
    im = ax.imshow(100 * M, cmap="viridis", vmin=0, vmax=max(60.0, float(np.nanmax(100 * M))),
                   aspect="auto")
    ax.set_xticks(range(len(cols)), cols, fontsize=8)
    ax.set_yticks(range(len(aggs)), aggs, fontsize=8)
    ax.axvline(len(cols) - 1.5, color="white", lw=2)
    ax.axvline(0.5, color="white", lw=2)
    for i in range(len(aggs)):
        for j in range(len(cols)):
            if not np.isnan(M[i, j]):
                ax.text(j, i, f"{100 * M[i, j]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if M[i, j] < 0.35 else "black")
    ax.set_title(f"MNIST-1D, 15 clients, f = {f} Byzantine: test accuracy, last rounds (%)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_curves(results: Mapping[str, Any], f: int, attacks: Sequence[str], aggs: Sequence[str],
                labels: Mapping[str, str], path: Path) -> Path:
    plt = grid.pyplot()
    ncol = 3
    nrow = math.ceil(len(attacks) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.2 * nrow), sharey=True,
                             squeeze=False)
    for k, a in enumerate(attacks):
        ax = axes[k // ncol][k % ncol]
        for i, agg in enumerate(aggs):
            cell = results.get(str(f), {}).get(a, {}).get(agg)
            if not cell:
                continue
            curves = 100 * np.array(cell["curves"], dtype=np.float64)
            mean = curves.mean(axis=0)
            std = curves.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros_like(mean)
            style = _style(agg, i)
            ax.plot(cell["rounds"], mean, label=agg, **style)
            ax.fill_between(cell["rounds"], mean - std, mean + std, color=style["color"],
                            alpha=0.12, lw=0)
        ax.set_title(f"{labels.get(a, a)}, f = {f} (mean ± std over seeds)", fontsize=9)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    for k in range(len(attacks), nrow * ncol):
        axes[k // ncol][k % ncol].axis("off")
    for row in axes:
        row[0].set_ylabel("test accuracy (%)")
    handles, names = axes[0][0].get_legend_handles_labels()
    if names:  # none while the grid has no finished cell at this f
        fig.legend(handles, names, loc="lower center", ncol=min(len(names), 6), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_vs_f(results: Mapping[str, Any], fs: Sequence[int], attacks: Sequence[str],
              aggs: Sequence[str], path: Path) -> Path:
    plt = grid.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    for i, agg in enumerate(aggs):
        ys = [100 * worst_case(results, f, agg, attacks) for f in fs]
        ax.plot(fs, ys, marker="o", label=agg, **_style(agg, i))
    ax.set_xticks(list(fs))
    ax.set_xlabel("Byzantine clients f (of 15)")
    ax.set_ylabel("worst-case test accuracy (%)")
    ax.set_title("worst case over attacks (f = 0: no attack)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------ report
LABELS: dict[str, str] = {}


def paired_gap(results: Mapping[str, Any], f: int, attack: str, a: str, b: str) -> np.ndarray | None:
    """Per-seed headline of ``a`` minus ``b`` in one (f, attack) cell, paired by seed (points of
    accuracy, 0–1 scale); None if either cell is missing
    (:func:`~simulations.experiments.tuning.paired_gap` on the f's cells)."""
    gaps = tuning_lib.paired_gap(results.get(str(f), {}), attack, a, b)
    return None if gaps is None else gaps / 100


def verdict(gaps: np.ndarray) -> str:
    """``holds`` if ``a`` is above ``b`` on every seed, ``fails`` if below on every seed,
    ``mixed`` otherwise."""
    if (gaps > 0).all():
        return "holds"
    if (gaps < 0).all():
        return "fails"
    return "mixed"


def _gap_text(gaps: np.ndarray | None) -> str:
    if gaps is None or not len(gaps):
        return "–"
    return f"{tuning_lib.gap_text(100 * gaps)} ({verdict(gaps)})"


def claims_markdown(results: Mapping[str, Any], exp: Mapping[str, Any], target: str = "flag",
                    attack: str = PAPER_ATTACK) -> str:
    """The claim table: ``target`` minus each other aggregator, per f, under ``attack`` (paired by
    seed, mean ± std, points) and in the worst case over attacks (seed means)."""
    fs = sorted(int(f) for f in exp["f"] if int(f) > 0)
    attacks = list(exp["attacks"])
    full = [f for f in fs if attacks_at(exp, f) == attacks]
    others = [a for a in exp["aggregators"] if a != target]
    seeds = sorted({s for f in fs for s in exp["seeds_by_f"].get(f, exp["seeds"])})
    last, rounds = exp["last_rounds"], exp["base"].get("rounds")
    lines = [
        "**Claim** (Almasi et al., ICLR 2024): the Flag Aggregator (FA) \"consistently outperforms\" "
        "Multi-Krum, Bulyan, median, trimmed mean, MeaMed and Phocas, across f and batch sizes "
        "(CIFAR-10, ResNet-18/50, parameter-server SGD, `random` attackers).",
        "",
        f"**Ours**: FA minus each rule, test accuracy points (mean over the last {last} of {rounds} "
        f"rounds), paired by seed: mean ± std over seeds {seeds}; *holds* = FA higher on every "
        "seed, *fails* = lower on every seed, *mixed* otherwise.",
        "",
    ]
    rows = []
    for agg in others:
        row = [_gap_text(paired_gap(results, f, attack, target, agg)) for f in fs]
        for f in full:
            w = worst_case(results, f, target, attacks) - worst_case(results, f, agg, attacks)
            row.append("–" if math.isnan(w) else f"{100 * w:+.1f}")
        rows.append([agg, *row])
    header = ["FA − rule", *(f"`{attack}`, f = {f}" for f in fs),
              *(f"worst case, f = {f}" for f in full)]
    lines.append(table(header, rows, "l" + "r" * (len(fs) + len(full))))
    return "\n".join(lines)


def tuning_markdown(tuning: Mapping[str, Any], exp: Mapping[str, Any]) -> str:
    """One line per aggregator: the grid, each value's tuning score, the choice."""
    if not tuning:
        return ""
    t = exp["tuning"]
    lines = [f"**Tuning** (seed {t['seed']}, every client honest, rules set to tolerate "
             f"f = {t['f']}; score = the headline metric): ", ""]
    for agg, c in tuning.items():
        scores = ", ".join(f"{v:g}: {'–' if math.isnan(sc) else f'{100 * sc:.1f}'}"
                           for v, sc in zip(c["values"], c["scores"], strict=True))
        edge = " (edge of the grid)" if c.get("edge") else ""
        lines.append(f"- {agg}: {c['key']} **{c['chosen']:g}**{edge} ({scores})")
    return "\n".join(lines)


def plateau_markdown(results: Mapping[str, Any]) -> str:
    """How much the headline moved over the last ``PLATEAU_GAP`` rounds, over every cell."""
    moves, names = [], []
    for f, f_cells in sorted(results.items()):
        for attack, a_cells in f_cells.items():
            for agg, cell in a_cells.items():
                d = np.asarray(cell["headline"]) - np.asarray(cell["earlier"])
                if np.isfinite(d).all():
                    moves.append(float(np.mean(d)))
                    names.append(f"{agg} (f={f}, {LABELS.get(attack, attack)})")
    if not moves:
        return ""
    m = np.asarray(moves)
    big = [f"{n}: {100 * v:+.1f}" for n, v in zip(names, m, strict=True) if abs(v) > 0.01]
    return (f"**Plateau check**: the headline against the same window {PLATEAU_GAP} rounds earlier, "
            f"over {len(m)} cells (seed means): median |change| {100 * float(np.median(np.abs(m))):.2f} "
            f"points, largest {100 * float(np.abs(m).max()):.2f}; cells that moved by more than 1 "
            "point: " + (", ".join(big) if big else "none") + ".")


def report_markdown(results: Mapping[str, Any], exp: Mapping[str, Any], runs: int,
                    tuning: Mapping[str, Any] | None = None, wall_seconds: float = 0.0) -> str:
    attacks = list(exp["attacks"])
    aggs = list(exp["aggregators"])
    fs = sorted(int(f) for f in exp["f"])
    fmax = max(fs)
    base = exp["base"]
    seeds_max = exp["seeds_by_f"].get(fmax, exp["seeds"])
    server = ""
    if base.get("server_momentum") or base.get("server_lr_decay"):
        server = (f"; server SGD with momentum {base.get('server_momentum', 0)}, weight decay "
                  f"{base.get('server_weight_decay', 0)}, lr × {base.get('server_lr_decay', 1)} "
                  f"every {base.get('server_lr_decay_every', '–')} rounds")
    parts = [
        f"Setting: {base.get('dataset')} ({base.get('partition')}), {base.get('num_clients')} "
        f"clients all training every round, model `{base.get('model')}`, {base.get('rounds')} rounds "
        f"of {base.get('local_steps')} local step(s) (batch {base.get('batch_size')}, client lr "
        f"{base.get('lr')}, momentum {base.get('momentum')}){server}. Cells: test accuracy (%) "
        f"averaged over the last {exp['last_rounds']} rounds, mean ± std over seeds {seeds_max}; "
        f"{runs} runs, {wall_seconds / 60:.0f} minutes of run wall time in all (sum over runs, "
        "2-core CPU, two runs at a time)."
        + "".join(f" At f = {f} only {', '.join(f'`{a}`' for a in names)} ran (CPU budget)."
                  for f, names in sorted(exp["attacks_by_f"].items())),
        "",
        tuning_markdown(tuning or {}, exp),
        "",
        plateau_markdown(results),
        "",
        f"### Aggregator × attack at f = {fmax} (of {base.get('num_clients')})",
        "",
        attack_table(results, fmax, attacks, aggs, LABELS),
        "",
        f"![heatmap](figures/{exp['name']}_heatmap.png)",
        "",
        "### Worst case over attacks against f",
        "",
        worst_table(results, full_fs(exp), attacks, aggs),
        "",
        f"![worst case vs f](figures/{exp['name']}_vs_f.png)",
        "",
        f"### Test accuracy per round at f = {fmax}",
        "",
        f"![curves](figures/{exp['name']}_curves.png)",
    ]
    for f in fs:
        if f in (0, fmax):
            continue
        parts += ["", f"### Aggregator × attack at f = {f}", "",
                  attack_table(results, f, attacks_at(exp, f), aggs, LABELS,
                               worst=attacks_at(exp, f) == attacks)]
    rej = []
    for f in fs:
        for a in attacks if f else [NO_ATTACK]:
            for agg in aggs:
                cell = results.get(str(f), {}).get(a, {}).get(agg)
                if cell and sum(cell["infeasible"]) > 0:
                    rej.append(f"{agg} (f={f}, {LABELS.get(a, a)}): {int(sum(cell['infeasible']))}")
    stopped = []
    for f in fs:
        for a in attacks if f else [NO_ATTACK]:
            for agg in aggs:
                cell = results.get(str(f), {}).get(a, {}).get(agg)
                if cell and sum(cell.get("stopped", [])) > 0:
                    stopped.append(f"{agg} (f={f}, {LABELS.get(a, a)}): {sum(cell['stopped'])}")
    parts += ["", "Rounds skipped as infeasible (global model kept): "
              + (", ".join(rej) if rej else "none") + ".",
              "", "† runs stopped by the runner because every update of a round was rejected (the "
              "global model had diverged to huge or non-finite weights, so every client's update "
              "was non-finite or absurd); the accuracy of the model they stopped with, tested at "
              "that round, is carried forward: "
              + (", ".join(stopped) if stopped else "none") + "."]
    return "\n".join(p for p in parts)


def write_docs(markdown: str, docs: Path, claims: str | None = None, name: str = "robust") -> Path:
    """Replace the block between the ``<name>:results`` markers of ``docs`` (appended if absent),
    and the claim table between the ``<name>:claims`` markers."""
    write_section(docs, markdown.strip(), f"{name}:results",
                       empty="# Byzantine-robust aggregation\n")
    if claims is not None:
        write_section(docs, claims.strip(), f"{name}:claims")
    return docs


# ------------------------------------------------------------------------------ CLI
def _report(run: study.Run) -> int:
    """The CPU time of this invocation, results.json, the claims and the tables (printed and in
    the docs page), the figures."""
    exp, out, results = run.exp, run.out, run.results
    cpu = [float(s["cpu_seconds"]) for s in run.summaries.values()
           if not s.get("reused") and "cpu_seconds" in s]
    if cpu:
        print(f"this invocation: {len(cpu)} runs, {sum(cpu) / 60:.1f} CPU minutes "
              f"({np.mean(cpu):.1f} s per run)")
    done = [j for j in [*run.tune_jobs, *run.jobs] if study.usable(j)]
    wall = sum(float(grid.read_summary(j.run_dir, failed=True).get("wall_seconds", 0.0))
               for j in done)
    out.mkdir(parents=True, exist_ok=True)
    from simulations.core.results import atomic_write_text

    atomic_write_text(out / "results.json", json.dumps(
        {"config": exp, "tuning": run.tuning, "results": results, "run_wall_seconds": wall},
        default=str))
    md = report_markdown(results, exp, len(done), run.tuning, wall)
    claims = claims_markdown(results, exp) if exp["claims"] and "flag" in exp["aggregators"] else None
    print(claims or "")
    print(md)
    if run.figures is not None:
        attacks, aggs = list(exp["attacks"]), list(exp["aggregators"])
        fmax = max(int(f) for f in exp["f"])
        name = exp["name"]
        plot_heatmap(results, fmax, attacks, aggs, LABELS, run.figures / f"{name}_heatmap.png")
        plot_curves(results, fmax, attacks, aggs, LABELS, run.figures / f"{name}_curves.png")
        plot_vs_f(results, full_fs(exp), attacks, aggs, run.figures / f"{name}_vs_f.png")
    if run.docs is not None:
        print(f"recorded in {write_docs(md, run.docs, claims, exp['name'])}")
    print(f"done in {time.perf_counter() - run.t0:.0f} s")
    return 0


_ROOT = Path(__file__).resolve().parents[2]
STUDY = study.Study(
    module="simulations.experiments.robust", doc=__doc__, config=DEFAULT_CONFIG,
    docs_help="docs page to update (default docs/robust.md; none with --quick)",
    figures_help="figure folder (default docs/figures; none with --quick)",
    workers_help="runs in parallel (default 2, at most 2)",
    job=Job, load_experiment=load_experiment,
    paths=lambda args, exp: grid.output_paths(args, f"runs/{exp['name']}_mnist1d",
                                              _ROOT / "docs" / "robust.md",
                                              _ROOT / "docs" / "figures", quick_figures=False),
    make_tune_jobs=make_tune_jobs, make_jobs=make_jobs, run_all=run_all,
    collect_tuning=collect_tuning, collect=collect, report=_report,
    tune_line=lambda out, jobs: f"tuning: {len(jobs)} runs into {out / 'tune'}",
    table_line=lambda exp, out, jobs: f"table: {len(jobs)} runs into {out}",
    announce_always=True, tuning_exit=2, require_results=False)
#: ``python -m`` entry point (:func:`~simulations.experiments.study.run_study`).
main = STUDY.main


if __name__ == "__main__":
    sys.exit(main())
