"""The grid runner's process pool (``simulations.gridrun``, used by the study drivers): stopping
the driver by pid stops its workers too, and errors raised in a worker reach the parent intact."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from fedagg.errors import ConfigError

DRIVER = textwrap.dedent("""
    import functools, multiprocessing as mp, time
    from concurrent.futures import ProcessPoolExecutor
    from simulations import gridrun
    from simulations.experiments import grid

    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn"),
                             initializer=functools.partial(gridrun.pool_worker, grid.quiet_logs)) as pool:
        futs = [pool.submit(time.sleep, 60) for _ in range(2)]
        time.sleep(1.0)
        print(" ".join(str(p.pid) for p in pool._processes.values()), flush=True)
        time.sleep(60)
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by init) counts as stopped
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_killing_the_driver_stops_its_pool_workers():
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True,
                              env=env)
    try:
        workers = [int(p) for p in driver.stdout.readline().split()]
        assert len(workers) == 2 and all(_alive(p) for p in workers)
        driver.send_signal(signal.SIGKILL)  # no cleanup in the driver at all
        driver.wait(10)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in workers), workers
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        for p in locals().get("workers", []):
            if _alive(p):
                os.kill(p, signal.SIGKILL)


def test_config_errors_survive_pickling():
    err = pickle.loads(pickle.dumps(ConfigError("tuning.seed", "not a table seed")))
    assert (err.field, err.message, str(err)) == ("tuning.seed", "not a table seed",
                                                  "tuning.seed: not a table seed")
