"""``python -m simulations.plot``: report-ready convergence curves from run directories.

    python -m simulations.plot runs/fedavg-s0 runs/fedavg-s1 runs/fedau-s0 runs/fedau-s1 --out fig.png

Runs are grouped by strategy (or ``--group-by`` any config key, e.g. ``participation.process``, or
several, comma-separated); each group is drawn as its mean over runs (seeds) with a ±1 std band.
``--panel-by KEY`` draws one panel per value of a config key. The figure is written as PNG and PDF
next to each other (``fig.png`` and ``fig.pdf``).

A sweep directory (``python -m simulations.sweep``, it holds ``sweep.json``) stands for its finished
cells; when only sweep directories are given, ``--panel-by`` defaults to the first grid key other than
seed/strategy and ``--group-by`` to the other grid keys but seed (see :func:`sweep_defaults`):

    python -m simulations.plot runs/sweeps/example --out fig.png
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import yaml

from fedagg.errors import ConfigError
from simulations.results import read_metrics

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


def expand_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Run directories among ``paths``; a directory holding run directories is expanded."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if (p / "metrics.csv").is_file():
            out.append(p)
        elif sweep_info(p) is not None:
            inner = sorted(q.parent for q in (p / "cells").glob("*/summary.json"))
            if not inner:
                raise ConfigError("run_dir", f"{p} is a sweep with no finished cell yet")
            out.extend(inner)
        elif p.is_dir():
            inner = sorted(q.parent for q in p.glob("**/metrics.csv"))
            if not inner:
                raise ConfigError("run_dir", f"{p} holds no run directory (no metrics.csv below it)")
            out.extend(inner)
        else:
            raise ConfigError("run_dir", f"{p} is not a run directory")
    return out


def curves(run_dirs: Sequence[Path], metric: str, x: str, group_by: str
           ) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """``{group label: [(x, y) per run]}`` for ``metric`` against ``x`` (rows with NaN dropped)."""
    groups: dict[str, list[tuple[np.ndarray, np.ndarray]]] = defaultdict(list)
    for d in run_dirs:
        rows = read_metrics(d)
        if rows and metric not in rows[0]:
            raise ConfigError("metric", f"{d}/metrics.csv has no column {metric!r}; "
                              f"columns: {', '.join(rows[0])}")
        if rows and x not in rows[0] and x != "seconds":
            raise ConfigError("x", f"{d}/metrics.csv has no column {x!r}")
        xs, ys = [], []
        elapsed = 0.0
        for r in rows:
            elapsed += float(r.get("seconds", 0.0) or 0.0)
            xv = elapsed if x == "seconds" else float(r[x])
            yv = float(r[metric])
            if np.isfinite(yv):
                xs.append(xv)
                ys.append(100 * yv if metric in PERCENT else yv)
        groups[group_label(run_config(d), group_by)].append((np.array(xs), np.array(ys)))
    return dict(groups)


def group_label(cfg: dict[str, Any], group_by: str) -> str:
    """The curve label of a run: ``strategy`` shown bare, other keys as ``key=value`` (last part of
    a dotted key), comma-separated keys joined, e.g. ``"fedau, lr=0.1"``."""
    keys = [k.strip() for k in group_by.split(",") if k.strip()]
    return ", ".join(str(dotted(cfg, k)) if k == "strategy" else f"{k.split('.')[-1]}={dotted(cfg, k)}"
                     for k in keys)


def mean_band(runs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and std over runs on the longest run's x grid (interpolated; no extrapolation:
    a run contributes only inside its own x range)."""
    grid = max((x for x, _ in runs), key=len)
    ys = np.full((len(runs), len(grid)), np.nan)
    for i, (x, y) in enumerate(runs):
        if len(x):
            inside = (grid >= x.min()) & (grid <= x.max())
            ys[i, inside] = np.interp(grid[inside], x, y)
    with np.errstate(invalid="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return grid, np.nanmean(ys, axis=0), np.nanstd(ys, axis=0)


def plot_runs(run_dirs: Sequence[Path], *, metric: str = "test_accuracy", x: str = "round",
              group_by: str = "strategy", title: str | None = None, ax: Any = None) -> Any:
    """Draw the grouped mean ± std curves on ``ax`` (a new figure if None); return the axes."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 4.2), dpi=150)
    for label, runs in sorted(curves(run_dirs, metric, x, group_by).items()):
        grid, mean, std = mean_band(runs)
        n = len(runs)
        line, = ax.plot(grid, mean, label=f"{label} (n={n})" if n > 1 else label, linewidth=1.8)
        if n > 1:
            ax.fill_between(grid, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel(LABELS.get(x, x))
    ax.set_ylabel(LABELS.get(metric, metric))
    ax.grid(True, alpha=0.3)
    ax.legend(frameon=False, fontsize=8)
    if title:
        ax.set_title(title)
    return ax


def sweep_info(path: str | Path) -> dict[str, Any] | None:
    """The ``sweep.json`` of a sweep directory (grid keys and values), or None."""
    f = Path(path) / "sweep.json"
    if not f.is_file():
        return None
    import json

    return json.loads(f.read_text())


def sweep_defaults(keys: Sequence[str], panel_by: str | None = None, group_by: str | None = None
                   ) -> tuple[str | None, str]:
    """Panel and group keys for a sweep over grid ``keys``: panels by the first key other than
    seed/strategy, curves by the remaining keys but seed (strategy first; ``strategy`` if none),
    mean ± std over seeds. Given values are kept."""
    rest = [k for k in keys if k != "seed"]
    if panel_by is None:
        panel_by = next((k for k in rest if k != "strategy"), None)
    if group_by is None:
        others = [k for k in rest if k != panel_by]
        others.sort(key=lambda k: k != "strategy")
        group_by = ",".join(others) or "strategy"
    return panel_by, group_by


def plot_panels(run_dirs: Sequence[Path], *, panel_by: str | None, metric: str = "test_accuracy",
                x: str = "round", group_by: str = "strategy", title: str | None = None,
                order: Sequence[str] | None = None) -> Any:
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
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.9 * rows), dpi=150, sharey=True,
                             squeeze=False)
    for ax, value in zip(axes.flat, values, strict=False):
        sub = f"{panel_by} = {value}" if panel_by is not None else title
        plot_runs(panels[value], metric=metric, x=x, group_by=group_by, title=sub, ax=ax)
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
    from fedagg.io import atomic_write_bytes

    out = Path(out)
    if out.suffix.lower() not in (".png", ".pdf"):
        raise ConfigError("out", f"figure must end in .png or .pdf, got {out.name}")
    paths = []
    for suffix in (".png", ".pdf"):
        import io

        buf = io.BytesIO()
        fig.savefig(buf, format=suffix[1:], bbox_inches="tight")
        path = out.with_suffix(suffix)
        atomic_write_bytes(path, buf.getvalue())
        paths.append(path)
    return paths


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog="python -m simulations.plot", description=__doc__.split("\n\n")[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories (or directories holding runs)")
    parser.add_argument("--metric", default="test_accuracy", help="metrics.csv column (default test_accuracy)")
    parser.add_argument("--x", default="round", help="x axis: round (default), seconds or any column")
    parser.add_argument("--group-by", default=None, help="config key(s) naming a curve, comma-separated "
                        "(default strategy; for sweeps the grid keys but seed and the panel key)")
    parser.add_argument("--panel-by", default=None, help="config key: one panel per value (default none; "
                        "for sweeps the first grid key other than seed/strategy)")
    parser.add_argument("--title", default=None)
    parser.add_argument("--out", default="convergence.png", help="output .png (a .pdf is written beside it)")
    args = parser.parse_args(argv)
    try:
        import matplotlib.pyplot as plt

        runs = expand_runs(args.runs)
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
        group_by = group_by or "strategy"
        if panel_by is None:
            fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=150)
            plot_runs(runs, metric=args.metric, x=args.x, group_by=group_by, title=args.title, ax=ax)
        else:
            fig = plot_panels(runs, panel_by=panel_by, metric=args.metric, x=args.x, group_by=group_by,
                              title=args.title, order=order)
        paths = save_figure(fig, args.out)
        plt.close(fig)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
