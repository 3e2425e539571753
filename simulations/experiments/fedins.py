"""``python -m simulations.experiments.fedins``: the FedIns study of docs/fedins.md.

    nice -n 10 python -m simulations.experiments.fedins            # tuning, then the table's grid
    python -m simulations.experiments.fedins --quick               # smoke run (quick backbone)

Two stages, both resumable sweeps (a finished run whose ``config.yaml`` matches its cell is
reused; ``--fresh`` redoes them, ``--report-only`` runs nothing), ``--workers`` runs at a time
with the inline engine (process pool, default 2):

1. **Tuning.** Every method with a ``tune`` grid (``{lr: [values]}``) runs once per value on the
   ``tuning`` seed (not a table seed), on ``tuning.level`` (or ``each`` level), for
   ``tuning.rounds`` rounds, into ``--out/tune/<level>/<method>/<key>-<value>/``. The value with
   the best headline (mean test accuracy over the last ``last_rounds`` rounds) is chosen.
2. **Table.** Every (level × method × seed) with the chosen values, into
   ``--out/<level>/<method>/seed-<s>/``.

Then every table run is re-evaluated offline per instance (:func:`simulations.evaluate.evaluate_run`:
per-domain accuracy and, for FedIns, the slots each test sample selects) and the FedIns routing is
measured (:func:`routing_stats`: slot usage, whether the selected slots name the domain, how far
the keys moved from their initial draw); the query's domain separability is measured on the data
(:func:`query_separability`, also for the ``query_check`` domain styles). ``results.json`` goes into
``--out``, the claim table between ``<!-- fedins:claims -->`` markers and the tables between
``<!-- fedins:results -->`` markers of ``--docs`` (default ``docs/fedins.md``; none with
``--quick`` unless given), the figures ``fedins_convergence.png`` (test accuracy per round, one
panel per level, mean ± std over seeds) and ``fedins_slots.png`` (which slots each domain selects)
into ``--figures``.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedagg.errors import ConfigError
from simulations.experiments import grid, study, tuning
from simulations.report import mean_std, table

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "fedins_mnist1d.yaml"
MARK = "fedins:results"
CLAIMS_MARK = "fedins:claims"
SECTIONS = ("seeds", "base", "levels", "methods")
OPTIONAL = ("tuning", "last_rounds", "plateau_gap", "query_check")
#: The claim "less than 15 % communication cost" (FedIns abstract, Tiny-ImageNet, vs full FL).
COMM_CLAIM = 0.15


# ------------------------------------------------------------------------------ config
def load_experiment(path: str | Path = DEFAULT_CONFIG, quick: bool = False) -> dict[str, Any]:
    """The experiment mapping, checked: ``seeds``, ``base``, ``levels``, ``methods`` (each may
    have a ``tune`` grid), optional ``tuning`` (``seed``, ``rounds``, ``level``), ``last_rounds``
    (default 1: the final accuracy), ``plateau_gap`` (default half the table's rounds) and
    ``query_check`` (domain styles whose query separability is measured next to the study's);
    ``quick`` applies the ``quick`` section (its ``base`` merges into ``base``, others replace)."""
    exp = grid.load_grid(path, SECTIONS, OPTIONAL, quick=quick)
    if not exp["seeds"] or not exp["levels"] or not exp["methods"]:
        raise ConfigError("seeds", "need at least one seed, level and method")
    exp["methods"] = {m: dict(over or {}) for m, over in exp["methods"].items()}
    exp["levels"] = {lv: dict(over or {}) for lv, over in exp["levels"].items()}
    grids = tuning.tune_grids(exp["methods"])
    rounds = int(exp["base"].get("rounds", 20))
    tuning.check_pairing(exp, list(grids), "methods", "method",
                         lambda spec: tuning.check_tuning(spec, exp["seeds"], rounds, "level",
                                                          list(exp["levels"])),
                         "seed, rounds, level")
    lengths = {"base.rounds": rounds}
    if exp.get("tuning"):
        lengths["tuning.rounds"] = exp["tuning"]["rounds"]
    exp["last_rounds"] = tuning.check_last_rounds(exp.get("last_rounds", 1), exp["base"], lengths)
    gap = exp.setdefault("plateau_gap", rounds // 2)
    if not isinstance(gap, int) or isinstance(gap, bool) or not 1 <= gap < rounds:
        raise ConfigError("plateau_gap", f"an integer in [1, base.rounds={rounds}) (got {gap!r})")
    styles = exp.setdefault("query_check", [])
    from fedagg.data.datasets import DOMAIN_STYLES

    if not isinstance(styles, list) or any(s not in DOMAIN_STYLES for s in styles):
        raise ConfigError("query_check", f"a list of domain styles, each one of "
                          f"{', '.join(DOMAIN_STYLES)} (got {styles!r})")
    return exp


@dataclasses.dataclass(frozen=True)
class Job(study.StudyJob):
    """One run: of the table (``value`` None) or of tuning (``value`` the tuned key's value)."""

    AXES = TUNE_AXES = ("level", "method")

    level: str
    method: str


#: The jobs and tuning of the (level × method) grid: a cell's run config is ``base`` ← method ←
#: level ← the tuned value.
GRID = study.MethodGrid(Job, "level", "levels")
make_tune_jobs = GRID.tune_jobs
make_jobs = GRID.table_jobs
collect_tuning = GRID.collect_tuning
chosen_values = GRID.chosen_values


# ------------------------------------------------------------------------------ running
def run_job(job: Job, fresh: bool = False) -> dict[str, Any]:
    """Run (or reuse) one simulation; return its summary (plus ``reused``). A tuning run that
    the runner stops (e.g. a learning rate that diverges) is kept as ``failed.json``."""
    return grid.run_simulation(job, fresh, keep_failed=job.keeps_failed)


def _worker() -> None:
    """Pool worker set-up: one BLAS/OpenMP thread per run (runs are the parallelism), quiet logs."""
    grid.init_worker(("OMP_NUM_THREADS", "MKL_NUM_THREADS"))


def prepare_backbones(jobs: Sequence[Job], echo: Callable[[str], None] = print) -> None:
    """Load (pretrain and cache if missing) every backbone the jobs use, in this process, so
    parallel workers never pretrain the same backbone at once."""
    from fedagg.models.backbone import backbone_cache_path, backbone_entry, load_backbone

    for name in sorted({_backbone(j.config) for j in jobs}):
        entry = backbone_entry(name)
        if entry.recipe is not None and not backbone_cache_path(name, entry.recipe).is_file():
            echo(f"pretraining backbone {name} (cached for later runs) ...")
        load_backbone(name)


def _backbone(config: Mapping[str, Any]) -> str:
    return str((config.get("model_args") or {}).get("backbone", "mnist1d-transformer"))


def run_all(jobs: Sequence[Job], workers: int = 2, fresh: bool = False,
            echo: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Run ``jobs`` (``workers`` at a time; finished runs with another config are redone);
    ``{job.name: summary}``."""
    return study.run_jobs(jobs, run_job, _worker, workers, fresh, echo,
                          prepare=lambda todo: prepare_backbones(todo, echo))


# ------------------------------------------------------------------------------ diagnostics
def purity(keys: np.ndarray, labels: np.ndarray) -> float:
    """Share of samples whose ``key``'s most frequent ``label`` is their own: how well ``keys``
    (e.g. each sample's first slot) name ``labels`` (e.g. its domain). 1 = every key holds one
    label; the largest label share when keys carry no information.

    >>> purity(np.array([0, 0, 1, 1]), np.array([5, 5, 6, 7]))
    0.75
    """
    if len(keys) == 0:
        return float("nan")
    hits = sum(int(np.bincount(labels[keys == k]).max()) for k in np.unique(keys))
    return hits / len(keys)


def effective_number(counts: np.ndarray) -> float:
    """``exp(entropy)`` of the distribution ``counts / Σ counts``: how many equally used items
    it is worth (all on one: 1; uniform over n: n).

    >>> round(effective_number(np.array([1, 1, 0, 2])), 3)
    2.828
    """
    p = np.asarray(counts, dtype=np.float64)
    p = p[p > 0] / p.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def routing_stats(ev: Any, initial: np.ndarray | None = None) -> dict[str, Any]:
    """FedIns routing of a saved run (``ev``: its :class:`~simulations.evaluate.Evaluation`): the
    slot histogram per domain, slots used and effective slots (all test samples, and per domain),
    the purity of the first slot for domain and class (with their chance levels), and
    ``kept_from_init``, the share of a sample's final top-k slots that were already in its top-k
    under the initial pool (``initial: (n, k)``, the slots the run's initial keys select; 1 = the
    keys never moved; NaN without ``initial``)."""
    counts = np.bincount(ev.slots.reshape(-1), minlength=ev.pool_size)
    doms = ev.domains if ev.domains is not None else np.zeros(len(ev.labels), np.int64)
    k = ev.slots.shape[1]
    kept = float("nan") if initial is None else float(np.mean(
        [len(set(a) & set(b)) / k for a, b in zip(ev.slots.tolist(), initial.tolist(),
                                                  strict=True)]))
    return {
        "slot_histogram": ev.slot_histogram().tolist(),
        "slots_used": int((counts > 0).sum()),
        "effective_slots": effective_number(counts),
        "domain_effective_slots": [effective_number(np.bincount(ev.slots[doms == d].reshape(-1),
                                                                minlength=ev.pool_size))
                                   for d in np.unique(doms)],
        "domain_purity": purity(ev.slots[:, 0], doms),
        "domain_chance": float(np.bincount(doms).max() / len(doms)),
        "class_purity": purity(ev.slots[:, 0], ev.labels),
        "class_chance": float(np.bincount(ev.labels).max() / len(ev.labels)),
        "kept_from_init": kept,
    }


def initial_slots(run_dir: Path) -> np.ndarray:
    """``(n, k)``: the slots each server test sample selects under the run's *initial* pool (the
    model its config and seed build before round 1, as the runner does)."""
    import torch

    from fedagg.models import build_model
    from simulations.evaluate import load_run

    cfg, _, data = load_run(run_dir)
    init = build_model(cfg.model, data.input_shape, data.num_classes, cfg.seed, cfg.model_args)
    with torch.no_grad():
        return init.match(torch.as_tensor(data.test.x)).idx.numpy()


def evaluate(run_dir: Path) -> tuple[Any, dict[str, Any] | None]:
    """``(Evaluation, routing stats or None)`` of a finished run (see :func:`routing_stats`)."""
    from simulations.evaluate import evaluate_run

    ev = evaluate_run(run_dir)
    if ev.slots is None:
        return ev, None
    return ev, routing_stats(ev, initial_slots(run_dir))


def query_separability(base: Mapping[str, Any], style: str | None = None) -> float:
    """How well the FedIns query (the frozen backbone's pre-logit feature, SSF off) names the
    domain: nearest-centroid accuracy on the server test set, by cosine to each domain's mean
    normalised query over the training pool (chance: 1 / domains). ``base``: the study's run
    config (dataset, ``dataset_args``, ``partition_args.num_domains``, backbone); ``style``
    replaces ``dataset_args.domain_style``."""
    import torch

    from fedagg.data.federated import load_central
    from fedagg.models.backbone import load_backbone

    dargs = dict(base.get("dataset_args") or {})
    dargs["domains"] = int((base.get("partition_args") or {}).get("num_domains", 4))
    if style is not None:
        dargs["domain_style"] = style
    central = load_central(base["dataset"], **dargs)
    bb = load_backbone(_backbone(base))

    def q(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            f = bb.feature_fn(bb.module, torch.as_tensor(x)).numpy().astype(np.float64)
        return f / np.linalg.norm(f, axis=1, keepdims=True)

    qtr, qte = q(central.train.x), q(central.test.x)
    doms = np.unique(central.train.domain)
    cent = np.stack([qtr[central.train.domain == d].mean(0) for d in doms])
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    return float(np.mean(doms[(qte @ cent.T).argmax(1)] == central.test.domain))


def backbone_parameters(base: Mapping[str, Any]) -> int:
    """Parameters of the study's backbone (what full fine-tuning sends)."""
    from fedagg.models.backbone import load_backbone

    return int(sum(p.numel() for p in load_backbone(_backbone(base)).module.parameters()))


# ------------------------------------------------------------------------------ results
missing_cells = study.missing_cells


def collect(exp: Mapping[str, Any], jobs: Sequence[Job]) -> dict[str, Any]:
    """Per (level, method), per seed: headline (mean over the last ``last_rounds`` rounds), best
    over the evaluated rounds (and its round), final, the headline window ``plateau_gap`` rounds
    earlier, collapsed, offline re-evaluation (accuracy, per domain), bytes per round, run time,
    curves and, for FedIns, :func:`routing_stats`. Only complete cells (every seed finished) are
    reported; :func:`missing_cells` names the others. JSON-ready."""
    last, gap = exp["last_rounds"], exp["plateau_gap"]
    out: dict[str, Any] = {}
    for job in study.complete(jobs):
        rounds, acc = grid.run_curve(job.run_dir)
        summary = grid.read_summary(job.run_dir)
        rows = grid.train_rows(job.run_dir)
        ev, routing = evaluate(job.run_dir)
        cell = out.setdefault(job.level, {}).setdefault(job.method, {
            "seeds": [], "headline": [], "best": [], "best_round": [], "final": [],
            "earlier": [], "collapsed": [], "offline": [], "per_domain": [],
            "wall_seconds": [], "bytes_down": [], "bytes_up": [], "clients": [],
            "federated_scalars": [], "routing": [], "rounds": rounds.tolist(), "curves": []})
        head = tuning.late_mean(rounds, acc, last)
        trained = rounds > 0
        cell["seeds"].append(job.seed)
        cell["headline"].append(head)
        cell["best"].append(float(acc[trained].max()))
        cell["best_round"].append(int(rounds[trained][int(np.argmax(acc[trained]))]))
        cell["final"].append(float(acc[-1]))
        cell["earlier"].append(tuning.late_mean(rounds, acc, last, float(rounds[-1]) - gap))
        cell["collapsed"].append(tuning.collapsed(acc, head, job.run_dir))
        cell["offline"].append(ev.accuracy)
        cell["per_domain"].append({str(d): a for d, (a, _) in ev.per_domain().items()})
        cell["wall_seconds"].append(float(summary["wall_seconds"]))
        cell["bytes_down"].append(float(np.mean([r["bytes_down"] for r in rows])))
        cell["bytes_up"].append(float(np.mean([r["bytes_up"] for r in rows])))
        cell["clients"].append(float(np.mean([r["clients"] for r in rows])))
        cell["federated_scalars"].append(int(summary["model_parameters"]))
        cell["curves"].append(acc.tolist())
        if routing is not None:
            cell["routing"].append(routing)
    return out


# ------------------------------------------------------------------------------ report
def collapsed_seeds(results: Mapping[str, Any], level: str, method: str) -> list[int]:
    """The seeds whose run of ``method`` at ``level`` collapsed."""
    cell = results.get(level, {}).get(method)
    if cell is None:
        return []
    return [s for s, d in zip(cell["seeds"], cell["collapsed"], strict=True) if d]


def _seeds_text(g: np.ndarray | None) -> str:
    return "–" if g is None else ", ".join(f"{x:+.1f}" for x in g)


def _verdict(g: np.ndarray) -> str:
    if g.mean() <= 0:
        return "**no**" + (" (below on every seed)" if (g < 0).all() else
                           f" (mean ≤ 0; above on {int((g > 0).sum())} of {g.size} seeds)")
    if (g > 0).all():
        return "**holds** (every seed)"
    return f"**unclear** (mean > 0, but below on {int((g <= 0).sum())} of {g.size} seeds)"


def claims(exp: Mapping[str, Any], results: Mapping[str, Any],
           backbone_params: int | None = None) -> list[tuple[str, str, str]]:
    """The claim table's rows ``(claim, our number, verdict)``: FedIns above the single shared SSF
    at each level (headline gap; the best-over-rounds gap, the reference's number, next to it),
    whether the gain grows from the first level to the last (paired by seed), and the
    communication claim (FedIns's payload over the full backbone's)."""
    rows = []
    levels = list(results)
    for lv in levels:
        g = tuning.paired_gap(results, lv, "fedins", "ssf")
        if g is None:
            continue
        b = tuning.paired_gap(results, lv, "fedins", "ssf", "best")
        rows.append((f"FedIns above a single shared SSF ({lv})",
                     f"{tuning.gap_text(g)} (seeds: {_seeds_text(g)}); best over rounds "
                     f"{tuning.gap_text(b)}", _verdict(g)))
    if len(levels) > 1:
        g0 = tuning.paired_gap(results, levels[0], "fedins", "ssf")
        g1 = tuning.paired_gap(results, levels[-1], "fedins", "ssf")
        if g0 is not None and g1 is not None and g0.size == g1.size:
            d = g1 - g0
            rows.append((f"The gain over SSF grows with intra-client heterogeneity "
                         f"({levels[0]} → {levels[-1]})",
                         f"gap({levels[-1]}) − gap({levels[0]}): {tuning.gap_text(d)} "
                         f"(seeds: {_seeds_text(d)})", _verdict(d)))
    cells = next(iter(results.values()))
    if backbone_params and "fedins" in cells:
        share = cells["fedins"]["federated_scalars"][0] / backbone_params
        rows.append((f"Less than {100 * COMM_CLAIM:.0f} % of the communication of full-model FL",
                     f"FedIns sends {cells['fedins']['federated_scalars'][0]:,} scalars per client "
                     f"and direction, {100 * share:.0f} % of the {backbone_params:,}-parameter "
                     "backbone", "**holds**" if share < COMM_CLAIM else
                     "**no** on this backbone (N copies of the SSF vectors and heads outweigh a "
                     "tiny backbone; on a ViT-B/16 the same pool is 6–10 %)"))
    return rows


def claims_report(exp: Mapping[str, Any], results: Mapping[str, Any],
                  missing: Sequence[str] = (), backbone_params: int | None = None) -> str:
    """The claim table written at the top of the docs page (``missing``: unfinished cells)."""
    any_cell = next(iter(next(iter(results.values())).values()))
    lines = [] if not missing else [
        f"**The grid is not finished**: {len(missing)} cells are missing ({', '.join(missing)}). "
        "The verdicts below cover only the finished cells.", ""]
    lines += [
        f"Our numbers: FedIns − SSF, mean test accuracy over the last {exp['last_rounds']} "
        f"rounds, per-seed paired differences in points, mean ± std (ddof 1) over "
        f"{len(any_cell['seeds'])} seeds ({', '.join(str(s) for s in any_cell['seeds'])}), "
        f"{exp['base']['rounds']} rounds, learning rates tuned per method on seed "
        f"{exp['tuning']['seed'] if exp.get('tuning') else '–'}.",
        "",
        table(["paper's claim", "our number (points)", "verdict"],
              claims(exp, results, backbone_params)),
    ]
    return "\n".join(lines)


def comm_table(results: Mapping[str, Any], methods: Sequence[str],
               backbone_params: int | None) -> str:
    """Per method: federated scalars, bytes per client and per round (down + up), vs the full
    backbone (what full fine-tuning would send)."""
    lv = next(iter(results))
    cells = results[lv]
    n = int(np.mean(next(iter(cells.values()))["clients"]))
    rows = []
    for m in methods:
        if m not in cells:
            continue
        c = cells[m]
        per_client = np.mean(c["bytes_down"]) / np.mean(c["clients"])
        both = np.mean(c["bytes_down"]) + np.mean(c["bytes_up"])
        ratio = (f"{100 * c['federated_scalars'][0] / backbone_params:.1f} %"
                 if backbone_params else "–")
        rows.append([m, f"{c['federated_scalars'][0]:,}", f"{per_client:,.0f}", f"{both:,.0f}",
                     ratio])
    return table(["method", "scalars sent per client", "bytes down / client",
                  f"bytes down + up per round ({n} clients)", "vs full backbone"], rows, "lrrrr")


def domain_table(results: Mapping[str, Any], level: str, methods: Sequence[str]) -> str:
    """Per-domain test accuracy of the final models at ``level``, mean ± std over seeds."""
    cells = results[level]
    domains = sorted({d for m in methods if m in cells for pd in cells[m]["per_domain"] for d in pd},
                     key=int)
    rows = [[m, *(mean_std([pd[d] for pd in cells[m]["per_domain"]], scale=100) for d in domains)]
            for m in methods if m in cells]
    return table(["method", *(f"domain {d}" for d in domains)], rows, "l" + "r" * len(domains))


def slot_overlap(hist: np.ndarray) -> np.ndarray:
    """``(D, D)``: overlap of the domains' slot-selection distributions, ``Σ_j min(p_d, p_e) / k``
    (1 = identical choices, 0 = disjoint slots)."""
    k = hist.sum(axis=1, keepdims=True)
    p = hist / np.where(k > 0, k, 1)
    return np.minimum(p[:, None, :], p[None, :, :]).sum(axis=2)


def routing_table(results: Mapping[str, Any], method: str = "fedins") -> str:
    """Per level: slot usage (used of N, effective number, overall and per domain), how well
    the first slot names the domain and the class (with chance), the share of the top-k kept
    from the initial keys, and the mean overlap of two domains' slot choices; mean ± std over
    seeds."""
    lines = ["| level | slots used | effective slots | effective slots per domain | "
             "first slot → domain (chance) | first slot → class (chance) | top-k kept from "
             "init | domain overlap |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for lv, cells in results.items():
        rs = cells.get(method, {}).get("routing") or []
        if not rs:
            continue
        n = len(rs[0]["slot_histogram"][0])
        ov = [float(slot_overlap(np.asarray(r["slot_histogram"]))[
            ~np.eye(len(r["slot_histogram"]), dtype=bool)].mean()) for r in rs]
        lines.append(
            f"| {lv} | {mean_std([r['slots_used'] for r in rs], 1)} of {n} | "
            f"{mean_std([r['effective_slots'] for r in rs], 1)} | "
            f"{mean_std([np.mean(r['domain_effective_slots']) for r in rs], 1)} | "
            f"{mean_std([r['domain_purity'] for r in rs], 2)} ({rs[0]['domain_chance']:.2f}) | "
            f"{mean_std([r['class_purity'] for r in rs], 2)} ({rs[0]['class_chance']:.2f}) | "
            f"{mean_std([r['kept_from_init'] for r in rs], 2)} | {mean_std(ov, 2)} |")
    return "\n".join(lines)


def slot_text(results: Mapping[str, Any], method: str = "fedins", top: int = 3) -> list[str]:
    """For each level, the most-selected slots of each domain (first seed)."""
    lines = []
    for lv, cells in results.items():
        rs = cells.get(method, {}).get("routing") or []
        if not rs:
            continue
        hist = np.asarray(rs[0]["slot_histogram"])
        parts = []
        for d, row in enumerate(hist):
            order = np.argsort(-row, kind="stable")[:top]
            parts.append(f"{d}: " + ", ".join(f"{j} ({row[j]:.2f})" for j in order))
        lines.append(f"- **{lv}** (seed {cells[method]['seeds'][0]}), domain: slot (share) — "
                     + "; ".join(parts))
    return lines


def _setting(exp: Mapping[str, Any], tuned: Mapping[str, Any]) -> str:
    b = exp["base"]
    dargs, pargs = b.get("dataset_args") or {}, b.get("partition_args") or {}
    fi = exp["methods"].get("fedins", {})
    lrs = chosen_values(tuned) if tuned else {}
    lr_text = "; ".join(f"{lv}: " + ", ".join(f"{m} {v:g}" for m, v in c.items())
                        for lv, c in lrs.items())
    return (
        f"Setting: multi-domain MNIST-1D, style `{dargs.get('domain_style', 'drift')}` "
        f"({dargs.get('num_samples', 5000)} samples, {pargs.get('num_domains', 4)} domains), "
        f"N = {b['num_clients']} clients, Dirichlet(α = {pargs.get('alpha')}) label skew inside "
        f"each domain, frozen backbone `{_backbone(b)}`, {b['rounds']} rounds × "
        f"{b.get('local_steps')} local SGD steps (batch {b.get('batch_size')}, momentum "
        f"{b.get('momentum', 0.9)}), FedIns pool N = {fi.get('model_args', {}).get('pool_size')}, "
        f"top-k = {fi.get('model_args', {}).get('top_k')}, λ = "
        f"{fi.get('strategy_args', {}).get('lam', 0.1)}, client weights "
        f"`{fi.get('strategy_args', {}).get('weighting', 'uniform')}`; evaluated every "
        f"{b.get('eval_every', 1)} rounds and every one of the last {b.get('eval_last', 0)}. "
        f"Learning rates (tuned): {lr_text or '–'}.")


def report(exp: Mapping[str, Any], results: Mapping[str, Any], tuned: Mapping[str, Any],
           walls: Mapping[str, float], missing: Sequence[str] = (),
           query: Mapping[str, float] | None = None, backbone_params: int | None = None) -> str:
    """The markdown section written into the docs page (after the claims)."""
    methods = [m for m in exp["methods"] if any(m in c for c in results.values())]
    last, gap = exp["last_rounds"], exp["plateau_gap"]
    rounds = exp["base"]["rounds"]
    lines = [_setting(exp, tuned), ""]
    lines += [
        f"**Test accuracy (%)**, mean over the last {last} rounds, mean ± std (ddof 1) over "
        "seeds (columns: domains mixed inside each client; best mean per column in bold):",
        "",
        grid.method_table(results, methods, "headline"),
        "",
        "**Best over the evaluated rounds (%)**, the number the reference code reports (a "
        "test-set model selection, so optimistic):",
        "",
        grid.method_table(results, methods, "best"),
        "",
        *([f"Not finished (left out of every table): {', '.join(missing)}.", ""]
          if missing else []),
    ]
    pairs = [(lv, tuning.paired_gap(results, lv, "fedins", "ssf"),
              tuning.paired_gap(results, lv, "fedins", "ssf", "best")) for lv in results]
    pairs = [p for p in pairs if p[1] is not None]
    if pairs:
        lines += ["**FedIns − SSF** (points, paired by seed):", "",
                  table(["level", "last-rounds mean", "per seed", "best over rounds", "per seed"],
                        [[lv, tuning.gap_text(g), _seeds_text(g), tuning.gap_text(b),
                          _seeds_text(b)] for lv, g, b in pairs], "lrlrl"), ""]
    gone = [f"{lv}/{m} seed {s}" for lv in results for m in methods
            for s in collapsed_seeds(results, lv, m)]
    lines += ["Collapsed runs (the headline below half of the run's best accuracy, or a "
              "non-finite final model): " + (", ".join(gone) if gone else "none") + ".", ""]
    e0 = rounds - gap
    lines += [f"**Plateau check**: the headline minus the mean over rounds {e0 - last + 1}–{e0} "
              "(the evaluated ones), mean ± std over seeds, points; near 0 means the run has "
              "levelled off:", ""]
    plateau = [[m, *("–" if m not in results[lv] else
                     tuning.gap_text(100 * np.subtract(results[lv][m]["headline"],
                                                       results[lv][m]["earlier"]))
                     for lv in results)] for m in methods]
    lines.append(table(["method", *results], plateau, "l" + "r" * len(results)))
    top = list(results)[-1]
    lines += ["", f"**Per-domain accuracy (%)** of the final models at {top}:", "",
              domain_table(results, top, methods), ""]
    if any(c.get("fedins", {}).get("routing") for c in results.values()):
        lines += [
            "**FedIns routing** on the server test set (final models), mean ± std over seeds: "
            "slots selected by any sample; effective slots = exp(entropy) of the slot choices "
            "(selection collapse: near k); how well a sample's first slot names its domain and "
            "its class (purity: share of samples in the majority domain / class of their first "
            "slot; chance = the largest share); the share of a sample's top-k slots already in "
            "its top-k under the initial keys (1 = the keys did not move); mean overlap of two "
            "domains' slot choices (1 = the same slots):", "",
            routing_table(results), "",
            "Most selected slots per domain (share of the domain's test samples whose top-k "
            "holds the slot):", "", *slot_text(results), ""]
    if query:
        lines += ["**Does the query see the domain?** Nearest-centroid accuracy of the FedIns "
                  "query (frozen backbone feature, SSF off) for the domain, on the server test "
                  "set (chance 1/domains): "
                  + ", ".join(f"style `{s}` {100 * v:.0f} %" for s, v in query.items())
                  + f" (chance {100 / int(exp['base']['partition_args'].get('num_domains', 4)):.0f} %).",
                  ""]
    lines += ["**Communication per round** (array payload bytes from `metrics.csv`; every client "
              "is trained every round):", "", comm_table(results, methods, backbone_params), ""]
    if tuned:
        t = exp["tuning"]
        where = ("each level separately" if t["level"] == "each"
                 else f"`{t['level']}` only, the choice used for every level")
        lines += [f"**Tuned learning rates**, chosen by the same metric on seed {t['seed']} (not a "
                  f"table seed), {t['rounds']} rounds, on {where}; the score of each value tried "
                  "in parentheses (%), † = the choice is at the edge of the grid:", "",
                  tuning.tuning_table(list(exp["methods"]), tuned), ""]
    runs = sum(len(c["seeds"]) for cells in results.values() for c in cells.values())
    offline_ok = all(abs(a - o) < 1e-9 for cells in results.values() for c in cells.values()
                     for a, o in zip(c["final"], c["offline"], strict=True))
    lines.append(
        f"Compute: {runs} table runs, {walls.get('table_runs', 0) / 60:.0f} min summed run time; "
        f"{walls.get('tuning_count', 0):.0f} tuning runs, "
        f"{walls.get('tuning_runs', 0) / 60:.0f} min summed run time"
        + (f"; this invocation took {walls['invocation'] / 60:.0f} min wall clock"
           if walls.get("invocation") else "")
        + ". Offline re-evaluation (`python -m simulations.evaluate`) reproduced the final "
        + ("accuracy of every run" if offline_ok else "accuracy of NOT every run (see results.json)")
        + ". Raw numbers: `results.json` in the output directory.")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ figures
def plot_convergence(results: Mapping[str, Any], methods: Sequence[str], path: Path) -> None:
    """One panel per level: test accuracy vs round, mean ± std over seeds per method."""
    plt = grid.pyplot()
    levels = list(results)
    fig, axes = plt.subplots(1, len(levels), figsize=(4.6 * len(levels), 3.6), dpi=150,
                             sharey=True, squeeze=False)
    for ax, lv in zip(axes[0], levels, strict=True):
        for i, m in enumerate(methods):
            if m not in results[lv]:
                continue
            cell = results[lv][m]
            x = np.asarray(cell["rounds"])
            ys = np.asarray(cell["curves"]) * 100
            mean = ys.mean(axis=0)
            ax.plot(x, mean, color=f"C{i}", linewidth=1.5, label=m)
            if len(ys) > 1:
                std = ys.std(axis=0, ddof=1)
                ax.fill_between(x, mean - std, mean + std, color=f"C{i}", alpha=0.15, linewidth=0)
        ax.set_title(lv, fontsize=9)
        ax.set_xlabel("round")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("server test accuracy (%)")
    axes[0][-1].legend(frameon=False, fontsize=8, loc="lower right")
    fig.tight_layout()
    grid.save_png(fig, path)
    plt.close(fig)


def plot_slots(results: Mapping[str, Any], path: Path, method: str = "fedins") -> bool:
    """Heatmap per level: share of each domain's test samples selecting each slot (first seed)."""
    plt = grid.pyplot()
    levels = [lv for lv, c in results.items() if c.get(method, {}).get("routing")]
    if not levels:
        return False
    fig, axes = plt.subplots(1, len(levels), figsize=(4.6 * len(levels), 2.8), dpi=150,
                             squeeze=False)
    im = None
    for ax, lv in zip(axes[0], levels, strict=True):
        hist = np.asarray(results[lv][method]["routing"][0]["slot_histogram"])
        im = ax.imshow(hist, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"{lv} (seed {results[lv][method]['seeds'][0]})", fontsize=9)
        ax.set_xlabel("slot")
        ax.set_yticks(range(hist.shape[0]))
        ax.set_ylabel("domain")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.9, label="share selecting the slot")
    grid.save_png(fig, path)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------ CLI
def _report(run: study.Run) -> int:
    """results.json (with the query separability and the backbone's size), the claims and the
    tables (printed and in the docs page), the figures."""
    exp, results = run.exp, run.results
    walls = run.walls()
    style = (exp["base"].get("dataset_args") or {}).get("domain_style", "drift")
    query = {s: query_separability(exp["base"], s)
             for s in dict.fromkeys([style, *exp["query_check"]])}
    params = backbone_parameters(exp["base"])
    missing = missing_cells(run.jobs)
    study.write_results(run, walls, missing, query_separability=query, backbone_parameters=params)
    head = claims_report(exp, results, missing, params)
    text = report(exp, results, run.tuning, walls, missing, query, params)
    study.publish(run, head, text, (CLAIMS_MARK, MARK), {
        "fedins_convergence.png": lambda path: plot_convergence(results, list(exp["methods"]), path),
        "fedins_slots.png": lambda path: plot_slots(results, path)})
    return 0


STUDY = GRID.study("fedins", __doc__, DEFAULT_CONFIG, "runs/fedins_mnist1d",
                   load_experiment=load_experiment, run_all=run_all, collect=collect,
                   report=_report)
#: ``python -m`` entry point (:func:`~simulations.experiments.study.run_study`).
main = STUDY.main


if __name__ == "__main__":
    sys.exit(main())
