"""``python -m simulations.experiments.fedins``: the FedIns experiment of docs/fedins.md.

    nice -n 10 python -m simulations.experiments.fedins            # the grid (3 seeds)
    nice -n 10 python -m simulations.experiments.fedins --sweep    # the learning-rate check
    python -m simulations.experiments.fedins --quick               # smoke run (quick backbone)

Runs every (heterogeneity level × method × seed) of ``simulations/configs/fedins_mnist1d.yaml``
with the inline engine, ``--workers`` runs at a time (process pool, default 2), into
``--out/<level>/<method>/seed-<s>/`` (default ``runs/fedins_mnist1d``). Finished runs are reused
(``--fresh`` redoes them; ``--report-only`` runs nothing). The backbone is loaded (pretrained and
cached if missing) once before the pool starts.

Then every run is re-evaluated offline per instance (:func:`simulations.evaluate.evaluate_run`:
per-domain accuracy, FedIns slot selection), ``results.json`` goes into ``--out``, the tables go
between ``<!-- fedins:results -->`` and ``<!-- /fedins:results -->`` of ``--docs`` (default
``docs/fedins.md``; none with ``--quick`` unless given) and the figures ``fedins_accuracy.png``
(accuracy vs domains per client, mean ± std over seeds) and ``fedins_slots.png`` (which slots each
domain selects) into ``--figures``.

``--sweep`` runs the config's ``sweep`` section instead (each method at each learning rate, one
seed outside ``seeds``, one level) and writes its table between ``<!-- fedins:sweep -->`` markers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedagg.errors import ConfigError
from simulations.experiments import grid

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "fedins_mnist1d.yaml"
MARK = "fedins:results"
SWEEP_MARK = "fedins:sweep"
SECTIONS = ("seeds", "base", "levels", "methods")


# ------------------------------------------------------------------------------ config
def load_experiment(path: str | Path = DEFAULT_CONFIG, quick: bool = False) -> dict[str, Any]:
    """The experiment mapping (``seeds``, ``base``, ``levels``, ``methods``, optional ``sweep``);
    ``quick`` applies the ``quick`` section (its ``base`` merges into ``base``, others replace)."""
    exp = grid.load_grid(path, SECTIONS, ("sweep",), quick=quick)
    if not exp["seeds"] or not exp["levels"] or not exp["methods"]:
        raise ConfigError("seeds", "need at least one seed, level and method")
    return exp


@dataclasses.dataclass(frozen=True)
class Job(grid.GridJob):
    """One run of the grid."""

    level: str
    method: str
    seed: int
    config: dict[str, Any]
    tag: str = ""

    @property
    def name(self) -> str:
        return f"{self.level}/{self.method}{self.tag}/seed-{self.seed}"


def _job(exp: Mapping[str, Any], level: str, method: str, seed: int, out: Path,
         extra: Mapping[str, Any] | None = None, tag: str = "") -> Job:
    if level not in exp["levels"]:
        raise ConfigError("sweep.level", f"unknown level {level!r}; allowed: {', '.join(exp['levels'])}")
    if method not in exp["methods"]:
        raise ConfigError("sweep.lr", f"unknown method {method!r}; allowed: {', '.join(exp['methods'])}")
    data = grid.merge(grid.merge(grid.merge(exp["base"], exp["methods"][method] or {}),
                                 exp["levels"][level] or {}), extra or {})
    data.update(seed=int(seed), out=str(out / level / f"{method}{tag}" / f"seed-{seed}"))
    grid.validate_cell(data, f"{level}.{method}")
    return Job(level, method, int(seed), data, tag)


def make_jobs(exp: Mapping[str, Any], out: Path) -> list[Job]:
    """Every (level, method, seed), validated up front (a ConfigError names the cell)."""
    return [_job(exp, level, method, s, out)
            for level in exp["levels"] for method in exp["methods"] for s in exp["seeds"]]


def make_sweep_jobs(exp: Mapping[str, Any], out: Path) -> list[Job]:
    """The ``sweep`` section: every (method, lr) at ``sweep.level`` with seed ``sweep.seed``."""
    sw = exp.get("sweep")
    if not sw:
        raise ConfigError("sweep", "the config has no sweep section")
    jobs = []
    for method, lrs in sw["lr"].items():
        for lr in lrs:
            jobs.append(_job(exp, sw["level"], method, int(sw["seed"]), out / "sweep",
                             {"lr": float(lr), **(sw.get("base") or {})}, tag=f"-lr{lr:g}"))
    return jobs


# ------------------------------------------------------------------------------ running
def run_job(job: Job, fresh: bool = False) -> dict[str, Any]:
    """Run (or reuse) one simulation; return its summary (plus ``reused``)."""
    return grid.run_simulation(job, fresh)


def prepare_backbones(jobs: Sequence[Job], echo: Callable[[str], None] = print) -> None:
    """Load (pretrain and cache if missing) every backbone the jobs use, in this process, so
    parallel workers never pretrain the same backbone at once."""
    from fedagg.models.backbone import backbone_cache_path, backbone_entry, load_backbone

    for name in sorted({str(j.config.get("model_args", {}).get("backbone", "mnist1d-transformer"))
                        for j in jobs}):
        entry = backbone_entry(name)
        if entry.recipe is not None and not backbone_cache_path(name, entry.recipe).is_file():
            echo(f"pretraining backbone {name} (cached for later runs) ...")
        load_backbone(name)


def run_all(jobs: Sequence[Job], workers: int = 2, fresh: bool = False,
            echo: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Run ``jobs`` (``workers`` at a time); ``{job.name: summary}``. A run the runner stops (e.g.
    every update rejected: a diverged learning rate) is reported as FAILED and left out."""
    from simulations.runner import RunError

    return grid.run_all(jobs, run_job, initializer=grid.init_worker, workers=workers, fresh=fresh,
                        echo=echo, prepare=lambda todo: prepare_backbones(todo, echo),
                        catch=(RunError,))


