"""``python -m simulations.plot``: report-ready convergence curves from run directories.

    python -m simulations.plot runs/fedavg-s0 runs/fedavg-s1 runs/fedau-s0 runs/fedau-s1 --out fig.png

Runs are averaged into one curve only when their configs (``config.yaml``) differ in the seed alone
(keys that cannot change results, :data:`NEUTRAL_KEYS`, are ignored); each such group is drawn as its
mean over runs with a ±1 sample-std band (ddof=1) and ``n`` in the legend; a single run draws no band.
Each curve is labelled by the strategy and the config keys that differ between the curves, e.g.
``fedavg · rounds=20 · partition=dirichlet · alpha=0.1 (n=2)``; ``--group-by`` names keys to show
in every label as well. The mean at a round is taken only where every run of the group has a value
(rounds a run did not evaluate, ``eval_every`` > 1, are skipped), so a curve stops at its shortest
run and the legend says ``cut at round R`` when a longer run was cut. Unfinished runs (no
``summary.json``) are refused unless ``--include-unfinished``, which draws them dashed, marked
``(unfinished)``, never averaged with finished runs. ``--panel-by KEY`` draws one panel per value of
a config key. The figure is written as PNG and PDF next to each other (``fig.png`` and ``fig.pdf``).

A sweep directory (``python -m simulations.sweep``, it holds ``sweep.json``) stands for its finished
cells; when only sweep directories are given, ``--panel-by`` defaults to the first grid key other than
seed/strategy and ``--group-by`` to the other grid keys but seed (see :func:`sweep_defaults`):

    python -m simulations.plot runs/sweeps/example --out fig.png
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fedagg.errors import ConfigError
from simulations.cli import Parser
from simulations.core.results import read_metrics

#: Axis labels (with units) for known metrics and x-axes.
LABELS = {
    "test_accuracy": "server test accuracy (%)",
    "test_loss": "server test loss (cross-entropy)",
    "train_loss": "mean client training loss",
    "client_test_accuracy": "client test accuracy (%)",
    "round": "round",
    "seconds": "wall-clock time (s)",
    "sim_time": "simulated time (s)",
}
PERCENT = {"test_accuracy", "client_test_accuracy"}

#: Config keys (each with everything below it) that cannot change a run's results, so runs that differ
#: only in them (and the seed) are averaged into one curve: where the run is written (``out``), how the
#: clients are executed (``engine``, ``ray``, ``device``: the engines give the same results), how often
#: the state is saved (``checkpoint_every``, ``keep_checkpoints``), and which rounds the server
#: evaluates (``eval_every``, ``eval_last``: evaluation never feeds back into training; rounds a run did
#: not evaluate are skipped by the mean).
NEUTRAL_KEYS = ("out", "engine", "ray", "device", "checkpoint_every", "keep_checkpoints", "eval_every",
                "eval_last")
#: The key runs of one curve differ in.
SEED_KEY = "seed"
#: The key every curve label starts with, shown bare (``fedavg``, not ``strategy=fedavg``).
LEAD_KEY = "strategy"
_MISSING = object()
_SEP = " · "


def run_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError("run_dir", f"{run_dir} has no config.yaml (not a run directory?)")
    return yaml.safe_load(path.read_text()) or {}


def dotted(cfg: dict[str, Any], key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError("group_by", f"config has no key {key!r}")
        node = node[part]
    return node


def flatten(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config → ``{dotted key: leaf}`` (dicts are walked; lists and scalars are leaves)."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def is_finished(run_dir: Path) -> bool:
    """A run is finished when its ``summary.json`` exists (written last by the runner)."""
    return (run_dir / "summary.json").is_file()


def expand_runs(paths: Sequence[str | Path], *, include_unfinished: bool = False) -> list[Path]:
    """Run directories among ``paths`` (each once); a directory holding run directories is expanded.
    A sweep directory stands for its finished cells (with ``include_unfinished``: every cell with
    a ``metrics.csv``)."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if (p / "metrics.csv").is_file():
            out.append(p)
        elif sweep_info(p) is not None:
            pattern = "*/metrics.csv" if include_unfinished else "*/summary.json"
            inner = sorted(q.parent for q in (p / "cells").glob(pattern))
            if not inner:
                raise ConfigError("run_dir", f"{p} is a sweep with no finished cell yet")
            out.extend(inner)
        elif p.is_dir():
            inner = sorted(q.parent for q in p.glob("**/metrics.csv"))
            if not inner:
                raise ConfigError("run_dir", f"{p} holds no run directory (no metrics.csv below it)")
            out.extend(inner)
        else:
            raise ConfigError("run_dir", f"{p} is not a run directory (no metrics.csv)")
    seen: set[Path] = set()
    unique = []
    for p in out:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique


