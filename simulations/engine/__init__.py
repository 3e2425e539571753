"""Engines: where the ClientApp runs.

- ``auto`` (default): ``inline`` unless the run needs Ray (:func:`choose_engine` says which and why).
- ``ray``: our :class:`~simulations.engine.sim_grid.SimGrid` over a pool of Ray actors
  (:class:`~simulations.engine.executors.RayExecutor`), on a local Ray instance or an existing
  cluster (``ray.address``).
- ``inline``: the same grid, every client in this process (no Ray; for debugging and fast tests).
- ``flower``: stock ``flwr.simulation.run_simulation`` with a Flower ``ServerApp`` that runs the same
  round loop on Flower's grid.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedagg.errors import ConfigError
from simulations.engine.executors import InlineExecutor, RayExecutor, WorkerPool
from simulations.engine.reaper import reaped
from simulations.engine.sim_grid import SimGrid
from simulations.simtime import expected_work
from strategies.arrays import config_record

log = logging.getLogger("fedagg")

if TYPE_CHECKING:
    from simulations.config import RayConfig
    from simulations.runner import Simulation

#: Environment for a *local* Ray instance: keep every address on 127.0.0.1, no usage stats.
LOCAL_RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


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


@contextlib.contextmanager
def ray_session(cfg: RayConfig) -> Iterator[Any]:
    """Connect to ``cfg.address`` or start a local Ray instance; shut down only what we started.

    A local instance runs under :func:`~simulations.engine.reaper.reaped`: if this process dies
    without shutting it down (``kill -9``, Ctrl-C during start-up), its processes are killed at
    once instead of lingering for a minute."""
    if cfg.address is None or _loopback(cfg.address):
        for key, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(key, value)
    import ray

    if ray.is_initialized():
        yield ray
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING",
                              "log_to_driver": False}
    if cfg.address is not None:
        kwargs["address"] = cfg.address
    with reaped() if cfg.address is None else contextlib.nullcontext():
        handler = signal.getsignal(signal.SIGTERM)
        ray.init(**kwargs)
        # ray.init replaces the SIGTERM handler (its core worker's aborts with a stack dump): put
        # back the one the application installed, e.g. sigterm_interrupts()
        if callable(handler) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, handler)
        try:
            yield ray
        finally:
            ray.shutdown()


def _loopback(address: str) -> bool:
    """Whether ``address`` (``auto`` reads ``RAY_ADDRESS``) is on 127.0.0.1: Ray then needs
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (read when ray is imported), else it rewrites the address
    to the machine's network IP (docs/ray.md)."""
    if address == "auto":
        address = os.environ.get("RAY_ADDRESS", "")
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def default_num_workers(ray: Any, cfg: RayConfig, num_clients: int) -> int:
    """``cfg.num_workers`` or one actor per ``cpus_per_worker`` CPUs in the cluster (≤ clients)."""
    if cfg.num_workers is not None:
        return min(cfg.num_workers, num_clients)
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    return max(1, min(num_clients, int(cpus // cfg.cpus_per_worker)))


def worker_pools(ray: Any, sim: Simulation) -> list[WorkerPool]:
    """One actor pool per client profile (a single pool from ``ray.*`` without profiles).

    Checks the cluster can host every pool: a profile asking for GPUs on a cluster without any fails
    with a clear message, unless ``gpu: optional`` (then it runs on CPU); custom resources must
    exist in the cluster. Workers per pool: the profile's ``workers``, else a share of the default
    worker count proportional to the profile's clients (at least one).
    """
    cfg = sim.cfg
    n = cfg.num_clients
    if not cfg.profiles:
        opts = {"num_cpus": cfg.ray.cpus_per_worker, "num_gpus": cfg.ray.gpus_per_worker}
        _check_resources(ray, opts, "ray")
        pools = [WorkerPool("default", default_num_workers(ray, cfg.ray, n), opts)]
        _check_capacity(ray, pools)
        return pools
    table = sim.runtime.profiles
    counts = np.bincount(table.assignment, minlength=len(table.profiles))
    total = default_num_workers(ray, cfg.ray, n)
    pools = []
    for i, prof in enumerate(table.profiles):
        if counts[i] == 0:
            pools.append(WorkerPool(prof.name, 0, {}))
            continue
        opts: dict[str, Any] = {"num_cpus": prof.num_cpus, "num_gpus": prof.num_gpus}
        if prof.resources:
            opts["resources"] = dict(prof.resources)
        where = f"profiles[{i}]" if i < len(cfg.profiles) else "profiles (default)"
        if opts["num_gpus"] > 0 and float(ray.cluster_resources().get("GPU", 0)) == 0:
            if prof.gpu != "optional":
                raise ConfigError(f"{where}.num_gpus", f"profile {prof.name!r} asks for "
                                  f"{opts['num_gpus']} GPU per worker but the Ray cluster has no GPU; "
                                  "set gpu: optional to run it on CPU")
            log.warning("profile %r: no GPU in the cluster, running on CPU (gpu: optional)", prof.name)
            opts["num_gpus"] = 0.0
        _check_resources(ray, opts, where)
        pools.append(WorkerPool(prof.name, prof.workers or 0, opts))
    auto = [i for i, p in enumerate(table.profiles) if counts[i] > 0 and not p.workers]
    fixed = sum(p.workers for p in pools)
    for i, w in zip(auto, split_workers([int(counts[i]) for i in auto], max(0, total - fixed)), strict=True):
        pools[i] = dataclasses.replace(pools[i], workers=w)
    pools = [dataclasses.replace(p, workers=min(p.workers, int(c))) for p, c in zip(pools, counts, strict=True)]
    _check_capacity(ray, pools)
    return pools


def split_workers(counts: list[int], total: int) -> list[int]:
    """Workers per pool: one each, then the rest of ``total`` in proportion to the client
    ``counts`` (largest remainder), so the automatic split never asks for more than ``total``."""
    if not counts:
        return []
    out = [1] * len(counts)
    rest = total - len(counts)
    if rest > 0:
        shares = np.array(counts, dtype=float) / sum(counts) * rest
        extra = np.floor(shares).astype(int)
        order = np.argsort(-(shares - extra), kind="stable")
        extra[order[: rest - int(extra.sum())]] += 1
        out = [o + int(e) for o, e in zip(out, extra, strict=True)]
    return out


def _check_capacity(ray: Any, pools: list[WorkerPool]) -> None:
    """All workers must fit in the cluster at once (Ray would otherwise wait forever for them)."""
    have = ray.cluster_resources()
    need: dict[str, float] = {}
    for pool in pools:
        for key, amount in {"CPU": pool.options.get("num_cpus", 0), "GPU": pool.options.get("num_gpus", 0),
                            **pool.options.get("resources", {})}.items():
            need[key] = need.get(key, 0.0) + pool.workers * float(amount)
    for key, amount in need.items():
        if amount > float(have.get(key, 0.0)) + 1e-9:
            raise ConfigError("ray.num_workers", f"the workers need {amount:g} {key} in total but the "
                              f"Ray cluster has {have.get(key, 0)}; use fewer workers or smaller "
                              "cpus_per_worker / profile resources")


def _check_resources(ray: Any, opts: dict[str, Any], where: str) -> None:
    have = ray.cluster_resources()
    for key, need in {"CPU": opts.get("num_cpus", 0), "GPU": opts.get("num_gpus", 0),
                      **opts.get("resources", {})}.items():
        if need and float(have.get(key, 0)) < float(need):
            raise ConfigError(where, f"needs {need} {key} per worker but the Ray cluster has "
                              f"{have.get(key, 0)} (resources: {sorted(have)})")


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


def run_on_engine(sim: Simulation, engine: str | None = None) -> ArrayRecord:
    """Run ``sim``'s round loop on ``engine`` (default: :func:`choose_engine`); return the final
    global model."""
    cfg = sim.cfg
    engine = engine or choose_engine(cfg)[0]
    n = cfg.num_clients
    table = sim.runtime.profiles
    work = lambda cid: expected_work(table, sim.cfg, cid)  # noqa: E731
    limit = sim.runtime.batch_limit() if cfg.batched_clients else None
    if engine == "inline":
        grid = SimGrid(n, InlineExecutor(sim.client_app(), n, batch_limit=limit,
                                         pool_of=table.index if cfg.profiles else None), work=work)
        try:
            return sim.serve(grid)
        finally:
            grid.shutdown()
    if engine == "ray":
        with ray_session(cfg.ray) as ray:
            executor = RayExecutor(sim.client_app(), n, worker_pools(ray, sim),
                                   pool_of=table.index if cfg.profiles else None, batch_limit=limit,
                                   alone=lambda job: any(sim.runtime.faults(_round_of(job), job.client_id)[1:]))
            grid = SimGrid(n, executor, work=work)
            try:
                return sim.serve(grid)
            finally:
                grid.shutdown()
    if engine == "flower":
        return run_with_flower(sim)
    raise ValueError(f"unknown engine {engine!r}")


def _round_of(job: Any) -> int:
    """The server round a train job belongs to (its ConfigRecord's ``server-round``)."""
    return int(config_record(job.message.content).get("server-round", 0))


def partition_map(grid: Grid, num_clients: int, timeout: float = 600.0) -> dict[int, int]:
    """``{client id: Flower node id}`` by asking every node its ``partition-id`` (one query round).

    Waits (up to ``timeout`` s) until ``num_clients`` nodes have registered with the grid.
    """
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < num_clients:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of {num_clients} nodes registered within {timeout:.0f} s")
        time.sleep(0.05)
    msgs = [Message(RecordDict(), int(node), MessageType.QUERY) for node in nodes]
    out: dict[int, int] = {}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        if reply.has_error():
            raise RuntimeError(f"node {reply.metadata.src_node_id} failed the id query: {reply.error.reason}")
        metrics = next(iter(reply.content.metric_records.values()))
        out[int(metrics["client-id"])] = int(reply.metadata.src_node_id)  # type: ignore[arg-type]
    if len(out) != num_clients:
        raise RuntimeError(f"{len(out)} of {num_clients} nodes answered the id query")
    return out


def run_with_flower(sim: Simulation) -> ArrayRecord:
    """Run ``sim`` under stock ``flwr.simulation.run_simulation`` (Flower's Ray backend)."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    cfg = sim.cfg
    if cfg.ray.address is None or _loopback(cfg.ray.address):
        for key, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(key, value)
    result: dict[str, Any] = {}
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Any) -> None:
        try:
            result["arrays"] = sim.serve(grid, node_of_client=partition_map(grid, cfg.num_clients))
        except BaseException as exc:  # re-raised in the caller's thread
            result["error"] = exc

    init_args: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING", "log_to_driver": False}
    if cfg.ray.address is not None:
        init_args["address"] = cfg.ray.address
    backend_config = {
        "client_resources": {"num_cpus": cfg.ray.cpus_per_worker, "num_gpus": cfg.ray.gpus_per_worker},
        "init_args": init_args,
    }
    with reaped() if cfg.ray.address is None else contextlib.nullcontext():  # see ray_session
        run_simulation(server_app=app, client_app=sim.client_app(), num_supernodes=cfg.num_clients,
                       backend_config=backend_config)
    if "error" in result:
        raise result["error"]
    if "arrays" not in result:
        raise RuntimeError("Flower's run_simulation ended without finishing the run (see its log above)")
    return result["arrays"]
