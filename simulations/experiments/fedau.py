"""``python -m simulations.experiments.fedau``: the FedAU experiment of docs/fedau.md.

    nice -n 10 python -m simulations.experiments.fedau            # the full grid (5 seeds)
    python -m simulations.experiments.fedau --quick               # smoke run: 1 seed, 20 rounds

Runs every (availability pattern × method × seed) of ``simulations/configs/fedau_mnist1d.yaml``
with the inline engine, ``--workers`` runs at a time (process pool, default 2), into
``--out/<pattern>/<method>/seed-<s>/`` (default ``runs/fedau_mnist1d``; ``--quick`` uses
``runs/fedau_mnist1d_quick``). Each run directory also gets ``participation.safetensors``
(``p: (N,)`` the true p_n, ``rate: (N,)`` the long-run availability rate of the pattern, which for
``cyclic`` is ``A_n / (A_n + B_n)``, not exactly p_n). Finished runs are reused (``--fresh`` redoes
them; ``--report-only`` runs nothing).

Then it writes ``results.json`` into ``--out``, the tables between ``<!-- fedau:results -->`` and
``<!-- /fedau:results -->`` in ``--docs`` (default ``docs/fedau.md``; ``--quick`` writes no docs
unless ``--docs`` is given) and the figures ``fedau_convergence.png`` (test accuracy per round, one
panel per pattern, mean ± std over seeds) and ``fedau_weights.png`` (the final FedAU weights ω_n of
seed 0 against 1/rate_n, read from ``strategy_state.safetensors``) into ``--figures``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fedagg.errors import ConfigError
from simulations.experiments import grid

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "fedau_mnist1d.yaml"
MARK = "fedau:results"
#: How many of the last evaluations the "late average" column averages.
LAST_EVALS = 5


# ------------------------------------------------------------------------------ config
def load_experiment(path: str | Path = DEFAULT_CONFIG, quick: bool = False) -> dict[str, Any]:
    """The experiment mapping (``seeds``, ``base``, ``patterns``, ``methods``); ``quick`` applies
    the ``quick`` section (its ``base`` merges into ``base``, other keys replace)."""
    exp = grid.load_grid(path, ("seeds", "base", "patterns", "methods"), quick=quick)
    if not exp["seeds"] or not exp["patterns"] or not exp["methods"]:
        raise ConfigError("seeds", "need at least one seed, pattern and method")
    return exp


@dataclasses.dataclass(frozen=True)
class Job(grid.GridJob):
    """One run of the grid."""

    pattern: str
    method: str
    seed: int
    config: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.pattern}/{self.method}/seed-{self.seed}"


def make_jobs(exp: Mapping[str, Any], out: Path) -> list[Job]:
    """Every (pattern, method, seed), validated up front (a ConfigError names the cell)."""
    jobs = []
    for pattern, part in exp["patterns"].items():
        for method, over in exp["methods"].items():
            for seed in exp["seeds"]:
                data = grid.merge(exp["base"], over or {})
                data["participation"] = grid.merge(data.get("participation", {}), part or {})
                data.update(seed=int(seed), out=str(out / pattern / method / f"seed-{seed}"))
                grid.validate_cell(data, f"{pattern}.{method}")
                jobs.append(Job(pattern, method, int(seed), data))
    return jobs


# ------------------------------------------------------------------------------ running
def availability_rate(process: Any, p: np.ndarray) -> np.ndarray:
    """Long-run fraction of rounds each client is available: ``(N,)``."""
    if process is not None and getattr(process, "name", "") == "cyclic":
        a = np.asarray(process.active_len, dtype=np.float64)
        return a / (a + np.asarray(process.inactive_len, dtype=np.float64))
    return np.asarray(p, dtype=np.float64)


def _save_participation(sim: Any, job: Job) -> None:
    """``participation.safetensors`` of the run: the true p_n and the availability rate."""
    from simulations.results import save_arrays

    p = np.asarray(sim.probabilities, dtype=np.float64)
    save_arrays(job.run_dir / "participation.safetensors",
                {"p": p, "rate": availability_rate(sim.participation, p)})


def run_job(job: Job, fresh: bool = False) -> dict[str, Any]:
    """Run (or reuse) one simulation; return its summary (plus ``reused``)."""
    return grid.run_simulation(job, fresh, setup=_save_participation)


def _quiet_worker() -> None:
    """Pool worker set-up: one BLAS/OpenMP thread per run (runs are the parallelism), quiet logs."""
    grid.init_worker(("OMP_NUM_THREADS", "MKL_NUM_THREADS"))


def run_all(jobs: Sequence[Job], workers: int = 2, fresh: bool = False,
            echo: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Run ``jobs`` (``workers`` at a time); ``{job.name: summary}``."""
    return grid.run_all(jobs, run_job, initializer=_quiet_worker, workers=workers, fresh=fresh,
                        echo=echo)


# ------------------------------------------------------------------------------ results
def mean_participants(run_dir: Path) -> float:
    rows = grid.train_rows(run_dir)
    return float(np.mean([float(r["clients"]) for r in rows])) if rows else float("nan")