@dataclass(frozen=True)
class Series:
    """One run's ``metric`` at the rounds it has a finite value: ``rounds``, ``x`` and ``y`` are
    parallel 1-D arrays (``x`` is the round itself for ``--x round``)."""

    rounds: np.ndarray
    x: np.ndarray
    y: np.ndarray


def run_series(run_dir: Path, metric: str, x: str) -> Series:
    """Read ``metric`` (percent for accuracies) against ``x`` from ``run_dir/metrics.csv``; rows
    where either is NaN are dropped. ``x="seconds"`` is the cumulative wall time."""
    rows = read_metrics(run_dir)
    cols = _columns(run_dir)
    if metric not in cols:
        raise ConfigError("metric", f"{run_dir}/metrics.csv has no column {metric!r}; "
                          f"columns: {', '.join(cols)}")
    if x not in cols:
        raise ConfigError("x", f"{run_dir}/metrics.csv has no column {x!r}; columns: {', '.join(cols)}")
    if "round" not in cols:
        raise ConfigError("run_dir", f"{run_dir}/metrics.csv has no round column")
    rounds, xs, ys = [], [], []
    elapsed = 0.0
    for r in rows:
        step = _number(r, "seconds", "x", run_dir) if "seconds" in r else 0.0
        elapsed += step if np.isfinite(step) else 0.0
        xv = elapsed if x == "seconds" else _number(r, x, "x", run_dir)
        yv = _number(r, metric, "metric", run_dir)
        if np.isfinite(yv) and np.isfinite(xv):
            rounds.append(int(r["round"]))
            xs.append(xv)
            ys.append(100 * yv if metric in PERCENT else yv)
    return Series(np.array(rounds, dtype=int), np.array(xs, dtype=float), np.array(ys, dtype=float))


def _number(row: dict[str, Any], column: str, field: str, run_dir: Path) -> float:
    try:
        return float(row[column])
    except (TypeError, ValueError):
        raise ConfigError(field, f"{run_dir}/metrics.csv column {column!r} is not numeric "
                          f"(round {row.get('round')}: {row[column]!r})") from None


def _columns(run_dir: Path) -> list[str]:
    with (run_dir / "metrics.csv").open(newline="") as fh:
        return next(csv.reader(fh), [])


@dataclass(frozen=True)
class Curve:
    """One curve: the mean (and sample std, ddof=1; NaN for ``n`` = 1) over the ``n`` runs of a
    group at the rounds where all of them have a value. ``x``, ``mean``, ``std``, ``rounds`` are
    parallel 1-D arrays (``x`` is the mean x over runs at that round). ``cut_at`` is the last round
    drawn when a run of the group has values after it, else None."""

    label: str
    runs: tuple[Path, ...]
    finished: bool
    rounds: np.ndarray
    x: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    cut_at: int | None

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def legend(self) -> str:
        """``label`` with what the reader must know: ``(unfinished, n=2, cut at round 7)``."""
        notes = ["unfinished"] if not self.finished else []
        if self.n > 1:
            notes.append(f"n={self.n}")
        if self.cut_at is not None:
            notes.append(f"cut at round {self.cut_at}")
        return f"{self.label} ({', '.join(notes)})" if notes else self.label


def mean_band(series: Sequence[Series]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int | None]:
    """``(rounds, x, mean, std, cut_at)`` over runs at the rounds every run has a value: sample std
    (ddof=1; NaN for one run), x averaged over runs; ``cut_at`` as in :class:`Curve`."""
    common = set(series[0].rounds.tolist())
    for s in series[1:]:
        common &= set(s.rounds.tolist())
    rounds = np.array(sorted(common), dtype=int)
    xs = np.empty((len(series), len(rounds)))
    ys = np.empty((len(series), len(rounds)))
    for i, s in enumerate(series):
        at = {r: j for j, r in enumerate(s.rounds.tolist())}
        idx = [at[r] for r in rounds.tolist()]
        xs[i], ys[i] = s.x[idx], s.y[idx]
    last = max((int(s.rounds.max()) for s in series if len(s.rounds)), default=None)
    cut_at = int(rounds[-1]) if len(rounds) and last is not None and last > rounds[-1] else None
    std = ys.std(axis=0, ddof=1) if len(series) > 1 else np.full(len(rounds), np.nan)
    return rounds, xs.mean(axis=0), ys.mean(axis=0), std, cut_at


