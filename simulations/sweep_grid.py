"""Sweep specs: a base run config, a grid of values, and the cells it expands to (no I/O but reads).

A sweep file (``python -m simulations.sweep sweep.yaml``)::

    base: simulations/configs/my_run.yaml   # a run config file, or an inline mapping {rounds: 20, ...}
    overrides: {rounds: 10}                 # optional: dotted keys set in every cell
    grid:                                   # dotted config keys → lists of values (product)
      strategy: [fedavg, fedau]
      seed: [0, 1]
      participation.process: [bernoulli, markov]
    out: runs/sweeps/example                # default runs/sweeps/<file stem>
    cell_resources: {num_cpus: 1}           # Ray resources of one cell (one simulation)
    max_parallel: 4                         # cells at once (default: as many as resources allow)
    plot: {metric: test_accuracy, x: round, panel_by: participation.process, group_by: strategy}

A cell's config is ``{engine: inline}`` ← ``base`` ← ``overrides`` ← the cell's grid values, with
``out`` = ``<out>/cells/<cell name>``; every cell is validated with the run schema before anything
runs. A cell's name lists its values in grid order, ``strategy=fedau,seed=1``; values that do not
spell safely as a path (``/``, spaces, mappings, lists) are slugged and the name gets the first 8
hex digits of the SHA-256 of the cell's values (``aggregator=nnm-krum,seed=0-1a2b3c4d``), so names
are deterministic and unique.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedagg.errors import ConfigError
from simulations.core.config import (
    RunConfig,
    _pydantic_error,
    build_config,
    config_changes,
    read_yaml,
    set_dotted,
)

_SAFE = re.compile(r"[^A-Za-z0-9._+-]+")
_MAX_NAME = 150


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CellResources(_Strict):
    """Ray resources of one cell's task: CPUs, GPUs (fractions allowed), memory (bytes), custom."""

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    memory: int | None = Field(None, ge=0)
    resources: dict[str, float] = Field(default_factory=dict)

    def ray_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory is not None:
            opts["memory"] = self.memory
        if self.resources:
            opts["resources"] = dict(self.resources)
        return opts


class PlotSpec(_Strict):
    """The summary plot: ``metric`` against ``x``; one panel per value of ``panel_by`` (default:
    the first grid key other than seed/strategy), one curve per config but the seed (mean ± sample
    std over seeds), labelled by the ``group_by`` keys (comma-separated; default: the other grid
    keys but seed) and any other key that differs (see :mod:`simulations.plot`)."""

    metric: str = "test_accuracy"
    x: str = "round"
    panel_by: str | None = None
    group_by: str | None = None


class SweepSpec(_Strict):
    """The sweep file (see module docstring)."""

    base: str | dict[str, Any] | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]]
    out: str | None = None
    cell_resources: CellResources = Field(default_factory=CellResources)
    max_parallel: int | None = Field(None, ge=1)
    plot: PlotSpec = Field(default_factory=PlotSpec)


@dataclass
class Cell:
    """One grid point: its ``name``, grid ``params`` (key → value), validated ``config`` and ``dir``."""

    name: str
    params: dict[str, Any]
    config: RunConfig
    dir: Path
    data: dict[str, Any] = field(repr=False, default_factory=dict)


@dataclass
class Sweep:
    spec: SweepSpec
    base: dict[str, Any]
    out: Path
    cells: list[Cell]

    @property
    def keys(self) -> list[str]:
        return list(self.spec.grid)


def _slug(value: Any) -> tuple[str, bool]:
    """``(text, exact)``: the value as a path-safe string, and whether that spelling is lossless."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "null"
    elif isinstance(value, (int, float, str)):
        text = str(value)
    else:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"))
        return _SAFE.sub("-", text).strip("-") or "x", False
    safe = _SAFE.sub("-", text)
    return safe, safe == text and text not in ("", ".", "..")


def cell_name(params: Mapping[str, Any]) -> str:
    """Deterministic directory name of a cell (see module docstring)."""
    parts, exact = [], True
    for key, value in params.items():
        text, ok = _slug(value)
        parts.append(f"{key}={text}")
        exact = exact and ok
    name = ",".join(parts)
    if not exact or len(name) > _MAX_NAME:
        digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:8]
        name = f"{name[:_MAX_NAME]}-{digest}"
    return name


def _grid_field(exc: ConfigError, spec: SweepSpec) -> str:
    """Name the sweep key behind a cell's ConfigError: grid.<key>, overrides.<key> or base.<key>."""
    f = exc.field
    for key in spec.grid:
        if f == key or f.startswith(key + ".") or key.startswith(f + "."):
            return f"grid.{key}"
    for key in spec.overrides:
        if f == key or f.startswith(key + ".") or key.startswith(f + "."):
            return f"overrides.{key}"
    return f"base.{f}" if spec.base is not None else f