# ------------------------------------------------------------------------------ results
def collect(jobs: Sequence[Job]) -> dict[str, Any]:
    """Per (level, method): per-seed final and per-domain accuracy, communication, run time, and
    (FedIns) the slot histogram of each seed. JSON-ready."""
    from simulations.evaluate import evaluate_run
    from simulations.results import read_metrics

    out: dict[str, Any] = {}
    for job in jobs:
        if not grid.finished(job.run_dir):
            continue
        summary = grid.read_summary(job.run_dir)
        rows = grid.train_rows(job.run_dir)
        ev = evaluate_run(job.run_dir)
        cell = out.setdefault(job.level, {}).setdefault(job.method + job.tag, {
            "seeds": [], "final": [], "offline": [], "per_domain": [], "wall_seconds": [],
            "bytes_down": [], "bytes_up": [], "clients": [], "federated_scalars": [],
            "slot_histogram": [], "curves": [], "rounds": []})
        acc = [(int(r["round"]), float(r["test_accuracy"])) for r in read_metrics(job.run_dir)
               if math.isfinite(float(r["test_accuracy"]))]
        cell["seeds"].append(job.seed)
        cell["final"].append(float(summary["final_test_accuracy"]))
        cell["offline"].append(ev.accuracy)
        cell["per_domain"].append({str(d): a for d, (a, _) in ev.per_domain().items()})
        cell["wall_seconds"].append(float(summary["wall_seconds"]))
        cell["bytes_down"].append(float(np.mean([r["bytes_down"] for r in rows])))
        cell["bytes_up"].append(float(np.mean([r["bytes_up"] for r in rows])))
        cell["clients"].append(float(np.mean([r["clients"] for r in rows])))
        cell["federated_scalars"].append(int(summary["model_parameters"]))
        cell["rounds"] = [a[0] for a in acc]
        cell["curves"].append([a[1] for a in acc])
        if ev.slots is not None:
            cell["slot_histogram"].append(ev.slot_histogram().tolist())
    return out


#: The accuracy table (rows = methods, columns = levels), see :func:`grid.method_table`.
accuracy_table = grid.method_table


def comm_table(results: Mapping[str, Any], methods: Sequence[str]) -> str:
    """Per method: federated scalars, bytes per client and per round (down + up), vs finetune."""
    lv = next(iter(results))
    ref = None
    if "finetune" in results[lv]:
        c = results[lv]["finetune"]
        ref = (np.mean(c["bytes_down"]) + np.mean(c["bytes_up"])) / np.mean(c["clients"])
    lines = ["| method | scalars sent per client | bytes down / client | bytes down + up per round "
             f"({int(np.mean(results[lv][methods[0]]['clients']))} clients) | vs finetune |",
             "|---|---:|---:|---:|---:|"]
    for m in methods:
        if m not in results[lv]:
            continue
        c = results[lv][m]
        per_client = np.mean(c["bytes_down"]) / np.mean(c["clients"])
        both = np.mean(c["bytes_down"]) + np.mean(c["bytes_up"])
        ratio = f"{100 * both / np.mean(c['clients']) / ref:.1f} %" if ref else "–"
        lines.append(f"| {m} | {c['federated_scalars'][0]:,} | {per_client:,.0f} | {both:,.0f} | "
                     f"{ratio} |")
    return "\n".join(lines)


