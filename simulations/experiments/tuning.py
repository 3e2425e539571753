"""Tuning and headline helpers shared by the study drivers (learning rates tuned per method on a
seed the table does not use; a late-window headline; paired gaps; plateau and collapse checks).

A study config names, per method, a ``tune`` grid (``{key: [values]}``, ``key`` one of
:data:`TUNABLE`), and a ``tuning`` section: ``seed`` (not a table seed), ``rounds`` (default the
table's) and the grid cell tuning runs on (``each`` or one cell's name; the key of that field is
the study's axis, e.g. ``pattern`` for FedAU, ``level`` for FedIns). Tuning runs every value once;
the value with the best headline (:func:`late_mean`: the mean test accuracy over the last
``last_rounds`` rounds) is used for the table.

These helpers take the axis name as an argument, so any driver can use them;
:mod:`~simulations.experiments.fedins`, :mod:`~simulations.experiments.fedau` and
:mod:`~simulations.experiments.robust` use them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedagg.errors import ConfigError
from simulations import gridrun
from simulations.report import mean_std, table

#: Keys a method's ``tune`` grid may name.
TUNABLE = ("lr", "server_lr")


# ------------------------------------------------------------------------------ config
def check_tune(field: str, over: Mapping[str, Any],
               tunable: Sequence[str] = TUNABLE) -> tuple[str, list[float]]:
    """``(key, values)`` of a cell's ``tune`` grid ``over["tune"]`` (``{key: [values]}``, ``key``
    one of ``tunable``, at least two distinct positive values, ``key`` not also set by the cell);
    ConfigError naming ``field`` (e.g. ``methods.fedau.tune``) otherwise."""
    spec = over["tune"]
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise ConfigError(field, f"one key to tune, one of {', '.join(tunable)}, with its values")
    key, values = next(iter(spec.items()))
    if key not in tunable:
        raise ConfigError(f"{field}.{key}", f"cannot be tuned; allowed: {', '.join(tunable)}")
    if key in over:
        raise ConfigError(f"{field}.{key}", f"the cell also sets {key}, which tuning replaces; "
                          "drop one of them")
    ok = isinstance(values, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
        for v in values)
    if not ok or len(values) < 2 or len(set(values)) != len(values):
        raise ConfigError(f"{field}.{key}", "a list of at least two distinct positive numbers "
                          f"(got {values!r}); one value tunes nothing, set {key} directly")
    return key, [float(v) for v in values]


def tune_grids(methods: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[str, list[float]]]:
    """``{method: (key, values)}`` of every method with a ``tune`` grid (checked)."""
    return {m: check_tune(f"methods.{m}.tune", over) for m, over in methods.items() if "tune" in over}


def check_tuning(spec: Any, seeds: Sequence[int], rounds: int, axis: str,
                 cells: Sequence[str]) -> dict[str, Any]:
    """The ``tuning`` section with defaults filled in: ``seed`` (required, not one of ``seeds``),
    ``rounds`` (default ``rounds``, the table's) and ``axis`` (``each`` or one of ``cells``;
    default ``each``). ConfigError naming the field otherwise."""
    if not isinstance(spec, Mapping):
        raise ConfigError("tuning", f"a mapping with seed, rounds, {axis}")
    allowed = sorted({"seed", "rounds", axis})
    extra = sorted(set(spec) - set(allowed))
    if extra:
        raise ConfigError(f"tuning.{extra[0]}", f"unknown key; allowed: {', '.join(allowed)}")
    seed = spec.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError("tuning.seed", f"required, an integer >= 0 (got {seed!r})")
    if seed in seeds:
        raise ConfigError("tuning.seed", f"{seed} is also a table seed; tune on a seed the table "
                          "does not use")
    n = spec.get("rounds", rounds)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError("tuning.rounds", f"must be an integer >= 1 (got {n!r})")
    where = spec.get(axis, "each")
    if where != "each" and where not in cells:
        raise ConfigError(f"tuning.{axis}", f"{where!r}; allowed: each, " + ", ".join(cells))
    return {"seed": seed, "rounds": n, axis: where}


def check_pairing(exp: dict[str, Any], tuned: Sequence[str], group: str, noun: str,
                  check: Callable[[Any], dict[str, Any]], fields: str) -> None:
    """A ``tuning`` section and ``tune`` grids come together: the section, if any, is replaced by
    ``check(section)``; ConfigError if there is a section but no grid, or grids (``tuned``: the
    names under ``group``, e.g. the ``methods`` with a grid; ``noun``: ``method``) but no section
    (``fields``: what the section holds, for the message)."""
    if exp.get("tuning") is not None:
        exp["tuning"] = check(exp["tuning"])
        if not tuned:
            raise ConfigError("tuning", f"no {noun} has a `tune` grid; add one or drop `tuning`")
    elif tuned:
        raise ConfigError(f"{group}.{tuned[0]}.tune",
                          f"a tune grid needs a `tuning` section ({fields})")


def check_last_rounds(last: Any, base: Mapping[str, Any], lengths: Mapping[str, int]) -> int:
    """``last_rounds`` checked: an integer >= 1, at most each of ``lengths`` (``{where: rounds}``),
    and every one of the last ``last`` rounds evaluated by ``base`` at that length
    (``eval_every`` 1, or ``eval_last >= last``)."""
    from simulations.core.config import RunConfig

    if not isinstance(last, int) or isinstance(last, bool) or last < 1:
        raise ConfigError("last_rounds", f"must be an integer >= 1 (got {last!r})")
    for where, rounds in lengths.items():
        if last > rounds:
            raise ConfigError("last_rounds", f"{last} is more than {where}={rounds}")
        cfg = RunConfig.model_validate({**base, "rounds": rounds, "out": None})
        if not all(cfg.evaluates(r) for r in range(rounds - last + 1, rounds + 1)):
            raise ConfigError("last_rounds", f"the last {last} rounds are not all evaluated "
                              f"(base.eval_every={cfg.eval_every}, base.eval_last="
                              f"{cfg.eval_last}); set base.eval_last >= {last}")
    return last


# ------------------------------------------------------------------------------ metrics
def late_mean(rounds: np.ndarray, acc: np.ndarray, last: int, end: float | None = None) -> float:
    """Mean of the evaluated accuracies in the ``last`` rounds up to round ``end`` (default the
    last round): rounds ``end − last < r ≤ end``; NaN if none was evaluated there."""
    end = float(rounds[-1]) if end is None else end
    sel = (rounds > end - last) & (rounds <= end)
    return float(np.mean(acc[sel])) if sel.any() else float("nan")


def tuning_score(run_dir: Path, last: int) -> float:
    """The headline (:func:`late_mean` over the last ``last`` rounds) of a finished tuning run, or
    NaN for a run the runner stopped (no ``summary.json``)."""
    from simulations.experiments import grid

    if not gridrun.finished(run_dir):
        return float("nan")
    rounds, acc = grid.run_curve(run_dir)
    return late_mean(rounds, acc, last)


def diverged(run_dir: Path) -> bool:
    """Whether the run's final global model (``model.safetensors``) has a non-finite parameter."""
    from simulations.core.results import load_arrays

    return not all(np.isfinite(a).all() for a in load_arrays(run_dir / "model.safetensors").values())


