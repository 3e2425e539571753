"""The run directory, written atomically.

A run directory holds ``config.yaml`` (the resolved config), ``metrics.csv`` (one row per round),
``model.safetensors`` (the final global model), ``summary.json`` (written last: its presence marks a
finished run) and ``checkpoints/`` when checkpointing is on. Every file is written to a temporary
file in the same directory and renamed into place, so an interrupted run never leaves a truncated
file: after Ctrl-C the directory holds the config and the metrics of the completed rounds only.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from fedagg.errors import ConfigError
from fedagg.io import atomic_write_bytes

#: Leading columns of metrics.csv, in this order; strategy-specific columns follow.
BASE_COLUMNS = ("round", "phase", "clients", "train_loss", "test_loss", "test_accuracy", "seconds")


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_arrays(path: str | Path, arrays: Mapping[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """``{name: array}`` → a ``.safetensors`` file (atomically)."""
    contiguous = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    atomic_write_bytes(path, st_save(contiguous, metadata=metadata))


def load_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """A ``.safetensors`` file → ``{name: array}`` (no pickle involved)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("model", f"file not found: {p}")
    return dict(st_load(p.read_bytes()))


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return repr(round(value, 10)) if abs(value) < 1e15 else repr(value)
    return value


def metrics_to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows → CSV text with :data:`BASE_COLUMNS` first, then other keys in first-seen order."""
    cols = list(BASE_COLUMNS)
    for row in rows:
        for key in row:
            if key not in cols:
                cols.append(key)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(row.get(k, "")) for k in cols})
    return buf.getvalue()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """``metrics.csv`` of a run as a list of dicts (numbers parsed; empty cells → NaN)."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        raise ConfigError("run_dir", f"{run_dir} has no metrics.csv (not a run directory?)")
    rows = []
    with path.open() as fh:
        for raw in csv.DictReader(fh):
            row: dict[str, Any] = {}
            for k, v in raw.items():
                if v is None or v == "":
                    row[k] = float("nan")
                    continue
                try:
                    row[k] = int(v)
                except ValueError:
                    try:
                        row[k] = float(v)
                    except ValueError:
                        row[k] = v
            rows.append(row)
    return rows


class RunWriter:
    """Writes one run directory (see module docstring)."""

    def __init__(self, run_dir: str | Path, *, overwrite: bool = False, resume: bool = False) -> None:
        self.dir = Path(run_dir)
        self.check(self.dir, overwrite=overwrite or resume)
        self.dir.mkdir(parents=True, exist_ok=True)
        if overwrite and not resume:
            for name in ("summary.json", "metrics.csv", "model.safetensors"):
                (self.dir / name).unlink(missing_ok=True)
        self.rows: list[dict[str, Any]] = []

    @staticmethod
    def check(run_dir: str | Path, *, overwrite: bool = False) -> None:
        """Refuse a path that is a file, or a finished run unless ``overwrite``."""
        path = Path(run_dir)
        if path.exists() and not path.is_dir():
            raise ConfigError("out", f"{path} exists and is not a directory")
        if (path / "summary.json").exists() and not overwrite:
            raise ConfigError("out", f"{path} already holds a finished run; pass --overwrite or choose another --out")

    def write_config(self, yaml_text: str) -> None:
        atomic_write_text(self.dir / "config.yaml", yaml_text)

    def log_round(self, row: Mapping[str, Any]) -> None:
        """Append a row and rewrite ``metrics.csv`` atomically."""
        self.rows.append(dict(row))
        atomic_write_text(self.dir / "metrics.csv", metrics_to_csv(self.rows))

    def write_model(self, arrays: Mapping[str, np.ndarray], metadata: dict[str, str] | None = None) -> Path:
        path = self.dir / "model.safetensors"
        save_arrays(path, arrays, metadata)
        return path

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        atomic_write_text(self.dir / "summary.json", json.dumps(summary, indent=2, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