def domain_table(results: Mapping[str, Any], level: str, methods: Sequence[str]) -> str:
    """Per-domain test accuracy at ``level``, mean ± std over seeds."""
    cells = results[level]
    domains = sorted({d for m in methods if m in cells for pd in cells[m]["per_domain"] for d in pd},
                     key=int)
    lines = ["| method | " + " | ".join(f"domain {d}" for d in domains) + " |",
             "|---|" + "---:|" * len(domains)]
    for m in methods:
        if m not in cells:
            continue
        row = [grid.pm([pd[d] for pd in cells[m]["per_domain"]]) for d in domains]
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def slot_text(results: Mapping[str, Any], method: str = "fedins", top: int = 4) -> list[str]:
    """For each level, the most-selected slots of each domain (first seed)."""
    lines = []
    for lv, cells in results.items():
        if method not in cells or not cells[method]["slot_histogram"]:
            continue
        hist = np.asarray(cells[method]["slot_histogram"][0])
        parts = []
        for d, row in enumerate(hist):
            order = np.argsort(-row, kind="stable")[:top]
            parts.append(f"domain {d}: " + ", ".join(f"{j} ({row[j]:.2f})" for j in order))
        lines.append(f"- **{lv}** (seed {cells[method]['seeds'][0]}): " + "; ".join(parts))
    return lines


def slot_overlap(hist: np.ndarray) -> np.ndarray:
    """``(D, D)``: overlap of the domains' slot-selection distributions, ``Σ_j min(p_d, p_e) / k``
    (1 = identical choices, 0 = disjoint slots)."""
    k = hist.sum(axis=1, keepdims=True)
    p = hist / np.where(k > 0, k, 1)
    return np.minimum(p[:, None, :], p[None, :, :]).sum(axis=2)


def paired_gap(results: Mapping[str, Any], level: str, a: str, b: str) -> tuple[float, float, list[float]]:
    """Mean and std over seeds of ``acc(a) − acc(b)`` (percentage points) and the per-seed gaps."""
    ca, cb = results[level][a], results[level][b]
    by_seed = dict(zip(cb["seeds"], cb["final"], strict=True))
    gaps = [100 * (acc - by_seed[s]) for s, acc in zip(ca["seeds"], ca["final"], strict=True)
            if s in by_seed]
    g = np.asarray(gaps)
    return float(g.mean()), float(g.std(ddof=1)) if g.size > 1 else 0.0, gaps


def _round0(results: Mapping[str, Any], method: str) -> float:
    """Mean accuracy of ``method`` at round 0 (before training) over levels and seeds."""
    return float(np.mean([curve[0] for cells in results.values() if method in cells
                          for curve in cells[method]["curves"]]))