def collapsed(acc: np.ndarray, headline: float, run_dir: Path) -> bool:
    """Whether a run broke down: its headline is below half of its best evaluated accuracy
    (``acc``: every evaluation), or its final model is not finite (:func:`diverged`)."""
    return bool(headline < 0.5 * float(np.max(acc))) or diverged(run_dir)


def choose(values: Sequence[float], scores: Sequence[float]) -> float:
    """The value with the best score (NaN scores: failed runs, skipped); ConfigError if all
    failed."""
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0 or np.isnan(s).all():
        raise ConfigError("tuning", "every value of a grid failed; lower it")
    return float(values[int(np.nanargmax(s))])


def paired_gap(results: Mapping[str, Any], cell: str, a: str, b: str,
               key: str = "headline") -> np.ndarray | None:
    """Per-seed ``results[cell][a][key] − results[cell][b][key]`` in points, over the seeds both
    ran (ascending), or None."""
    cells = results.get(cell, {})
    if a not in cells or b not in cells:
        return None
    ha = dict(zip(cells[a]["seeds"], cells[a][key], strict=True))
    hb = dict(zip(cells[b]["seeds"], cells[b][key], strict=True))
    common = sorted(set(ha) & set(hb))
    return 100 * np.array([ha[s] - hb[s] for s in common]) if common else None


def gap_text(g: np.ndarray | None) -> str:
    """``+1.2 ± 0.3`` (:func:`~simulations.report.mean_std`, signed, points); the mean alone for
    one seed; ``–`` for none."""
    return mean_std(g, signed=True)


# ------------------------------------------------------------------------------ tables
def tuning_table(methods: Sequence[str], tuning: Mapping[str, Any]) -> str:
    """Markdown: per method and tuned cell the chosen value and the score of each value tried
    (``tuning[cell][method]`` = ``{key, values, scores, chosen}``; chosen in bold; a choice at
    the edge of the grid is marked †)."""
    cols = list(tuning)
    methods = [m for m in methods if m in tuning[cols[0]]]
    rows = []
    for m in methods:
        c0 = tuning[cols[0]][m]
        cells = []
        for col in cols:
            c = tuning[col][m]
            edge = c["chosen"] in (c["values"][0], c["values"][-1])
            scores = " / ".join("–" if math.isnan(s) else
                                (f"**{100 * s:.1f}**" if v == c["chosen"] else f"{100 * s:.1f}")
                                for v, s in zip(c["values"], c["scores"], strict=True))
            cells.append(f"**{c['chosen']:g}**{' †' if edge else ''} ({scores})")
        rows.append([m, f"`{c0['key']}`", ", ".join(f"{v:g}" for v in c0["values"]), *cells])
    return table(["method", "tuned", "values", *cols], rows)