def group_runs(run_dirs: Sequence[Path], *, include_unfinished: bool = False) -> list[list[Path]]:
    """Runs whose configs differ only in the seed and :data:`NEUTRAL_KEYS`, and that are all finished
    or all unfinished, in groups (first-seen order). An unfinished run is refused unless
    ``include_unfinished``; two runs of one group with the same seed are refused."""
    groups: dict[tuple[Any, ...], list[Path]] = {}
    seeds: dict[tuple[Any, ...], dict[Any, Path]] = defaultdict(dict)
    for d in run_dirs:
        finished = is_finished(d)
        if not finished and not include_unfinished:
            raise ConfigError("run_dir", f"{d} is unfinished (no summary.json); pass "
                              "--include-unfinished to plot it dashed")
        flat = flatten(run_config(d))
        key = (finished, _identity(flat))
        seed = flat.get(SEED_KEY)
        if seed in seeds[key]:
            raise ConfigError("run_dir", f"{seeds[key][seed]} and {d} are the same run (same config, "
                              f"seed {seed}); give each seed once")
        seeds[key][seed] = d
        groups.setdefault(key, []).append(d)
    return list(groups.values())


def _identity(flat: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """What makes runs comparable: every config leaf but the seed and the neutral keys."""
    return tuple(sorted((k, json.dumps(v, sort_keys=True, default=str)) for k, v in flat.items()
                        if k != SEED_KEY and not _neutral(k)))


def _neutral(key: str) -> bool:
    return any(key == n or key.startswith(n + ".") for n in NEUTRAL_KEYS)


def label_keys(configs: Sequence[dict[str, Any]], group_by: str = LEAD_KEY) -> list[str]:
    """The keys naming the groups (``configs``: one flattened config each): the strategy, then the
    ``group_by`` keys, then every other key whose value differs between groups (config order)."""
    wanted = _wanted(group_by)
    for cfg in configs:
        for k in wanted:
            if _leaf(cfg, k) is _MISSING:
                raise ConfigError("group_by", f"config has no key {k!r}")
    order: list[str] = []
    for cfg in configs:
        order.extend(k for k in cfg if k not in order)
    differ = [k for k in order if k != SEED_KEY and not _neutral(k)
              and len({json.dumps(_leaf(c, k), default=str) for c in configs}) > 1]
    keys = [LEAD_KEY] + [k for k in wanted if k != LEAD_KEY]
    return keys + [k for k in differ if k not in keys and not any(k.startswith(w + ".") for w in keys)]


def group_labels(configs: Sequence[dict[str, Any]], group_by: str = LEAD_KEY) -> list[str]:
    """One label per group: the :func:`label_keys` values, the strategy bare and the others as
    ``key=value`` joined by `` · `` (a key by its last dotted part unless two shown keys share it).
    A differing key that is unset (None or absent) in a group is left out of that group's label,
    unless it is a ``group_by`` key or leaving it out would make two labels of different configs
    equal."""
    wanted = _wanted(group_by)
    keys = label_keys(configs, group_by)
    tails = [k.split(".")[-1] for k in keys]
    names = {k: (t if tails.count(t) == 1 else k) for k, t in zip(keys, tails, strict=True)}

    def label(cfg: dict[str, Any], terse: bool) -> str:
        parts = []
        for k in keys:
            v = _leaf(cfg, k)
            if k == LEAD_KEY:
                parts.append(str(v) if v is not _MISSING else "?")
            elif k in wanted or not terse or (v is not None and v is not _MISSING):
                parts.append(f"{names[k]}={_short(v, terse)}")
        return _SEP.join(parts)

    labels = [label(c, terse=True) for c in configs]
    if len(set(labels)) < len({_identity(c) for c in configs}):
        labels = [label(c, terse=False) for c in configs]
    return labels


def _wanted(group_by: str) -> list[str]:
    return [k.strip() for k in group_by.split(",") if k.strip()]


def _leaf(cfg: dict[str, Any], key: str) -> Any:
    """A flattened config's value at ``key``; a key above leaves gives the nested dict."""
    if key in cfg:
        return cfg[key]
    below = {k[len(key) + 1:]: v for k, v in cfg.items() if k.startswith(key + ".")}
    return below or _MISSING


def _short(value: Any, terse: bool) -> str:
    text = "absent" if value is _MISSING else str(value)
    return text[:23] + "…" if terse and len(text) > 24 else text


def build_curves(run_dirs: Sequence[Path], *, metric: str = "test_accuracy", x: str = "round",
                 group_by: str = LEAD_KEY, include_unfinished: bool = False) -> list[Curve]:
    """The curves of a panel: runs grouped by :func:`group_runs`, labelled by :func:`group_labels`,
    averaged by :func:`mean_band`; finished curves first, each sorted by their labels' values."""
    groups = group_runs(run_dirs, include_unfinished=include_unfinished)
    configs = [flatten(run_config(g[0])) for g in groups]
    labels = group_labels(configs, group_by)
    curves = []
    for runs, label in zip(groups, labels, strict=True):
        series = [run_series(d, metric, x) for d in runs]
        for d, s in zip(runs, series, strict=True):
            if not len(s.rounds):
                raise ConfigError("metric", f"{d}/metrics.csv has no value of {metric!r} yet")
        rounds, xs, mean, std, cut_at = mean_band(series)
        if not len(rounds):
            raise ConfigError("metric", f"runs {', '.join(map(str, runs))} have no round in common "
                              f"with a value of {metric!r}")
        curves.append(Curve(label, tuple(runs), is_finished(runs[0]), rounds, xs, mean, std, cut_at))
    keys = label_keys(configs, group_by)
    order = sorted(range(len(curves)), key=lambda i: (not curves[i].finished, _sort_key(configs[i], keys)))
    return [curves[i] for i in order]


def _sort_key(cfg: dict[str, Any], keys: Sequence[str]) -> tuple[tuple[int, Any], ...]:
    """The values at ``keys``: numbers by value, then strings, then unset (``lr=0.05`` first)."""
    out: list[tuple[int, Any]] = []
    for k in keys:
        v = _leaf(cfg, k)
        if v is None or v is _MISSING:
            out.append((2, ""))
        elif isinstance(v, bool) or not isinstance(v, int | float):
            out.append((1, str(v)))
        else:
            out.append((0, float(v)))
    return tuple(out)


def plot_runs(run_dirs: Sequence[Path], *, metric: str = "test_accuracy", x: str = "round",
              group_by: str = LEAD_KEY, title: str | None = None, ax: Any = None,
              include_unfinished: bool = False) -> list[Curve]:
    """Draw the curves of :func:`build_curves` on ``ax`` (a new figure if None): mean lines with a
    ±1 sample-std band for n > 1, unfinished runs dashed, integer ticks on a round axis. Returns
    the curves drawn (the numbers behind the figure)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 4.2), dpi=150)
    curves = build_curves(run_dirs, metric=metric, x=x, group_by=group_by,
                          include_unfinished=include_unfinished)
    for c in curves:
        line, = ax.plot(c.x, c.mean, label=c.legend, linewidth=1.8, linestyle="-" if c.finished else "--",
                        marker="o" if len(c.x) == 1 else None)
        if c.n > 1:
            ax.fill_between(c.x, c.mean - c.std, c.mean + c.std, color=line.get_color(), alpha=0.2,
                            linewidth=0)
    if x == "round":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(LABELS.get(x, x))
    ax.set_ylabel(LABELS.get(metric, metric))
    ax.grid(True, alpha=0.3)
    banded = any(c.n > 1 for c in curves)
    ax.legend(frameon=False, fontsize=7.5, title="mean ± sample std over seeds" if banded else None,
              title_fontsize=7.5)
    if title:
        ax.set_title(title)
    return curves


def sweep_info(path: str | Path) -> dict[str, Any] | None:
    """The ``sweep.json`` of a sweep directory (grid keys and values), or None."""
    f = Path(path) / "sweep.json"
    if not f.is_file():
        return None
    return json.loads(f.read_text())


def sweep_defaults(keys: Sequence[str], panel_by: str | None = None, group_by: str | None = None
                   ) -> tuple[str | None, str]:
    """Panel and label keys for a sweep over grid ``keys``: panels by the first key other than
    seed/strategy, curve labels by the remaining keys but seed (strategy first; ``strategy`` if
    none). Given values are kept."""
    rest = [k for k in keys if k != "seed"]
    if panel_by is None:
        panel_by = next((k for k in rest if k != "strategy"), None)
    if group_by is None:
        others = [k for k in rest if k != panel_by]
        others.sort(key=lambda k: k != "strategy")
        group_by = ",".join(others) or "strategy"
    return panel_by, group_by


def plot_panels(run_dirs: Sequence[Path], *, panel_by: str | None, metric: str = "test_accuracy",
                x: str = "round", group_by: str = LEAD_KEY, title: str | None = None,
                order: Sequence[str] | None = None, include_unfinished: bool = False) -> Any:
    """A figure with one panel per value of config key ``panel_by`` (one panel if None), each
    drawn by :func:`plot_runs`; panels follow ``order`` (values as strings), else sorted."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    panels: dict[str, list[Path]] = defaultdict(list)
    for d in run_dirs:
        value = "" if panel_by is None else str(_panel_value(run_config(d), panel_by))
        panels[value].append(d)
    values = [v for v in (order or []) if v in panels] + sorted(v for v in panels if v not in (order or []))
    n = len(values)
    cols = min(n, 3)
    rows = -(-n // cols)
    size = (6.4, 4.2) if n == 1 else (5.2 * cols, 3.9 * rows)
    fig, axes = plt.subplots(rows, cols, figsize=size, dpi=150, sharey=True, squeeze=False)
    for ax, value in zip(axes.flat, values, strict=False):
        sub = f"{panel_by} = {value}" if panel_by is not None else title
        plot_runs(panels[value], metric=metric, x=x, group_by=group_by, title=sub, ax=ax,
                  include_unfinished=include_unfinished)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    if title and panel_by is not None:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _panel_value(cfg: dict[str, Any], key: str) -> Any:
    try:
        return dotted(cfg, key)
    except ConfigError:
        raise ConfigError("panel_by", f"config has no key {key!r}") from None


def save_figure(fig: Any, out: str | Path) -> list[Path]:
    """Save ``fig`` as ``out`` (PNG) and the same stem as PDF, atomically; return the paths."""
    import io

    from fedagg.io import atomic_write_bytes

    out = Path(out)
    if out.suffix.lower() not in (".png", ".pdf"):
        raise ConfigError("out", f"figure must end in .png or .pdf, got {out.name}")
    paths = []
    for suffix in (".png", ".pdf"):
        buf = io.BytesIO()
        fig.savefig(buf, format=suffix[1:], bbox_inches="tight")
        path = out.with_suffix(suffix)
        atomic_write_bytes(path, buf.getvalue())
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = Parser(prog="python -m simulations.plot", description=__doc__.split("\n\n")[0],
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories (or directories holding runs)")
    parser.add_argument("--metric", default="test_accuracy", help="metrics.csv column (default test_accuracy)")
    parser.add_argument("--x", default="round", help="x axis: round (default), seconds or any column")
    parser.add_argument("--group-by", default=None, help="config key(s) shown in every curve label, "
                        "comma-separated (default strategy; for sweeps the grid keys but seed and the "
                        "panel key); runs are averaged only when their configs differ in the seed alone")
    parser.add_argument("--panel-by", default=None, help="config key: one panel per value (default none; "
                        "for sweeps the first grid key other than seed/strategy)")
    parser.add_argument("--include-unfinished", action="store_true", help="plot runs without summary.json "
                        "too, dashed and marked (unfinished) (default: refuse them)")
    parser.add_argument("--title", default=None)
    parser.add_argument("--out", default="convergence.png", help="output .png (a .pdf is written beside it)")
    args = parser.parse_args(argv)
    try:
        import matplotlib.pyplot as plt

        runs = expand_runs(args.runs, include_unfinished=args.include_unfinished)
        sweeps = [sweep_info(p) for p in args.runs]
        panel_by, group_by, order = args.panel_by, args.group_by, None
        if all(sweeps):
            keys = [k for info in sweeps if info for k in info.get("keys", []) if k]
            keys = list(dict.fromkeys(keys))
            plot_spec = (sweeps[0] or {}).get("plot") or {}
            panel_by, group_by = sweep_defaults(keys, panel_by or plot_spec.get("panel_by"),
                                                group_by or plot_spec.get("group_by"))
            grid = (sweeps[0] or {}).get("grid", {})
            order = [str(v) for v in grid[panel_by]] if panel_by in grid else None
        fig = plot_panels(runs, panel_by=panel_by, metric=args.metric, x=args.x,
                          group_by=group_by or LEAD_KEY, title=args.title, order=order,
                          include_unfinished=args.include_unfinished)
        try:
            paths = save_figure(fig, args.out)
        finally:
            plt.close(fig)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
