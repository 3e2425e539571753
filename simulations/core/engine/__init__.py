"""Engines: where the ClientApp runs.

- ``auto`` (default): ``inline`` unless the run needs Ray (:func:`choose_engine` says which and why).
- ``ray``: our :class:`~simulations.core.engine.sim_grid.SimGrid` over a pool of Ray actors
  (:class:`~simulations.core.engine.executors.RayExecutor`), on a local Ray instance or an existing
  cluster (``ray.address``).
- ``inline``: the same grid, every client in this process (no Ray; for debugging and fast tests).
- ``flower``: stock ``flwr.simulation.run_simulation`` with a Flower ``ServerApp`` that runs the same
  round loop on Flower's grid.

:func:`get_engine` returns one (:mod:`simulations.core.engine.engines`): ``engine.run(cfg, runtime, serve)``
runs a round loop on it; ``inline`` and ``ray`` also hand out their grid with
``with engine.open(cfg, runtime) as grid``. The runner imports this package, never the reverse.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

from simulations.core.engine.engines import (
    ENGINES,
    Engine,
    FlowerEngine,
    GridEngine,
    InlineEngine,
    RayEngine,
    get_engine,
    partition_map,
)
from simulations.core.engine.ray_cluster import (
    LOCAL_RAY_ENV,
    default_num_workers,
    ray_session,
    split_workers,
    worker_pools,
)

__all__ = [
    "ENGINES", "LOCAL_RAY_ENV", "Engine", "FlowerEngine", "GridEngine", "InlineEngine", "RayEngine",
    "Terminated", "choose_engine", "default_num_workers", "get_engine", "partition_map", "ray_session",
    "sigterm_interrupts", "split_workers", "termination_signal", "worker_pools",
]


class Terminated(KeyboardInterrupt):
    """A termination signal (SIGTERM) turned into an interrupt of the main thread; ``signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


#: The termination signal received under :func:`sigterm_interrupts` (None: none). Ray's blocking
#: calls may catch our :class:`Terminated` and raise a plain KeyboardInterrupt instead.
_received: list[int] = []


def _raise_terminated(signum: int, frame: Any) -> None:
    _received.append(signum)
    raise Terminated(signum)


def termination_signal(exc: BaseException) -> int | None:
    """The signal behind a KeyboardInterrupt ``exc`` (SIGTERM under :func:`sigterm_interrupts`),
    or None for a Ctrl-C."""
    if isinstance(exc, Terminated):
        return exc.signum
    return _received[-1] if _received else None


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """While active, SIGTERM raises :class:`Terminated` in the main thread, so that ``finally``
    blocks run (actors stop, Ray shuts down, the progress bar closes) instead of the process dying
    or Ray's own handler aborting it with a C++ stack dump. The previous handler is restored on
    exit; outside the main thread this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    _received.clear()
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def choose_engine(cfg: Any) -> tuple[str, str]:
    """``(engine, reason)`` for a run config: its ``engine`` unless ``auto``, which picks Ray only
    when the run needs it (a cluster address, worker pools from client profiles or ``ray.num_workers``,
    or hung/killed-worker faults that only separate worker processes survive) and otherwise one
    in-process worker, which skips Ray's start-up (seconds) and per-chunk transfers and trains a
    round's clients as one batched computation anyway (docs/benchmarks.md)."""
    if cfg.engine != "auto":
        return cfg.engine, "set by engine / --engine"
    if cfg.ray.address is not None:
        return "ray", f"ray.address={cfg.ray.address} joins a Ray cluster"
    if cfg.profiles:
        return "ray", "client profiles place clients on Ray worker pools"
    if cfg.ray.num_workers is not None and cfg.ray.num_workers > 1:
        return "ray", f"ray.num_workers={cfg.ray.num_workers} asks for worker processes"
    faults = cfg.faults
    if faults.hang or faults.hang_prob > 0 or faults.kill_worker:
        return "ray", "hung or killed workers need separate worker processes"
    return "inline", ("no cluster address, profiles or worker faults: one in-process worker avoids "
                      "Ray's start-up; --engine ray to use Ray anyway")
