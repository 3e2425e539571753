"""A local Ray instance leaves nothing behind when its driver is killed (``kill -9``).

Without the watchdog of ``simulations/core/engine/reaper.py``, Ray's dashboard and runtime-env agents
outlive a killed driver by about 60 s. The first tests use plain processes in place of Ray's (a
child that starts a grandchild and outlives the driver, as the raylet's agents do); the last one
kills a real ``simulations.run --engine ray``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from simulations.core.engine import reaper

REPO = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.skipif(not reaper.supported(), reason="needs Linux /proc")

#: A driver: an "old" child started before the block, then inside it a child that starts a
#: grandchild (both sleep, like agents whose parent died). Prints the pids, then acts per argv[1].
DRIVER = textwrap.dedent("""
    import subprocess, sys, time
    from simulations.core.engine.reaper import reaped
    old = subprocess.Popen(["sleep", "300"])
    try:
        with reaped():
            child = subprocess.Popen(["sh", "-c", "sleep 300 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
            grandchild = int(child.stdout.readline())
            print(old.pid, child.pid, grandchild, flush=True)
            if sys.argv[1] == "kill":
                time.sleep(300)  # killed here by the test
            if sys.argv[1] == "raise":
                time.sleep(1.0)  # the watchdog records the tree every 0.5 s
                raise RuntimeError("block failed")
    except RuntimeError:
        pass
    print("out", flush=True)
    time.sleep(300)  # the driver lives on after the block
""")


def _alive(pid: int) -> bool:
    return reaper.proc_stat(pid) is not None


def _gone_within(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not any(_alive(p) for p in pids)


def _start_driver(mode: str) -> tuple[subprocess.Popen, list[int]]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, mode], stdout=subprocess.PIPE, text=True,
                            env=env, cwd=REPO, start_new_session=True)
    assert proc.stdout is not None
    pids = [int(x) for x in proc.stdout.readline().split()]
    assert len(pids) == 3, pids
    return proc, pids


def _cleanup(proc: subprocess.Popen, pids: list[int]) -> None:
    for pid in [proc.pid, *pids]:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    proc.wait(10)


@pytest.mark.parametrize("mode", ["kill", "raise"])
def test_processes_started_in_the_block_die_with_the_driver(mode: str) -> None:
    """``kill``: the driver is SIGKILLed inside the block; ``raise``: the block ends with an
    exception (the driver lives on). Either way the block's child and grandchild are killed; the
    child started before the block is left alone."""
    proc, (old, child, grandchild) = _start_driver(mode)
    try:
        if mode == "kill":
            time.sleep(2.5)  # the watchdog records the tree every 0.5 s (margin for a loaded machine)
            os.kill(proc.pid, signal.SIGKILL)
        else:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "out"
        assert _gone_within([child, grandchild], 10), (child, grandchild)
        assert _alive(old)
    finally:
        _cleanup(proc, [old, child, grandchild])


def test_a_block_that_ends_normally_leaves_its_processes_alone() -> None:
    proc, (old, child, grandchild) = _start_driver("clean")
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "out"
        time.sleep(2.0)
        assert _alive(child) and _alive(grandchild) and _alive(old)
    finally:
        _cleanup(proc, [old, child, grandchild])


def _descendants(root: int) -> dict[int, int]:
    """{pid: start time} of the processes below ``root`` and in its session."""
    procs = reaper.process_table()
    found, todo = {p for p, (_, sid, _) in procs.items() if sid == root}, [root]
    while todo:
        parent = todo.pop()
        for p, (ppid, _, _) in procs.items():
            if ppid == parent and p not in found:
                found.add(p)
                todo.append(p)
    found.discard(root)
    return {p: procs[p][2] for p in found}


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
@pytest.mark.timeout(300)
def test_killed_ray_run_leaves_no_ray_process(tmp_path) -> None:
    """``kill -9`` of ``simulations.run --engine ray`` mid-run: every process of its local Ray
    instance is gone within 15 s (before the watchdog, Ray's two agents stayed about 60 s)."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [sys.executable, "-m", "simulations.run", "--engine", "ray", "--model", "mlp", "--rounds", "500",
           "--num-clients", "4", "--local-steps", "2", "--out", str(out), "--no-progress",
           "dataset_args.num_samples=600"]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            seen.update(_descendants(proc.pid))
            metrics = out / "metrics.csv"
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:  # init + 1 round
                break
            time.sleep(0.5)
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(2.0)  # the watchdog records every 0.5 s (margin for a loaded machine)
        seen.update(_descendants(proc.pid))
        names = {p: Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0][-40:] for p in seen
                 if reaper.still_running(p, seen[p])}
        assert any(n.endswith(b"/raylet") for n in names.values()), names  # Ray was running
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        t0 = time.monotonic()
        while time.monotonic() < t0 + 15 and any(reaper.still_running(p, s) for p, s in seen.items()):
            time.sleep(0.25)
        left = {p: names.get(p) for p, s in seen.items() if reaper.still_running(p, s)}
        print(f"{len(seen)} processes, {len(left)} left {time.monotonic() - t0:.1f} s after the kill")
        assert left == {}, left
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid, start in seen.items():  # only our own, still the same processes
            if reaper.still_running(pid, start):
                os.kill(pid, signal.SIGKILL)