def parse_spec(data: Mapping[str, Any]) -> SweepSpec:
    """Validate a sweep mapping (unknown keys, types, grid values must be non-empty lists)."""
    if not isinstance(data.get("grid"), dict) or not data["grid"]:
        raise ConfigError("grid", "give a mapping of config keys to lists of values, "
                          "e.g. {strategy: [fedavg, fedau], seed: [0, 1]}")
    for key, values in data["grid"].items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid.{key}", f"must be a non-empty list of values, got {values!r}")
        seen = [json.dumps(v, sort_keys=True, default=str) for v in values]
        if len(set(seen)) != len(seen):
            raise ConfigError(f"grid.{key}", f"repeats a value: {values!r}")
        if key == "out" or key.startswith("out."):
            raise ConfigError(f"grid.{key}", "the sweep sets each cell's out")
    if "out" in (data.get("overrides") or {}):
        raise ConfigError("overrides.out", "the sweep sets each cell's out; set the sweep's own `out`")
    try:
        return SweepSpec.model_validate(dict(data))
    except ValidationError as exc:
        raise _pydantic_error(exc, SweepSpec) from None


def load_sweep(path: str | Path | None = None, data: Mapping[str, Any] | None = None,
               out: str | Path | None = None) -> Sweep:
    """Read, expand and validate a sweep (from a file, or a mapping ``data``).

    Every cell's config is validated; the first invalid one raises ``ConfigError`` naming the
    sweep key (``grid.<key>``, ``overrides.<key>``, ``base.<key>``) and the cell. Nothing is written.
    """
    if data is None:
        if path is None:
            raise ValueError("give a path or a mapping")
        data = read_yaml(path)
    spec = parse_spec(data)
    if isinstance(spec.base, str):
        base = read_yaml(spec.base)
    else:
        base = copy.deepcopy(spec.base or {})
    default_out = Path("runs") / "sweeps" / (Path(path).stem if path is not None else "sweep")
    root = Path(out or spec.out or default_out).resolve()
    cells: list[Cell] = []
    keys = list(spec.grid)
    for combo in itertools.product(*(spec.grid[k] for k in keys)):
        params = dict(zip(keys, combo, strict=True))
        name = cell_name(params)
        cfg_data: dict[str, Any] = {"engine": "inline", **copy.deepcopy(base)}
        cfg_data.pop("out", None)
        try:
            for key, value in {**spec.overrides, **params}.items():
                set_dotted(cfg_data, key, copy.deepcopy(value))
            cfg_data["out"] = str(root / "cells" / name)
            cfg = build_config(cfg_data)
        except ConfigError as exc:
            raise ConfigError(_grid_field(exc, spec), f"{exc.message} (cell {name})") from None
        cells.append(Cell(name, params, cfg, root / "cells" / name, cfg_data))
    names = [c.name for c in cells]
    if len(set(names)) != len(names):  # only if two values slug to the same hashed text
        raise ConfigError("grid", "two cells would share a directory name; rename a value")
    return Sweep(spec, base, root, cells)


def config_difference(expected: RunConfig, found: Mapping[str, Any]) -> str | None:
    """The first key (dotted) where a finished cell's ``config.yaml`` differs from ``expected``
    (``out`` ignored: a sweep directory may move), or None."""
    want = expected.model_dump(mode="json")
    try:
        have = RunConfig.model_validate(dict(found)).model_dump(mode="json")
    except ValidationError:
        return "config.yaml (not a valid run config)"
    changes = [c for c in config_changes(want, have) if c[0] != "out"]
    if not changes:
        return None
    key, old, new = changes[0]
    return f"{key}: {old!r} → {new!r}"
