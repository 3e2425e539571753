"""Atomic file writes shared by the data cache, the backbone cache and the run directory."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def default_mode(base: int = 0o666) -> int:
    """``base`` minus the process umask: the mode ``open``/``mkdir`` would give (``0o777`` for folders)."""
    # os.umask can only be read by setting it; it is restored at once.
    mask = os.umask(0o022)
    os.umask(mask)
    return base & ~mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, durable: bool = True) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder + rename.

    Readers never see a partial file, an interrupted write leaves nothing behind, and the file gets
    the permissions a plain ``open(path, "w")`` would give (``0o666`` minus the umask), not
    ``mkstemp``'s private ``0o600``. ``durable`` also fsyncs before the rename (survives a power
    loss); files rewritten often while a run goes on (metrics) skip it: the rename alone is atomic.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def cannot_create_dir(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be (or be used as) a writable directory, or None when it can.

    Finds the nearest existing ancestor (``path`` itself if it exists): it must be a directory in
    which a directory can be created, which is tested by creating and removing an empty temporary
    directory there (permission bits alone do not tell, e.g. for root under ``/proc``). Nothing is
    left on disk.
    """
    target = Path(os.path.abspath(path))
    base = target
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        return f"{base} is a file, not a directory"
    try:
        probe = tempfile.mkdtemp(dir=base, prefix=".fedagg-probe-")
    except OSError as exc:
        return f"cannot create a directory in {base} ({exc.strerror or type(exc).__name__})"
    os.rmdir(probe)
    return None