def collect(jobs: Sequence[Job]) -> dict[str, Any]:
    """Per (pattern, method): per-seed final accuracy, late average, curves; JSON-ready."""
    out: dict[str, Any] = {}
    for job in jobs:
        if not grid.finished(job.run_dir):
            continue
        rounds, acc = grid.run_curve(job.run_dir)
        summary = grid.read_summary(job.run_dir)
        cell = out.setdefault(job.pattern, {}).setdefault(
            job.method, {"seeds": [], "final": [], "late": [], "wall_seconds": [],
                         "participants": [], "rounds": rounds.tolist(), "curves": []})
        cell["seeds"].append(job.seed)
        cell["final"].append(float(acc[-1]))
        cell["late"].append(float(np.mean(acc[-LAST_EVALS:])))
        cell["wall_seconds"].append(float(summary["wall_seconds"]))
        cell["participants"].append(mean_participants(job.run_dir))
        cell["curves"].append(acc.tolist())
    return out


def report(exp: Mapping[str, Any], results: Mapping[str, Any], wall: float | None) -> str:
    """The markdown section written into the docs page."""
    methods = list(exp["methods"])
    b = exp["base"]
    any_cell = next(iter(next(iter(results.values())).values()))
    n_seeds = len(any_cell["seeds"])
    parts = {pat: np.mean([np.mean(c["participants"]) for c in cells.values()])
             for pat, cells in results.items()}
    runs = sum(len(c["seeds"]) for cells in results.values() for c in cells.values())
    run_wall = sum(sum(c["wall_seconds"]) for cells in results.values() for c in cells.values())
    lines = [
        f"Setting: MNIST-1D ({b.get('dataset_args', {}).get('num_samples', 5000)} samples), "
        f"N = {b['num_clients']} clients, Dirichlet(α = {b.get('alpha')}) labels, model "
        f"`{b.get('model')}`, {b['rounds']} rounds, {b.get('local_steps')} local SGD steps "
        f"(batch {b.get('batch_size')}, lr {b.get('lr')}), heterogeneous p_n (mean "
        f"{b['participation']['probabilities'].get('mean')}, floor "
        f"{b['participation']['probabilities'].get('floor')}), {n_seeds} seeds "
        f"({', '.join(str(s) for s in any_cell['seeds'])}); mean participants per round: "
        + ", ".join(f"{p} {v:.1f}" for p, v in parts.items()) + ".",
        "",
        f"**Final test accuracy (%)** after round {b['rounds']}, mean ± std over seeds "
        "(best mean per column in bold):",
        "",
        grid.method_table(results, methods, "final"),
        "",
        f"**Late average (%)**: mean test accuracy over the last {LAST_EVALS} evaluations "
        f"(every {b.get('eval_every', 1)} rounds), mean ± std over seeds — less noisy than one "
        "evaluation:",
        "",
        grid.method_table(results, methods, "late"),
        "",
        f"{runs} runs; the sum of their wall-clock times is {run_wall / 60:.0f} min"
        + (f" ({wall / 60:.0f} min wall clock for this invocation)" if wall else "")
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
            mean, std = ys.mean(axis=0), ys.std(axis=0)
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
    from simulations.results import load_arrays

    return np.asarray(load_arrays(run_dir / "strategy_state.safetensors")["fedau.weights"])


def plot_weights(exp: Mapping[str, Any], out: Path, path: Path,
                 methods: Sequence[str] = ("fedau", "fedau-k50")) -> bool:
    """ω_n (seed ``seeds[0]``) against 1/rate_n, one panel per pattern; False if no run to read."""
    from simulations.results import load_arrays

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
    from simulations.results import load_arrays

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
def main(argv: Sequence[str] | None = None) -> int:
    parser = grid.grid_parser(
        "simulations.experiments.fedau", __doc__, DEFAULT_CONFIG,
        docs_help="docs page to update (default docs/fedau.md; none with --quick)",
        figures_help="figure folder (default docs/figures; --out with --quick)")
    args = parser.parse_args(argv)
    try:
        exp = load_experiment(args.config, quick=args.quick)
        out, docs, figures = grid.output_paths(args, "runs/fedau_mnist1d", Path("docs/fedau.md"),
                                               Path("docs/figures"))
        jobs = make_jobs(exp, out)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    if not args.report_only:
        print(f"{len(jobs)} runs ({len(exp['patterns'])} patterns × {len(exp['methods'])} methods "
              f"× {len(exp['seeds'])} seeds) → {out}", flush=True)
        run_all(jobs, workers=args.workers, fresh=args.fresh,
                echo=lambda s: print(s, flush=True))
    wall = time.perf_counter() - t0 if not args.report_only else None
    results = collect(jobs)
    if not results:
        print("error: no finished runs to report", file=sys.stderr)
        return 1
    stats = weight_stats(exp, out)
    from simulations.results import atomic_write_text

    atomic_write_text(out / "results.json", json.dumps(
        {"config": exp, "results": results, "weights": stats}, indent=1))
    text = report(exp, results, wall)
    print(text)
    figures.mkdir(parents=True, exist_ok=True)
    plot_convergence(results, list(exp["methods"]), figures / "fedau_convergence.png")
    plot_weights(exp, out, figures / "fedau_weights.png")
    if docs is not None:
        grid.write_section(docs, text, MARK)
        print(f"wrote {docs}")
    print(f"figures in {figures}; results in {out / 'results.json'}")
    print(yaml.safe_dump({"weights": stats}, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
