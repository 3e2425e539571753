"""The run directory, written atomically.

A run directory holds ``config.yaml`` (the resolved config), ``metrics.csv`` (one row per round),
``model.safetensors`` (the final global model), ``summary.json`` (written last: its presence marks a
finished run) and ``checkpoints/`` when checkpointing is on. Every file is written to a temporary
file in the same directory and renamed into place, so an interrupted run never leaves a truncated
file: after Ctrl-C the directory holds the config and the metrics of the completed rounds only.

A running run holds an exclusive lock on its directory (:class:`RunLock`), so a second run with
the same ``--out`` stops at once. A new run starts only in a new or empty directory; ``overwrite``
first clears a *run* directory (:func:`is_run_dir`, or one holding nothing but :data:`RUN_FILES`)
and never touches any other folder.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from fedagg.errors import ConfigError
from fedagg.io import atomic_write_bytes, default_mode

#: Longest a logged metrics row waits before ``metrics.csv`` is rewritten (seconds).
METRICS_WRITE_SECONDS = 1.0

#: Leading columns of metrics.csv, in this order; strategy-specific columns follow.
BASE_COLUMNS = ("round", "phase", "clients", "train_loss", "test_loss", "test_accuracy", "seconds")


def atomic_write_text(path: str | Path, text: str, *, durable: bool = True) -> None:
    atomic_write_bytes(path, text.encode(), durable=durable)


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


#: The file a running run locks (``fcntl.flock``) in its directory; it holds the pid.
LOCK_NAME = ".lock"

#: What a run directory may hold: the runner's files and the side files drivers put there
#: (``simulations.sweep``: cell.json, error.txt; ``simulations.experiments``: failed.json,
#: participation.safetensors).
RUN_FILES = frozenset({
    "config.yaml", "metrics.csv", "model.safetensors", "summary.json", "strategy_state.safetensors",
    "checkpoints", "cell.json", "error.txt", "failed.json", "participation.safetensors",
})


def _leftover(name: str) -> bool:
    """The lock file or the temporary file of an interrupted atomic write: not content."""
    return name == LOCK_NAME or (name.startswith(".") and name.endswith(".tmp"))


def is_run_dir(path: Path) -> bool:
    """``path`` holds a run's ``config.yaml`` (a mapping with ``strategy`` and ``rounds``) and its
    ``metrics.csv``, ``summary.json`` or ``checkpoints/``."""
    try:
        config = yaml.safe_load((path / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return (isinstance(config, dict) and {"strategy", "rounds"} <= config.keys()
            and any((path / n).exists() for n in ("metrics.csv", "summary.json", "checkpoints")))


def dir_kind(path: Path) -> str:
    """What ``path`` holds: ``new`` (missing, or nothing but leftovers), ``finished``
    (summary.json), ``interrupted`` (checkpoints), ``unfinished`` (other run files) or ``foreign``
    (not a run directory)."""
    if not path.exists():
        return "new"
    names = {p.name for p in path.iterdir() if not _leftover(p.name)}
    if not names:
        return "new"
    if not (names <= RUN_FILES or is_run_dir(path)):
        return "foreign"
    if "summary.json" in names:
        return "finished"
    if any((path / "checkpoints").glob("round-*")):
        return "interrupted"
    return "unfinished"


def locked_by(path: Path) -> str | None:
    """``"pid N"`` when a live run holds ``path``'s lock, else None (probes; writes nothing)."""
    try:
        fd = os.open(path / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.read(fd, 32).decode(errors="replace").strip()
        return f"pid {pid if pid.isdigit() else 'unknown'}"
    finally:
        os.close(fd)  # also drops the probe's lock
    return None


class RunLock:
    """An exclusive ``fcntl.flock`` on ``run_dir/.lock``, held until :meth:`release`.

    The OS drops the lock when the process ends, a crash included, so a dead run never blocks the
    next one. The file holds the holder's pid and is removed on release; an acquirer that locked
    a file removed in the meantime retries on the new one.
    """

    def __init__(self, run_dir: Path, field: str = "out") -> None:
        self.path = run_dir / LOCK_NAME
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, default_mode())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ConfigError(field, in_use(run_dir)) from None
            try:
                st = os.stat(self.path)
                same = (st.st_dev, st.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd: int | None = fd

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if getattr(self, "_fd", None) is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None

    __del__ = release  # a run that is built but never run does not keep its directory locked


def in_use(path: Path) -> str:
    """The refusal text for a locked ``path``."""
    return (f"{path} is in use by another run ({locked_by(path) or 'pid unknown'}); "
            "wait for it to end or choose another --out")


def clear_run_dir(path: Path) -> None:
    """Delete everything in ``path`` but the lock file (symlinks are removed, not followed)."""
    for entry in path.iterdir():
        if entry.name == LOCK_NAME:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


class RunWriter:
    """Writes one run directory (see module docstring), holding its lock until :meth:`close`."""

    def __init__(self, run_dir: str | Path, *, overwrite: bool = False, resume: bool = False) -> None:
        self.dir = Path(run_dir)
        self.check(self.dir, overwrite=overwrite, resume=resume)
        created = not self.dir.exists()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lock = RunLock(self.dir, "resume" if resume else "out")
        try:
            self.check(self.dir, overwrite=overwrite, resume=resume, held=True)  # again, locked
            if overwrite:
                clear_run_dir(self.dir)
        except BaseException:
            self.close()
            if created:
                self.dir.rmdir()
            raise
        self.rows: list[dict[str, Any]] = []
        self._written = 0  # rows in metrics.csv on disk
        self._last_write = 0.0

    @staticmethod
    def check(run_dir: str | Path, *, overwrite: bool = False, resume: bool = False,
              held: bool = False) -> str:
        """Refuse a directory a new run (or, with ``resume``, a resumed one) must not write to;
        return its :func:`dir_kind`. Raises ConfigError naming ``out``, ``resume`` or ``overwrite``.
        ``held``: the caller holds the directory's lock (it is not probed)."""
        path = Path(run_dir)
        field = "resume" if resume else "out"
        if overwrite and resume:
            raise ConfigError("overwrite", "--overwrite starts the run again and --resume continues "
                              "it; pass one of them")
        if path.exists() and not path.is_dir():
            raise ConfigError(field, f"{path} exists and is not a directory; choose another --out")
        if not held and locked_by(path) is not None:
            raise ConfigError(field, in_use(path))
        kind = dir_kind(path)
        if resume:
            if not (path / "config.yaml").is_file():
                raise ConfigError("resume", f"{path} is not a run directory (no config.yaml)")
            if kind == "finished":
                raise ConfigError("resume", f"{path} is a finished run, there is nothing to resume; "
                                  "run it again with --out and --overwrite, or choose another --out")
            return kind
        if kind == "new" or (overwrite and kind != "foreign"):
            return kind
        if kind == "foreign":
            if overwrite:
                names = ", ".join(sorted(p.name for p in path.iterdir()
                                         if p.name not in RUN_FILES and not _leftover(p.name))[:3])
                raise ConfigError("overwrite", f"{path} is not a run directory (it holds {names}); "
                                  "--overwrite only clears run directories: choose another --out")
            raise ConfigError("out", f"{path} is not empty and is not a run directory; "
                              "choose a new or empty --out")
        what = {"finished": "already holds a finished run; pass --overwrite to replace it",
                "interrupted": f"holds an interrupted run with checkpoints; pass --resume {path} "
                               "to continue it or --overwrite to discard it",
                "unfinished": "holds an unfinished run without checkpoints; "
                              "pass --overwrite to replace it"}[kind]
        raise ConfigError("out", f"{path} {what}, or choose another --out")

    def close(self) -> None:
        """Write pending metrics rows, then release the directory's lock (idempotent)."""
        try:
            if self.dir.is_dir():
                self.flush()
        finally:
            self.lock.release()

    def write_config(self, yaml_text: str) -> None:
        atomic_write_text(self.dir / "config.yaml", yaml_text)

    def log_round(self, row: Mapping[str, Any]) -> None:
        """Append a row; ``metrics.csv`` is rewritten (atomically) at most every
        :data:`METRICS_WRITE_SECONDS` while a run goes on, and by :meth:`flush`, which checkpoints,
        the end of the run and an interrupted run call: rewriting it every round costs O(rounds²)."""
        self.rows.append(dict(row))
        if time.monotonic() - self._last_write >= METRICS_WRITE_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Rewrite ``metrics.csv`` with every row logged so far (no-op when it is up to date)."""
        if self._written == len(self.rows) and (self.dir / "metrics.csv").exists():
            return
        atomic_write_text(self.dir / "metrics.csv", metrics_to_csv(self.rows), durable=False)
        self._written = len(self.rows)
        self._last_write = time.monotonic()

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
