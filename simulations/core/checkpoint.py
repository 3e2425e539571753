"""Checkpoints: everything needed to continue a run bit-for-bit.

``RUN_DIR/checkpoints/round-000010/`` holds

- ``global.safetensors`` — the global model (federated state) after round 10;
- ``strategy.safetensors`` + ``strategy.json`` — the strategy's ``state_dict()`` (arrays in
  safetensors, anything else as JSON): FedAU estimator, MIFA/FedVarp memories, centered-clipping
  momentum, soups, Flower FedOpt moments, …;
- ``state.json`` — the round, the participation process state (incl. its ``RandomState``) and the
  metrics rows so far;
- ``sha256sums`` — the SHA-256 of the four files above (``sha256sum -c sha256sums`` checks them).

All other randomness is keyed by ``(seed, purpose, round, client)`` and needs no state. A checkpoint
directory is written under a temporary name and renamed into place, then ``checkpoints/latest``
is updated atomically; older checkpoints beyond ``keep`` are removed. A run killed at any moment
therefore always has a complete latest checkpoint (or none).

:func:`read_latest` verifies the checksums and falls back to the newest intact checkpoint when a
newer one (or ``latest``) is damaged, saying so in one warning line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fedagg.errors import ConfigError
from fedagg.io import default_mode
from simulations.core.results import atomic_write_text, load_arrays, save_arrays

#: Format 2 adds ``sha256sums``; format 1 checkpoints (without it) are still read, unverified.
FORMAT = 2
SUMS = "sha256sums"
FILES = ("global.safetensors", "strategy.safetensors", "strategy.json", "state.json")
_NAME = re.compile(r"round-\d+")

log = logging.getLogger("fedagg")


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
        atomic_write_text(tmp / SUMS, "".join(f"{_sha256(tmp / f)}  {f}\n" for f in FILES))
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


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verify(path: Path) -> None:
    """Check the files of checkpoint directory ``path`` against its ``sha256sums`` (ValueError
    naming the first bad file). A format-1 checkpoint has no sums and passes."""
    sums = path / SUMS
    if not sums.is_file():
        if json.loads((path / "state.json").read_text()).get("format") == 1:
            return
        raise ValueError(f"{SUMS} is missing")
    listed: dict[str, str] = {}
    for line in sums.read_text().splitlines():
        digest, _, name = line.partition("  ")
        listed[name] = digest
    for name in FILES:
        if name not in listed:
            raise ValueError(f"{SUMS} does not list {name}")
        if not (path / name).is_file():
            raise ValueError(f"{name} is missing")
        if _sha256(path / name) != listed[name]:
            raise ValueError(f"{name} does not match its checksum")


def read_checkpoint(path: Path) -> Checkpoint:
    """The checkpoint in directory ``path`` (``round-NNNNNN``), verified; ValueError if damaged."""
    verify(path)
    state = json.loads((path / "state.json").read_text())
    if state.get("format") not in (1, FORMAT):
        raise ValueError(f"checkpoint format {state.get('format')} is not supported")
    if state.get("round") != int(path.name.split("-")[1]):
        raise ValueError(f"state.json says round {state.get('round')}")
    strategy_state: dict[str, Any] = dict(load_arrays(path / "strategy.safetensors"))
    strategy_state.update(from_jsonable(json.loads((path / "strategy.json").read_text())))
    return Checkpoint(
        round=int(state["round"]),
        arrays=load_arrays(path / "global.safetensors"),
        strategy_state=strategy_state,
        process_state=from_jsonable(state["process"]),
        rows=from_jsonable(state["rows"]),
    )


def read_latest(run_dir: str | Path) -> Checkpoint:
    """The newest intact checkpoint of ``run_dir``.

    Damaged newer checkpoints and a ``latest`` that does not name the one used are reported in one
    warning line; ConfigError (``resume``) when there is no checkpoint or none is intact.
    """
    root = checkpoint_root(run_dir)
    found = [p for p in root.glob("round-*") if _NAME.fullmatch(p.name) and p.is_dir()]
    if not found:
        raise ConfigError("resume", f"{run_dir} has no checkpoint (was --checkpoint-every set?)")
    damaged: list[str] = []
    for path in sorted(found, key=lambda p: int(p.name.split("-")[1]), reverse=True):
        try:
            ckpt = read_checkpoint(path)
        except Exception as exc:  # any unreadable part makes the checkpoint unusable
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            damaged.append(f"{path.name} ({why})")
            continue
        problems = [f"damaged checkpoint {d}" for d in damaged]
        try:
            pointer: str | None = (root / "latest").read_text().strip()
        except (OSError, UnicodeDecodeError):
            pointer = None
        if pointer != path.name and not any(d.startswith(f"{pointer} (") for d in damaged):
            problems.append("checkpoints/latest is missing or unreadable" if pointer is None
                            else f"checkpoints/latest names {pointer[:40]!r}")
        if problems:
            log.warning("%s; resuming from %s", "; ".join(problems), path.name)
        return ckpt
    raise ConfigError("resume", f"no intact checkpoint in {root} ({'; '.join(damaged)}); "
                      "start the run again with --out and --overwrite")