def report(exp: Mapping[str, Any], results: Mapping[str, Any], wall: float | None) -> str:
    """The markdown section written into the docs page."""
    methods = [m for m in exp["methods"] if any(m in c for c in results.values())]
    b = exp["base"]
    first = next(iter(next(iter(results.values())).values()))
    seeds = first["seeds"]
    levels = list(results)
    top = levels[-1]
    runs = sum(len(c["seeds"]) for cells in results.values() for c in cells.values())
    run_wall = sum(sum(c["wall_seconds"]) for cells in results.values() for c in cells.values())
    fi = exp["methods"].get("fedins", {})
    lrs = ", ".join(f"{m} {exp['methods'][m].get('lr', b.get('lr'))}" for m in methods)
    lines = [
        f"Setting: multi-domain MNIST-1D ({b.get('dataset_args', {}).get('num_samples', 5000)} "
        f"samples, {b['partition_args'].get('num_domains', 4)} domains), N = {b['num_clients']} "
        f"clients, Dirichlet(α = {b['partition_args'].get('alpha')}) label skew inside each domain, "
        f"frozen backbone `{b.get('model_args', {}).get('backbone')}`, {b['rounds']} rounds × "
        f"{b.get('local_steps')} local SGD steps (batch {b.get('batch_size')}; lr: {lrs}), "
        f"FedIns pool N = {fi.get('model_args', {}).get('pool_size')}, top-k = "
        f"{fi.get('model_args', {}).get('top_k')}, λ = "
        f"{fi.get('strategy_args', {}).get('lam', 0.1)}; {len(seeds)} seeds "
        f"({', '.join(str(s) for s in seeds)}).",
        "",
        f"**Server test accuracy (%)** after round {b['rounds']}, mean ± std over seeds (columns: "
        "domains mixed inside each client; best mean per column in bold):",
        "",
        accuracy_table(results, methods),
        "",
        "Before any round (round 0: the pretrained backbone and head; FedIns and SSF with their "
        "near-identity SSF init), mean over levels and seeds: "
        + ", ".join(f"{m} {100 * _round0(results, m):.1f} %" for m in methods) + ".",
        "",
    ]
    if "fedins" in results[top] and "ssf" in results[top]:
        mean, std, gaps = paired_gap(results, top, "fedins", "ssf")
        if all(g > 0 for g in gaps):
            verdict = "beats the single-SSF baseline on every seed"
        elif all(g < 0 for g in gaps):
            verdict = "is below the single-SSF baseline on every seed"
        else:
            verdict = "does not beat the single-SSF baseline (the sign of the gap changes across seeds)"
        lines += [
            f"At the highest heterogeneity (**{top}**) FedIns {verdict}: FedIns − SSF = "
            f"{mean:+.1f} ± {std:.1f} points (paired by seed: "
            + ", ".join(f"{g:+.1f}" for g in gaps) + ").",
            "",
        ]
    lines += [
        f"**Per-domain accuracy (%)** at {top} (domain 0 = the canonical source domain of the "
        "backbone):",
        "",
        domain_table(results, top, methods),
        "",
        "**Communication per round** (array payload bytes from `metrics.csv`; every client is "
        "trained every round):",
        "",
        comm_table(results, methods),
        "",
    ]
    slot_lines = slot_text(results)
    if slot_lines:
        lines += ["**Which slots the domains select** (share of a domain's test samples whose "
                  "top-k contains the slot; the four most selected slots per domain):", "",
                  *slot_lines, ""]
        for lv, cells in results.items():
            if "fedins" in cells and cells["fedins"]["slot_histogram"]:
                ov = slot_overlap(np.asarray(cells["fedins"]["slot_histogram"][0]))
                off = ov[~np.eye(len(ov), dtype=bool)]
                lines.append(f"- {lv}: overlap of two domains' slot choices (1 = same slots) "
                             f"{off.mean():.2f} on average (min {off.min():.2f}, max "
                             f"{off.max():.2f})")
        lines.append("")
    lines.append(
        f"{runs} runs, {run_wall / 60:.0f} min in total (sum of the runs' wall clocks)"
        + (f" ({wall / 60:.0f} min wall clock for this invocation, 2 runs at a time on a shared "
           "2-core machine)" if wall else "")
        + ". Offline re-evaluation (`python -m simulations.evaluate`) reproduced the final accuracy of "
        + ("every run" if all(abs(a - o) < 1e-9 for cells in results.values() for c in cells.values()
                              for a, o in zip(c["final"], c["offline"], strict=True))
           else "NOT every run (see results.json)")
        + ". Raw numbers: `results.json` in the output directory.")
    return "\n".join(lines)


