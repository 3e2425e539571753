"""Atomic writes: complete files only, nothing left behind on failure, umask-respecting modes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fedagg.io import atomic_write_bytes, default_mode


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


def test_writes_bytes_and_creates_parent(tmp_path: Path) -> None:
    path = atomic_write_bytes(tmp_path / "a" / "b.bin", b"xyz")
    assert path.read_bytes() == b"xyz"
    assert sorted(p.name for p in path.parent.iterdir()) == ["b.bin"]


def test_mode_follows_umask_not_mkstemp(tmp_path: Path, umask_027: None) -> None:
    path = atomic_write_bytes(tmp_path / "m.bin", b"1")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert default_mode(0o777) == 0o750


def test_failed_write_leaves_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "keep.bin"
    path.write_bytes(b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(path, object())  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.bin"]
