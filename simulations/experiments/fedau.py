"""``python -m simulations.experiments.fedau``: the FedAU study of docs/fedau.md.

    nice -n 10 python -m simulations.experiments.fedau            # tuning, then the table's grid
    python -m simulations.experiments.fedau --quick               # smoke run of the whole pipeline

Two stages, both resumable sweeps (a finished run whose ``config.yaml`` matches its cell is
reused; ``--fresh`` redoes them, ``--report-only`` runs nothing), ``--workers`` runs at a time
with the inline engine:

1. **Tuning.** Every method with a ``tune`` grid (``{key: [values]}``, ``key`` = ``lr`` or
   ``server_lr``) runs once per value on the ``tuning`` seed (not a table seed), on every
   pattern (``tuning.pattern: each``) or on one pattern whose choice serves all, for
   ``tuning.rounds`` rounds, into ``--out/tune/<pattern>/<method>/<key>-<value>/``. The value with
   the best headline metric (mean test accuracy over the last ``last_rounds`` rounds) is chosen.
2. **Table.** Every (pattern × method × seed) with the chosen values, into
   ``--out/<pattern>/<method>/seed-<s>/``; each run directory also gets
   ``participation.safetensors`` (``p: (N,)`` the true p_n, ``rate: (N,)`` the long-run
   availability rate, which for ``cyclic`` is ``A_n / (A_n + B_n)``, not exactly p_n).

Then it writes ``results.json`` into ``--out`` (config, tuning scores and chosen values, per-seed
numbers and curves, wall times), the claim table between ``<!-- fedau:claims -->`` markers and the
tables between ``<!-- fedau:results -->`` markers in ``--docs`` (default ``docs/fedau.md``;
``--quick`` writes no docs unless ``--docs`` is given) and the figures ``fedau_convergence.png``
(test accuracy per round, one panel per pattern, mean ± std over seeds) and ``fedau_weights.png``
(the final FedAU weights ω_n of the first seed against 1/rate_n) into ``--figures``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fedagg.errors import ConfigError
from simulations.experiments import grid, study
from simulations.experiments import tuning as tuning_lib

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "fedau_mnist1d.yaml"
MARK = "fedau:results"
CLAIMS_MARK = "fedau:claims"
#: Keys a method's ``tune`` grid may name.
TUNABLE = tuning_lib.TUNABLE
#: The plateau check compares the headline with the same window this many rounds earlier.
PLATEAU_GAP = 500
#: "Within a couple of points" of the known-p oracle, in accuracy points.
ORACLE_POINTS = 2.0


# ------------------------------------------------------------------------------ config
def load_experiment(path: str | Path = DEFAULT_CONFIG, quick: bool = False) -> dict[str, Any]:
    """The experiment mapping (``seeds``, ``base``, ``patterns``, ``methods``, optional
    ``tuning`` and ``last_rounds``), checked; ``quick`` applies the ``quick`` section (its
    ``base`` merges into ``base``, other keys replace). ``last_rounds`` defaults to 1 (the final
    accuracy); ``tuning`` gets ``rounds`` (default: the table's) and ``pattern`` (default ``each``).
    """
    exp = grid.load_grid(path, ("seeds", "base", "patterns", "methods"),
                         ("tuning", "last_rounds"), quick=quick)
    if not exp["seeds"] or not exp["patterns"] or not exp["methods"]:
        raise ConfigError("seeds", "need at least one seed, pattern and method")
    last = exp.setdefault("last_rounds", 1)
    if not isinstance(last, int) or isinstance(last, bool) or last < 1:
        raise ConfigError("last_rounds", f"must be an integer >= 1 (got {last!r})")
    exp["methods"] = {m: dict(over or {}) for m, over in exp["methods"].items()}
    grids = {m: _check_tune(m, over) for m, over in exp["methods"].items() if "tune" in over}
    tuning_lib.check_pairing(exp, list(grids), "methods", "method",
                             lambda spec: _check_tuning(spec, exp), "seed, rounds, pattern")
    _check_last_rounds(exp)
    return exp


def _check_tune(method: str, over: Mapping[str, Any]) -> tuple[str, list[float]]:
    """``(key, values)`` of a method's ``tune`` grid (:func:`~simulations.experiments.tuning.check_tune`)."""
    return tuning_lib.check_tune(f"methods.{method}.tune", over, TUNABLE)


def _check_tuning(spec: Any, exp: Mapping[str, Any]) -> dict[str, Any]:
    """The ``tuning`` section with defaults filled in: ``seed`` (required, not a table seed),
    ``rounds`` (default the table's), ``pattern`` (``each`` or one pattern's name)."""
    if not isinstance(spec, Mapping):
        raise ConfigError("tuning", "a mapping with seed, rounds, pattern")
    extra = sorted(set(spec) - {"seed", "rounds", "pattern"})
    if extra:
        raise ConfigError(f"tuning.{extra[0]}", "unknown key; allowed: pattern, rounds, seed")
    seed = spec.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError("tuning.seed", f"required, an integer >= 0 (got {seed!r})")
    if seed in exp["seeds"]:
        raise ConfigError("tuning.seed", f"{seed} is also a table seed; tune on a seed the table "
                          "does not use")
    rounds = spec.get("rounds", exp["base"].get("rounds"))
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
        raise ConfigError("tuning.rounds", f"must be an integer >= 1 (got {rounds!r})")
    pattern = spec.get("pattern", "each")
    if pattern != "each" and pattern not in exp["patterns"]:
        raise ConfigError("tuning.pattern", f"{pattern!r}; allowed: each, "
                          + ", ".join(exp["patterns"]))
    return {"seed": seed, "rounds": rounds, "pattern": pattern}


def _check_last_rounds(exp: Mapping[str, Any]) -> None:
    """The headline averages the last ``last_rounds`` rounds: the table's and the tuning's runs
    must evaluate each of them (:func:`~simulations.experiments.tuning.check_last_rounds`)."""
    lengths = {"base.rounds": exp["base"].get("rounds", 20)}
    if exp.get("tuning"):
        lengths["tuning.rounds"] = exp["tuning"]["rounds"]
    tuning_lib.check_last_rounds(exp["last_rounds"], exp["base"], lengths)


def tune_grid(exp: Mapping[str, Any], method: str) -> tuple[str, list[float]] | None:
    """``(key, values)`` of the method's ``tune`` grid, or None."""
    over = exp["methods"][method]
    return _check_tune(method, over) if "tune" in over else None


@dataclasses.dataclass(frozen=True)
class Job(study.StudyJob):
    """One run: of the table (``value`` None) or of tuning (``value`` the tuned key's value)."""

    AXES = TUNE_AXES = ("pattern", "method")

    pattern: str
    method: str

    @property
    def keeps_failed(self) -> bool:
        """A run the runner stops counts as finished: a tuning value that diverged, or a table
        run that collapsed (reported as such, :func:`collect`)."""
        return True


#: The jobs and tuning of the (pattern × method) grid: a cell's run config is ``base`` ← method
#: ← the pattern (its keys under ``participation``) ← the tuned value.
GRID = study.MethodGrid(Job, "pattern", "patterns",
                        layer=lambda over: {"participation": over or {}})
make_tune_jobs = GRID.tune_jobs
make_jobs = GRID.table_jobs
collect_tuning = GRID.collect_tuning
chosen_values = GRID.chosen_values


# ------------------------------------------------------------------------------ running
def availability_rate(process: Any, p: np.ndarray) -> np.ndarray:
    """Long-run fraction of rounds each client is available: ``(N,)``."""
    if process is not None and getattr(process, "name", "") == "cyclic":
        a = np.asarray(process.active_len, dtype=np.float64)
        return a / (a + np.asarray(process.inactive_len, dtype=np.float64))
    return np.asarray(p, dtype=np.float64)


def _save_participation(sim: Any, job: Job) -> None:
    """``participation.safetensors`` of the run: the true p_n and the availability rate."""
    from simulations.core.results import save_arrays

    p = np.asarray(sim.probabilities, dtype=np.float64)
    save_arrays(job.run_dir / "participation.safetensors",
                {"p": p, "rate": availability_rate(sim.participation, p)})


def run_job(job: Job, fresh: bool = False) -> dict[str, Any]:
    """Run (or reuse) one simulation; return its summary (plus ``reused``). A run that the runner
    stops (a learning rate that diverges until every update of a round is rejected) is kept as
    ``failed.json``: a tuning value that failed, or a table run that collapsed."""
    return grid.run_simulation(job, fresh, setup=_save_participation, keep_failed=job.keeps_failed)


def _quiet_worker() -> None:
    """Pool worker set-up: one BLAS/OpenMP thread per run (runs are the parallelism), quiet logs."""
    grid.init_worker(("OMP_NUM_THREADS", "MKL_NUM_THREADS"))


def run_all(jobs: Sequence[Job], workers: int = 2, fresh: bool = False,
            echo: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Run ``jobs`` (``workers`` at a time; finished runs with another config are redone);
    ``{job.name: summary}``."""
    return study.run_jobs(jobs, run_job, _quiet_worker, workers, fresh, echo)


# ------------------------------------------------------------------------------ results
late_mean = tuning_lib.late_mean


diverged = tuning_lib.diverged
collapsed = tuning_lib.collapsed


def mean_participants(run_dir: Path) -> float:
    rows = grid.train_rows(run_dir)
    return float(np.mean([float(r["clients"]) for r in rows])) if rows else float("nan")


def collect(exp: Mapping[str, Any], jobs: Sequence[Job]) -> dict[str, Any]:
    """Per (pattern, method): per-seed headline (mean over the last ``last_rounds`` rounds),
    final accuracy, the same window ``PLATEAU_GAP`` rounds earlier, whether the run collapsed
    (:func:`collapsed`), curves; JSON-ready. Only complete cells (every seed finished) are
    reported; :func:`missing_cells` names the others.

    A run the runner stopped (``failed.json``: every update of a round rejected) collapsed; its
    model stays as it was (every later update would be rejected too), so its headline, final
    and earlier values are its last evaluated accuracy, ``stopped`` is its last round, and its
    curve is extended flat at that accuracy over the table's evaluation rounds."""
    last = exp["last_rounds"]
    out: dict[str, Any] = {}
    for job in study.complete(jobs):
        rounds, acc = grid.run_curve(job.run_dir)
        summary = grid.read_summary(job.run_dir, failed=True)
        stopped = int(summary["last_round"]) if "error" in summary else None
        if stopped is not None:
            rounds, acc = grid.stopped_curve(rounds, acc, job.config)
        cell = out.setdefault(job.pattern, {}).setdefault(
            job.method, {"seeds": [], "headline": [], "final": [], "earlier": [],
                         "collapsed": [], "stopped": [], "wall_seconds": [], "participants": [],
                         "rounds": rounds.tolist(), "curves": []})
        cell["seeds"].append(job.seed)
        head = late_mean(rounds, acc, last)
        cell["headline"].append(head)
        cell["final"].append(float(acc[-1]))
        cell["earlier"].append(late_mean(rounds, acc, last, float(rounds[-1]) - PLATEAU_GAP))
        cell["collapsed"].append(stopped is not None or collapsed(acc, head, job.run_dir))
        cell["stopped"].append(stopped)
        cell["wall_seconds"].append(float(summary["wall_seconds"]))
        cell["participants"].append(mean_participants(job.run_dir))
        cell["curves"].append(acc.tolist())
    return out


missing_cells = study.missing_cells


def paired_gap(results: Mapping[str, Any], pattern: str, a: str, b: str) -> np.ndarray | None:
    """Per-seed ``headline(a) − headline(b)`` in points over the seeds both ran, or None."""
    cells = results.get(pattern, {})
    if a not in cells or b not in cells:
        return None
    ha = dict(zip(cells[a]["seeds"], cells[a]["headline"], strict=True))
    hb = dict(zip(cells[b]["seeds"], cells[b]["headline"], strict=True))
    common = sorted(set(ha) & set(hb))
    return 100 * np.array([ha[s] - hb[s] for s in common]) if common else None


def _stopped_at(results: Mapping[str, Any], pattern: str, method: str) -> list[int | None]:
    """For each collapsed seed of :func:`collapsed_seeds`, the round its run was stopped at
    (None: it ran the whole length)."""
    cell = results.get(pattern, {}).get(method)
    if cell is None:
        return []
    stops = cell.get("stopped", [None] * len(cell["seeds"]))
    return [r for r, d in zip(stops, cell.get("collapsed", []), strict=False) if d]


def collapsed_seeds(results: Mapping[str, Any], pattern: str, method: str) -> list[int]:
    """The seeds whose run of ``method`` on ``pattern`` collapsed (:func:`collapsed`)."""
    cell = results.get(pattern, {}).get(method)
    if cell is None:
        return []
    return [s for s, d in zip(cell["seeds"], cell.get("collapsed", []), strict=False) if d]


def _per_seed_text(results: Mapping[str, Any], pattern: str, a: str, b: str) -> str:
    """Each seed's ``a − b`` gap (points), ``(collapsed)`` after a seed where either run
    collapsed."""
    g = paired_gap(results, pattern, a, b)
    if g is None:
        return "–"
    cells = results[pattern]
    common = sorted(set(cells[a]["seeds"]) & set(cells[b]["seeds"]))
    gone = set(collapsed_seeds(results, pattern, a)) | set(collapsed_seeds(results, pattern, b))
    return ", ".join(f"{x:+.1f}" + (" (collapsed)" if s in gone else "")
                     for s, x in zip(common, g, strict=True))


def claims(results: Mapping[str, Any], patterns: Sequence[str],
           baselines: Sequence[str] = ("fedavg-participating", "fedavg-all"),
           ) -> list[tuple[str, str, str]]:
    """The claim table's rows ``(claim, our number, verdict)``. Gaps are per-seed paired
    differences of the headline, mean ± std (ddof 1) over seeds, in points. Verdicts: "FedAU
    above" each of ``baselines`` holds when the mean gap is positive in every pattern ("every
    seed" when no seed's gap is ≤ 0), and is "not shown" when in some pattern a seed's gap is
    ≤ 0 and the positive mean gap is smaller than its std over seeds (pairs whose baseline run collapsed are counted in the
    verdict); the oracle claim holds when ``known-p − fedau`` ≤ ``ORACLE_POINTS`` in every
    pattern; MIFA/FedVarp "may be higher" is reported, not judged."""
    rows = []

    def per_pattern(a: str, b: str) -> tuple[str, dict[str, np.ndarray]]:
        gaps = {p: g for p in patterns if (g := paired_gap(results, p, a, b)) is not None}
        return ", ".join(f"{p} {tuning_lib.gap_text(g)}" for p, g in gaps.items()), gaps

    for base in baselines:
        text, gaps = per_pattern("fedau", base)
        if not gaps:
            continue
        below = [p for p, g in gaps.items() if g.mean() <= 0]
        if below:
            verdict = f"**no** (not above in {', '.join(below)})"
        elif all((g > 0).all() for g in gaps.values()):
            verdict = "**holds** (every pattern, every seed)"
        else:
            worse = sum(int((g <= 0).sum()) for g in gaps.values())
            n = sum(g.size for g in gaps.values())
            noisy = [p for p, g in gaps.items()
                     if (g <= 0).any() and g.size > 1 and g.mean() < g.std(ddof=1)]
            verdict = (f"**not shown**: above on average, but within seed noise in "
                       f"{', '.join(noisy)} (mean gap below its std over seeds; below in {worse} "
                       f"of {n} seed-pattern pairs)" if noisy else
                       f"**holds** on average (below in {worse} of {n} seed-pattern pairs)")
        div = sum(len(collapsed_seeds(results, p, base)) for p in gaps)
        if div:
            n = sum(g.size for g in gaps.values())
            verdict += f"; in {div} of the {n} pairs the `{base}` run collapsed"
        rows.append((f"FedAU above `{base}` in every pattern", f"FedAU − {base}: {text}",
                     verdict))
    text, gaps = per_pattern("known-p", "fedau")
    if gaps:
        far = [p for p, g in gaps.items() if g.mean() > ORACLE_POINTS]
        verdict = (f"**no** (more than {ORACLE_POINTS:g} points below in {', '.join(far)})" if far
                   else f"**holds** (≤ {ORACLE_POINTS:g} points below in every pattern)")
        rows.append(("FedAU within a couple of points of the `known-p` oracle",
                     f"known-p − FedAU: {text}", verdict))
    for other in ("mifa", "fedvarp"):
        text, gaps = per_pattern(other, "fedau")
        if gaps:
            higher = [p for p, g in gaps.items() if g.mean() > 0]
            rows.append((f"`{other}` (O(N·d) memory) may be higher than FedAU",
                         f"{other} − FedAU: {text}",
                         f"higher in {len(higher)} of {len(gaps)} patterns (not a claim to test)"))
    return rows


def baseline_methods(exp: Mapping[str, Any]) -> list[str]:
    """The methods (config order) that run ``fedavg-participating`` or ``fedavg-all``: the
    baselines FedAU is claimed to beat."""
    return [m for m, over in exp["methods"].items()
            if over.get("strategy") in ("fedavg-participating", "fedavg-all")]


def claims_report(exp: Mapping[str, Any], results: Mapping[str, Any],
                  missing: Sequence[str] = ()) -> str:
    """The claim table written at the top of the docs page (``missing``: unfinished cells)."""
    any_cell = next(iter(next(iter(results.values())).values()))
    lines = [] if not missing else [
        f"**The grid is not finished**: {len(missing)} cells are missing ({', '.join(missing)}). "
        "The verdicts below cover only the finished cells; \"every pattern\" means every "
        "pattern with a finished pair.", ""]
    lines += [
        f"Our numbers: mean test accuracy over the last {exp['last_rounds']} rounds, per-seed "
        f"paired differences in points, mean ± std (ddof 1) over {len(any_cell['seeds'])} seeds "
        f"({', '.join(str(s) for s in any_cell['seeds'])}), {exp['base']['rounds']} rounds.",
        "",
        "| paper's claim | our number (points) | verdict |",
        "|---|---|---|",
        *(f"| {c} | {n} | {v} |" for c, n, v in claims(results, list(exp["patterns"]),
                                                          baseline_methods(exp))),
    ]
    return "\n".join(lines)


def tuning_table(exp: Mapping[str, Any], tuning: Mapping[str, Any]) -> str:
    """Markdown: per method and pattern the chosen value and the score of each value tried
    (:func:`~simulations.experiments.tuning.tuning_table`)."""
    return tuning_lib.tuning_table(list(exp["methods"]), tuning)


def report(exp: Mapping[str, Any], results: Mapping[str, Any], tuning: Mapping[str, Any],
           walls: Mapping[str, float], missing: Sequence[str] = ()) -> str:
    """The markdown section written into the docs page (after the claims)."""
    methods = list(exp["methods"])
    b = exp["base"]
    last = exp["last_rounds"]
    any_cell = next(iter(next(iter(results.values())).values()))
    n_seeds = len(any_cell["seeds"])
    parts = {pat: np.mean([np.mean(c["participants"]) for c in cells.values()])
             for pat, cells in results.items()}
    rounds = b["rounds"]
    lines = [
        f"Setting: MNIST-1D ({b.get('dataset_args', {}).get('num_samples', 5000)} samples), "
        f"N = {b['num_clients']} clients, Dirichlet(α = {b.get('alpha')}) labels, model "
        f"`{b.get('model')}`, {rounds} rounds, {b.get('local_steps')} local SGD steps "
        f"(batch {b.get('batch_size')}), heterogeneous p_n (mean "
        f"{b['participation']['probabilities'].get('mean')}, floor "
        f"{b['participation']['probabilities'].get('floor')}), {n_seeds} seeds "
        f"({', '.join(str(s) for s in any_cell['seeds'])}); mean participants per round: "
        + ", ".join(f"{p} {v:.1f}" for p, v in parts.items()) + ".",
        "",
        f"**Test accuracy (%)**, mean over the last {last} rounds (evaluated every round there), "
        "mean ± std (ddof 1) over seeds, best mean per column in bold:",
        "",
        grid.method_table(results, methods, "headline"),
        "",
        *([f"Not finished (left out of every table): {', '.join(missing)}.", ""]
          if missing else []),
        "**FedAU against the baselines**: per-seed paired differences of the numbers above "
        "(points), mean ± std over seeds; then each seed's difference (seeds "
        f"{', '.join(str(s) for s in any_cell['seeds'])}):",
        "",
    ]
    pairs = [("fedau", b) for b in baseline_methods(exp)] + [("fedau", "known-p")] + [
        ("fedau-k50", b) for b in baseline_methods(exp)[:1]]
    pairs = [(a, b) for a, b in pairs if a in methods and b in methods]
    lines += ["| pattern | " + " | ".join(f"{a} − {b}" for a, b in pairs) + " |",
              "|---|" + "---:|" * len(pairs)]
    for p in results:
        lines.append(f"| {p} | " + " | ".join(tuning_lib.gap_text(paired_gap(results, p, a, b))
                                              for a, b in pairs) + " |")
    lines += ["", "| pattern | " + " | ".join(f"{a} − {b}, per seed" for a, b in pairs) + " |",
              "|---|" + "---|" * len(pairs)]
    for p in results:
        lines.append(f"| {p} | " + " | ".join(_per_seed_text(results, p, a, b)
                                              for a, b in pairs) + " |")
    gone = [f"{p}/{m} seed {s}" + (f" (stopped at round {r})" if r is not None else "")
            for p in results for m in methods
            for s, r in zip(collapsed_seeds(results, p, m), _stopped_at(results, p, m), strict=True)]
    lines += ["", "Collapsed runs (the headline below half of the run's best accuracy, a "
              "non-finite final model, or a run the runner stopped because every update of a "
              "round was rejected; a stopped run counts with the accuracy of the model it stopped "
              "with, tested at that round, and its curve stays flat from there): "
              + (", ".join(gone) if gone else "none") + "."]
    e0 = rounds - PLATEAU_GAP
    lines += [] if e0 < last else [
        "",
        f"**Plateau check**: the headline minus the mean over rounds {e0 - last + 1}–{e0} "
        f"(evaluated every {b.get('eval_every', 1)} rounds there), mean over seeds, points; "
        "small numbers mean the run has levelled off:",
        "",
        "| method | " + " | ".join(results) + " |",
        "|---|" + "---:|" * len(results),
    ]
    for m in methods:
        cells = []
        for p in results:
            c = results[p].get(m)
            cells.append("–" if c is None else
                         f"{100 * np.mean(np.subtract(c['headline'], c['earlier'])):+.1f}")
        if e0 >= last:
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if tuning:
        t = exp["tuning"]
        where = ("each pattern separately" if t["pattern"] == "each"
                 else f"`{t['pattern']}` only, the choice used for every pattern")
        lines += [
            "",
            f"**Tuned learning rates**, chosen by the same metric on seed {t['seed']} (not a "
            f"table seed), {t['rounds']} rounds, on {where}; the score of each value tried in "
            "parentheses (%), † = the choice is at the edge of the grid:",
            "",
            tuning_table(exp, tuning),
        ]
    runs = sum(len(c["seeds"]) for cells in results.values() for c in cells.values())
    lines += [
        "",
        f"Compute: {runs} table runs, {walls.get('table_runs', 0) / 60:.0f} min summed run time; "
        f"{walls.get('tuning_count', 0):.0f} tuning runs, "
        f"{walls.get('tuning_runs', 0) / 60:.0f} min summed run time"
        + (f"; this invocation took {walls['invocation'] / 60:.0f} min wall clock"
           if walls.get("invocation") else "")
        + ". Raw numbers: `results.json` in the output directory.",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ figures
def plot_convergence(results: Mapping[str, Any], methods: Sequence[str], path: Path) -> None:
    """One panel per pattern: test accuracy vs round, mean ± std over seeds per method."""
    plt = grid.pyplot()
    pats = list(results)
    fig, axes = plt.subplots(1, len(pats), figsize=(4.6 * len(pats), 3.8), dpi=150, sharey=True,
                             squeeze=False)
    styles = {"fedau": ("C0", "-"), "fedau-k50": ("C0", "--"), "known-p": ("k", ":")}
    for ax, pat in zip(axes[0], pats, strict=True):
        for i, m in enumerate(methods):
            if m not in results[pat]:
                continue
            cell = results[pat][m]
            x = np.asarray(cell["rounds"])
            ys = np.asarray(cell["curves"]) * 100
            color, ls = styles.get(m, (f"C{i % 10 + 1 if i % 10 + 1 != 10 else 9}", "-"))
            mean = ys.mean(axis=0)
            std = ys.std(axis=0, ddof=1) if len(ys) > 1 else np.zeros_like(mean)
            ax.plot(x, mean, color=color, linestyle=ls, linewidth=1.6, label=m)
            if len(ys) > 1:
                ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.12, linewidth=0)
        ax.set_title(f"{pat} availability")
        ax.set_xlabel("round")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("server test accuracy (%)")
    axes[0][-1].legend(frameon=False, fontsize=7, loc="lower right")
    fig.tight_layout()
    grid.save_png(fig, path)
    plt.close(fig)


def fedau_weights(run_dir: Path) -> np.ndarray:
    """Final FedAU weights ``ω_n: (N,)`` of a finished ``fedau`` run."""
    from simulations.core.results import load_arrays

    return np.asarray(load_arrays(run_dir / "strategy_state.safetensors")["fedau.weights"])


def plot_weights(exp: Mapping[str, Any], out: Path, path: Path,
                 methods: Sequence[str] = ("fedau", "fedau-k50")) -> bool:
    """ω_n (seed ``seeds[0]``) against 1/rate_n, one panel per pattern; False if no run to read."""
    from simulations.core.results import load_arrays

    plt = grid.pyplot()
    seed = exp["seeds"][0]
    pats = list(exp["patterns"])
    fig, axes = plt.subplots(1, len(pats), figsize=(4.3 * len(pats), 4.0), dpi=150, squeeze=False)
    drawn = False
    for ax, pat in zip(axes[0], pats, strict=True):
        lim = [1.0, 1.0]
        for m, marker, color in zip(methods, ("o", "x"), ("C0", "C3"), strict=False):
            run = out / pat / m / f"seed-{seed}"
            if not (run / "strategy_state.safetensors").is_file():
                continue
            part = load_arrays(run / "participation.safetensors")
            inv = 1.0 / part["rate"]
            w = fedau_weights(run)
            cutoff = exp["methods"][m].get("strategy_args", {}).get("cutoff")
            label = f"{m} (K = {cutoff if cutoff else '∞'})"
            ax.scatter(inv, w, s=14, marker=marker, color=color, alpha=0.7, label=label,
                       linewidths=1)
            lim = [min(lim[0], inv.min(), w.min()), max(lim[1], inv.max(), w.max())]
            drawn = True
            if cutoff and pat == "bernoulli":
                r = np.sort(part["rate"])
                ax.plot(1 / r, (1 - (1 - r) ** cutoff) / r, color=color, linewidth=1,
                        label=f"E[min(G, {cutoff})] (Bernoulli)")
        ax.plot(lim, lim, color="k", linewidth=0.8, linestyle=":", label="ω = 1/rate")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("1 / availability rate (1/p_n; cyclic: cycle / on-rounds)")
        ax.set_title(f"{pat} (seed {seed}, after round {exp['base']['rounds']})")
        ax.grid(True, which="both", alpha=0.25)
    axes[0][0].set_ylabel("FedAU weight ω_n")
    axes[0][0].legend(frameon=False, fontsize=7, loc="upper left")
    fig.tight_layout()
    if drawn:
        grid.save_png(fig, path)
    plt.close(fig)
    return drawn


def weight_stats(exp: Mapping[str, Any], out: Path) -> dict[str, Any]:
    """Per pattern and FedAU variant (seed 0): median |log(ω_n · rate_n)| and the correlation of
    log ω_n with log(1/rate_n) over the clients that completed at least one interval."""
    from simulations.core.results import load_arrays

    seed = exp["seeds"][0]
    stats: dict[str, Any] = {}
    for pat in exp["patterns"]:
        for m in ("fedau", "fedau-k50"):
            run = out / pat / m / f"seed-{seed}"
            if m not in exp["methods"] or not (run / "strategy_state.safetensors").is_file():
                continue
            st = load_arrays(run / "strategy_state.safetensors")
            rate = load_arrays(run / "participation.safetensors")["rate"]
            w = st["fedau.weights"]
            seen = st["fedau.interval_count"] > 0
            lw, lr = np.log(w[seen]), np.log(1 / rate[seen])
            stats.setdefault(pat, {})[m] = {
                "clients_with_interval": int(seen.sum()),
                "median_abs_log_ratio": float(np.median(np.abs(lw - lr))),
                "corr_log": float(np.corrcoef(lw, lr)[0, 1]) if seen.sum() > 2 else float("nan"),
            }
    return stats


# ------------------------------------------------------------------------------ CLI
def _report(run: study.Run) -> int:
    """results.json, the claims and the tables (printed and in the docs page), the figures and
    the FedAU weight statistics."""
    exp, results = run.exp, run.results
    walls = run.walls()
    stats = weight_stats(exp, run.out)
    missing = missing_cells(run.jobs)
    study.write_results(run, walls, missing, weights=stats)
    text = report(exp, results, run.tuning, walls, missing)
    head = claims_report(exp, results, missing)
    study.publish(run, head, text, (CLAIMS_MARK, MARK), {
        "fedau_convergence.png": lambda path: plot_convergence(results, list(exp["methods"]), path),
        "fedau_weights.png": lambda path: plot_weights(exp, run.out, path)})
    run.echo(yaml.safe_dump({"weights": stats}, sort_keys=False))
    return 0


STUDY = GRID.study("fedau", __doc__, DEFAULT_CONFIG, "runs/fedau_mnist1d",
                   load_experiment=load_experiment, run_all=run_all, collect=collect,
                   report=_report)
#: ``python -m`` entry point (:func:`~simulations.experiments.study.run_study`).
main = STUDY.main


if __name__ == "__main__":
    raise SystemExit(main())
