"""Engines as context managers: ``with engine.open(cfg, runtime) as grid`` hands out a working grid
and releases everything it started when the block ends, also when the block raises; the engine
package never imports the runner."""

from __future__ import annotations

import ast
import os
import time
from pathlib import Path

import pytest
from flwr.app import Message, MessageType, RecordDict

from simulations.core.client_app import ClientRuntime
from simulations.core.config import load_config
from simulations.core.engine import ENGINES, InlineEngine, RayEngine, get_engine, reaper

ROOT = Path(__file__).resolve().parents[3]
SMALL = {"num_clients": 4, "model": "mlp", "dataset_args": {"num_samples": 600}}


def setup(tmp_path: Path, **over):
    cfg = load_config(None, {**SMALL, "out": str(tmp_path / "run"), **over})
    return cfg, ClientRuntime(cfg)


def queries(n: int) -> list[Message]:
    return [Message(RecordDict(), c, MessageType.QUERY) for c in range(n)]


def client_ids(replies) -> list[int]:
    return sorted(int(next(iter(r.content.metric_records.values()))["client-id"]) for r in replies)


def test_the_engine_package_never_imports_the_runner() -> None:
    bad, paths = [], sorted((ROOT / "simulations" / "core" / "engine").rglob("*.py"))
    assert len(paths) >= 5  # the package is where this test looks
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{path.name}: {n}" for n in names if n.startswith("simulations.core.runner")]
    assert bad == []


def test_engines_by_name() -> None:
    assert sorted(ENGINES) == ["flower", "inline", "ray"]
    assert isinstance(get_engine("inline"), InlineEngine) and isinstance(get_engine("ray"), RayEngine)
    with pytest.raises(ValueError, match="unknown engine 'auto'"):
        get_engine("auto")


def test_inline_engine_serves_on_its_grid_and_returns_what_serve_returns(tmp_path) -> None:
    cfg, runtime = setup(tmp_path, engine="inline")
    got = InlineEngine().run(cfg, runtime, lambda grid, nodes: (client_ids(grid.send_and_receive(queries(4))), nodes))
    assert got == ([0, 1, 2, 3], None)


def test_inline_engine_drops_its_queued_jobs_when_the_body_raises(tmp_path) -> None:
    cfg, runtime = setup(tmp_path, engine="inline")
    with pytest.raises(RuntimeError, match="body failed"):
        with InlineEngine().open(cfg, runtime) as grid:
            assert len(list(grid.push_messages(queries(4)))) == 4
            raise RuntimeError("body failed")
    assert grid.executor.abandon() == []  # nothing left queued


def _descendants(pid: int) -> dict[int, int]:
    """{pid: start time} of every live process below ``pid``."""
    out, todo = {}, [pid]
    while todo:
        for child, start in reaper.children(todo.pop()).items():
            if child not in out:
                out[child] = start
                todo.append(child)
    return out


def _command(pid: int) -> bytes:
    """The executable path of ``pid`` (empty once it has exited)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return b""


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
@pytest.mark.timeout(300)
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree in /proc")
def test_ray_engine_stops_its_actors_and_ray_when_the_body_raises(tmp_path) -> None:
    import ray

    assert not ray.is_initialized()
    cfg, runtime = setup(tmp_path, engine="ray", ray={"num_workers": 2, "cpus_per_worker": 1})
    before = _descendants(os.getpid())
    started: dict[int, int] = {}
    with pytest.raises(RuntimeError, match="body failed"):
        with RayEngine().open(cfg, runtime) as grid:
            assert ray.is_initialized() and len(grid.executor.actors) == 2
            assert client_ids(grid.send_and_receive(queries(4), timeout=120)) == [0, 1, 2, 3]
            started = {p: s for p, s in _descendants(os.getpid()).items() if before.get(p) != s}
            names = {_command(p) for p in started}
            assert any(n.endswith(b"/raylet") for n in names), names  # Ray runs under this process
            raise RuntimeError("body failed")
    assert not ray.is_initialized()
    assert grid.executor.actors == []
    deadline = time.monotonic() + 30  # a bound for the check, not a timing assertion
    while time.monotonic() < deadline and any(reaper.still_running(p, s) for p, s in started.items()):
        time.sleep(0.25)
    left = [p for p, s in started.items() if reaper.still_running(p, s)]
    for p in left:  # only our own, still the same processes
        os.kill(p, 9)
    assert left == []
