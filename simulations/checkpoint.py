"""Checkpoints: everything needed to continue a run bit-for-bit.

``RUN_DIR/checkpoints/round-000010/`` holds

- ``global.safetensors`` — the global model (federated state) after round 10;
- ``strategy.safetensors`` + ``strategy.json`` — the strategy's ``state_dict()`` (arrays in
  safetensors, anything else as JSON): FedAU estimator, MIFA/FedVarp memories, centered-clipping
  momentum, soups, Flower FedOpt moments, …;
- ``state.json`` — the round, the participation process state (incl. its ``RandomState``) and the
  metrics rows so far.

All other randomness is keyed by ``(seed, purpose, round, client)`` and needs no state. A checkpoint
directory is written under a temporary name and renamed into place, then ``checkpoints/latest``
is updated atomically; older checkpoints beyond ``keep`` are removed. A run killed at any moment
therefore always has a complete latest checkpoint (or none).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fedagg.errors import ConfigError
from fedagg.io import default_mode
from simulations.results import atomic_write_text, load_arrays, save_arrays

FORMAT = 1


@dataclasses.dataclass
class Checkpoint:
    """The state of a run after ``round``."""

    round: int
    arrays: dict[str, np.ndarray]
    strategy_state: dict[str, Any]
    process_state: dict[str, Any] | None
    rows: list[dict[str, Any]]


# ---------------------------------------------------------------------------- JSON with arrays
def to_jsonable(obj: Any) -> Any:
    """Nested dicts/lists/scalars/arrays → JSON-compatible values (arrays tagged with dtype)."""
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype), "shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return {"__float__": repr(obj)}
    return obj


def from_jsonable(obj: Any) -> Any:
    """Inverse of :func:`to_jsonable`."""
    if isinstance(obj, dict):
        if "__ndarray__" in obj:
            return np.array(obj["__ndarray__"], dtype=obj["dtype"]).reshape(obj["shape"])
        if "__float__" in obj:
            return float(obj["__float__"])
        return {k: from_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_jsonable(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------- write / read
def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def write_checkpoint(run_dir: str | Path, ckpt: Checkpoint, keep: int = 2) -> Path:
    """Write ``ckpt`` atomically; keep the newest ``keep`` checkpoints. Returns its directory."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"round-{ckpt.round:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    try:
        tmp.chmod(default_mode(0o777))  # mkdtemp's 0o700 would make the checkpoint private
        save_arrays(tmp / "global.safetensors", ckpt.arrays)
        arrays = {k: v for k, v in ckpt.strategy_state.items() if isinstance(v, np.ndarray)}
        others = {k: v for k, v in ckpt.strategy_state.items() if not isinstance(v, np.ndarray)}
        save_arrays(tmp / "strategy.safetensors", arrays)
        atomic_write_text(tmp / "strategy.json", json.dumps(to_jsonable(others)))
        state = {"format": FORMAT, "round": ckpt.round, "process": to_jsonable(ckpt.process_state),
                 "rows": to_jsonable(ckpt.rows)}
        atomic_write_text(tmp / "state.json", json.dumps(state))
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / "latest", name + "\n")
    for old in sorted(p for p in root.glob("round-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_latest(run_dir: str | Path) -> Checkpoint:
    """The newest complete checkpoint of ``run_dir`` (ConfigError if there is none)."""
    root = checkpoint_root(run_dir)
    latest = root / "latest"
    if not latest.is_file():
        raise ConfigError("resume", f"{run_dir} has no checkpoint (was --checkpoint-every set?)")
    path = root / latest.read_text().strip()
    state = json.loads((path / "state.json").read_text())
    if state.get("format") != FORMAT:
        raise ConfigError("resume", f"checkpoint format {state.get('format')} is not supported")
    strategy_state: dict[str, Any] = dict(load_arrays(path / "strategy.safetensors"))
    strategy_state.update(from_jsonable(json.loads((path / "strategy.json").read_text())))
    return Checkpoint(
        round=int(state["round"]),
        arrays=load_arrays(path / "global.safetensors"),
        strategy_state=strategy_state,
        process_state=from_jsonable(state["process"]),
        rows=from_jsonable(state["rows"]),
    )