def sweep_report(exp: Mapping[str, Any], results: Mapping[str, Any], out: Path) -> str:
    """Markdown: per method, final accuracy at each learning rate of the sweep; the rate used
    by the grid (``methods.<m>.lr``) in bold."""
    sw = exp["sweep"]
    cells = results.get(sw["level"], {})
    rounds = (sw.get("base") or {}).get("rounds", exp["base"]["rounds"])
    lines = [f"Learning-rate check: seed {sw['seed']} (not one of the reported seeds), level "
             f"{sw['level']}, {rounds} rounds, otherwise the settings above. Final server test "
             "accuracy (%) per local learning rate; the rate used for the tables in bold.", "",
             "| method | lr → accuracy (%) |", "|---|---|"]
    for method, lrs in sw["lr"].items():
        chosen = float(exp["methods"][method].get("lr", exp["base"].get("lr", 0.05)))
        row = []
        for lr in lrs:
            c = cells.get(f"{method}-lr{lr:g}")
            failed = (out / "sweep" / sw["level"] / f"{method}-lr{lr:g}").is_dir()
            text = (f"{lr:g} → {grid.pm(c['final'])}" if c else
                    f"{lr:g} → diverged" if failed else f"{lr:g} → –")
            row.append(f"**{text}**" if math.isclose(lr, chosen) else text)
        lines.append(f"| {method} | " + ", ".join(row) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ figures
def plot_accuracy(exp: Mapping[str, Any], results: Mapping[str, Any], path: Path) -> None:
    """Accuracy vs domains per client, mean ± std over seeds, one line per method."""
    from simulations.plot import save_figure

    plt = grid.pyplot()
    levels = list(results)
    xs = [int(exp["levels"][lv].get("partition_args", {}).get("domains_per_client", i + 1))
          for i, lv in enumerate(levels)]
    fig, ax = plt.subplots(figsize=(5.2, 3.8), dpi=150)
    for i, m in enumerate(exp["methods"]):
        pts = [(x, 100 * np.asarray(results[lv][m]["final"])) for x, lv in zip(xs, levels, strict=True)
               if m in results[lv]]
        if not pts:
            continue
        x = np.array([p[0] for p in pts]) + 0.04 * (i - (len(exp["methods"]) - 1) / 2)  # dodge
        mean = np.array([p[1].mean() for p in pts])
        std = np.array([p[1].std(ddof=1) if p[1].size > 1 else 0.0 for p in pts])
        ax.errorbar(x, mean, yerr=std, marker="os^D"[i % 4], capsize=3, linewidth=1.5,
                    color=f"C{i}", label=m)
    ax.set_xticks(xs)
    ax.set_xlabel("domains mixed inside each client (intra-client heterogeneity)")
    ax.set_ylabel("server test accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_slots(results: Mapping[str, Any], path: Path, method: str = "fedins") -> bool:
    """Heatmap per level: share of each domain's test samples selecting each slot (first seed)."""
    from simulations.plot import save_figure

    plt = grid.pyplot()
    levels = [lv for lv, c in results.items() if method in c and c[method]["slot_histogram"]]
    if not levels:
        return False
    fig, axes = plt.subplots(1, len(levels), figsize=(4.0 * len(levels), 2.6), dpi=150,
                             squeeze=False)
    for ax, lv in zip(axes[0], levels, strict=True):
        hist = np.asarray(results[lv][method]["slot_histogram"][0])
        im = ax.imshow(hist, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"{lv} (seed {results[lv][method]['seeds'][0]})", fontsize=9)
        ax.set_xlabel("slot")
        ax.set_xticks(range(hist.shape[1]))
        ax.set_yticks(range(hist.shape[0]))
        ax.set_ylabel("domain")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.9, label="share selecting the slot")
    save_figure(fig, path)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------ CLI
def main(argv: Sequence[str] | None = None) -> int:
    parser = grid.grid_parser(
        "simulations.experiments.fedins", __doc__, DEFAULT_CONFIG,
        docs_help="docs page to update (default docs/fedins.md; none with --quick)",
        figures_help="figure folder (default docs/figures; --out with --quick)")
    parser.add_argument("--sweep", action="store_true", help="run the learning-rate sweep only")
    args = parser.parse_args(argv)
    try:
        exp = load_experiment(args.config, quick=args.quick)
        out, docs, figures = grid.output_paths(args, "runs/fedins_mnist1d", Path("docs/fedins.md"),
                                               Path("docs/figures"))
        jobs = make_sweep_jobs(exp, out) if args.sweep else make_jobs(exp, out)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    if not args.report_only:
        print(f"{len(jobs)} runs → {out}", flush=True)
        run_all(jobs, workers=args.workers, fresh=args.fresh, echo=lambda s: print(s, flush=True))
    wall = time.perf_counter() - t0 if not args.report_only else None
    results = collect(jobs)
    if not results:
        print("error: no finished runs to report", file=sys.stderr)
        return 1
    from simulations.results import atomic_write_text

    name = "sweep.json" if args.sweep else "results.json"
    atomic_write_text(out / name, json.dumps({"config": exp, "results": results}, indent=1))
    if args.sweep:
        text = sweep_report(exp, results, out)
        print(text)
        if docs is not None:
            grid.write_section(docs, text, SWEEP_MARK)
            print(f"wrote {docs}")
        return 0
    text = report(exp, results, wall)
    print(text)
    figures.mkdir(parents=True, exist_ok=True)
    plot_accuracy(exp, results, figures / "fedins_accuracy.png")
    plot_slots(results, figures / "fedins_slots.png")
    if docs is not None:
        grid.write_section(docs, text, MARK)
        print(f"wrote {docs}")
    print(f"figures in {figures}; results in {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
