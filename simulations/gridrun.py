"""One grid runner for user sweeps (:mod:`simulations.sweep`) and studies
(:mod:`simulations.experiments`): job list → plan → executor → run directories → results.

- A **job** is anything with a ``name`` and a ``run_dir`` (:class:`Job`); its run is finished when
  the directory holds ``summary.json`` (studies may also accept ``failed.json``, a run the runner
  stopped early): :func:`finished`, :func:`read_summary`. The runner itself locks a running run's
  directory (:class:`simulations.core.results.RunLock`), so two grids never write the same run.
- :func:`plan` splits the jobs into those to run (new, unfinished, ``fresh``, or ``stale``: e.g.
  run with another config) and the finished ones that are reused: grids are resumable.
- An **executor** runs ``run_job(job, fresh)`` for each job to run and yields ``(job, get)`` as
  jobs complete (``get()`` returns the result or raises the job's error): :func:`serial` (this
  process), :func:`process_pool` (spawned processes that stop when the grid's process dies),
  :func:`ray_tasks` (Ray tasks on a local instance or a cluster).
- :func:`execute` drives an executor and hands each completion to the caller's ``on_done``
  (progress lines, state files, summaries).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

SUMMARY = "summary.json"
#: Written instead of ``summary.json`` when the runner stops a run early (studies with
#: ``keep_failed``, see :func:`simulations.experiments.grid.run_simulation`).
FAILED = "failed.json"


class Job(Protocol):
    """One run of a grid: a ``name`` (for progress lines and results) and its ``run_dir``."""

    @property
    def name(self) -> str: ...

    @property
    def run_dir(self) -> Path: ...


J = TypeVar("J", bound=Job)
R = TypeVar("R")
#: ``executor(run_job, [(job, fresh), …])`` → ``(job, get)`` in completion order.
Executor = Callable[[Callable[[Any, bool], Any], Sequence[tuple[Any, bool]]],
                    Iterator[tuple[Any, Callable[[], Any]]]]


def finished(run_dir: Path, failed: bool = False) -> bool:
    """Whether the run in ``run_dir`` is done: it wrote ``summary.json`` or, with ``failed``,
    ``failed.json``."""
    return (run_dir / SUMMARY).is_file() or (failed and (run_dir / FAILED).is_file())


def read_summary(run_dir: Path, failed: bool = False) -> dict[str, Any]:
    """The summary of a finished run plus ``reused: True``; with ``failed``, ``failed.json`` where
    there is no ``summary.json``."""
    path = run_dir / SUMMARY
    if failed and not path.is_file():
        path = run_dir / FAILED
    return {**json.loads(path.read_text()), "reused": True}


@dataclass
class Plan:
    """What a grid invocation does: ``todo`` (in job order) runs, ``done`` is reused; ``redo``
    names the jobs of ``todo`` that run with ``fresh=True`` (every job with ``fresh``, else the
    finished ones that are stale)."""

    todo: list[Any]
    done: list[Any]
    redo: set[str] = field(default_factory=set)


def plan(jobs: Sequence[J], fresh: bool = False, keep_failed: bool = False,
         stale: Callable[[J], bool] | None = None) -> Plan:
    """Split ``jobs``: a finished job (:func:`finished`, ``keep_failed``: ``failed.json`` too)
    is reused unless ``fresh`` or ``stale(job)`` (asked only of finished jobs)."""
    todo = [j for j in jobs if fresh or not finished(j.run_dir, keep_failed)
            or (stale is not None and stale(j))]
    ids = {id(j) for j in todo}
    redo = {j.name for j in todo if fresh or finished(j.run_dir, keep_failed)}
    return Plan(todo, [j for j in jobs if id(j) not in ids], redo)


def execute(todo: Sequence[J], run_job: Callable[[J, bool], R], executor: Executor,
            on_done: Callable[[int, J, Callable[[], R]], None],
            redo: set[str] | frozenset[str] = frozenset()) -> None:
    """Run ``todo`` with ``executor``; ``on_done(i, job, get)`` for the ``i``-th completion
    (1-based). A job runs as ``run_job(job, job.name in redo)``. An exception raised by
    ``on_done`` stops the executor (pool shut down, Ray tasks cancelled) and propagates."""
    items = [(j, j.name in redo) for j in todo]
    with contextlib.closing(executor(run_job, items)) as completions:  # type: ignore[arg-type]
        for i, (job, get) in enumerate(completions, 1):
            on_done(i, job, get)


# ------------------------------------------------------------------------------ executors
def serial(initializer: Callable[[], None] | None = None) -> Executor:
    """Run the jobs one after another in this process (after ``initializer()``); each job runs
    when its ``get()`` is called."""
    def run(fn: Callable[[Any, bool], Any], items: Sequence[tuple[Any, bool]]
            ) -> Iterator[tuple[Any, Callable[[], Any]]]:
        if initializer is not None and items:
            initializer()
        for job, fresh in items:
            yield job, functools.partial(fn, job, fresh)

    return run  # type: ignore[return-value]


def pool_worker(initializer: Callable[[], None]) -> None:
    """Pool worker set-up: on Linux the worker gets SIGTERM when the process that started it
    dies (``prctl(PR_SET_PDEATHSIG)``), so a grid stopped by ``kill PID`` does not leave
    workers running its queue; then ``initializer()``."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # pragma: no cover - no prctl: nothing to arm
            pass
        if os.getppid() == 1:  # the parent died before prctl: stop now
            os._exit(1)
    initializer()


def process_pool(workers: int, initializer: Callable[[], None]) -> Executor:
    """Run the jobs ``workers`` at a time in spawned processes that each run ``initializer``
    (:func:`pool_worker`); ``run_job`` and ``initializer`` must be module-level functions."""
    def run(fn: Callable[[Any, bool], Any], items: Sequence[tuple[Any, bool]]
            ) -> Iterator[tuple[Any, Callable[[], Any]]]:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                 initializer=functools.partial(pool_worker, initializer)) as pool:
            futures = {pool.submit(fn, job, fresh): job for job, fresh in items}
            try:
                for fut in as_completed(futures):
                    yield futures[fut], fut.result
            finally:  # stopped early (an error, Ctrl-C): drop the queued jobs, wait for the running
                pool.shutdown(wait=True, cancel_futures=True)

    return run  # type: ignore[return-value]


def ray_tasks(ray: Any, options: dict[str, Any], limit: int | None = None) -> Executor:
    """Run each job as a Ray task (``ray`` initialised by the caller; task ``options`` such as
    ``num_cpus``; no retries), at most ``limit`` in flight. Tasks still running when the
    iteration stops (Ctrl-C, an error) are cancelled."""
    def run(fn: Callable[[Any, bool], Any], items: Sequence[tuple[Any, bool]]
            ) -> Iterator[tuple[Any, Callable[[], Any]]]:
        task = ray.remote(max_retries=0)(fn).options(**options)
        pending, inflight = list(items), {}
        cap = limit or len(pending)
        try:
            while pending or inflight:
                while pending and len(inflight) < cap:
                    job, fresh = pending.pop(0)
                    inflight[task.remote(job, fresh)] = job
                ready, _ = ray.wait(list(inflight), num_returns=1)
                for ref in ready:
                    yield inflight.pop(ref), functools.partial(ray.get, ref)
        finally:
            for ref in inflight:
                ray.cancel(ref, force=True)

    return run  # type: ignore[return-value]
