"""A Ray instance for the ``ray`` engine and the actor pools it hosts.

:func:`ray_session` connects to a cluster or starts a local instance (under the reaper) and shuts
down only what it started; :func:`worker_pools` sizes one actor pool per client profile and checks
that the cluster can host them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from fedagg.errors import ConfigError
from simulations.core.engine.executors import WorkerPool
from simulations.core.engine.reaper import reaped

if TYPE_CHECKING:
    from simulations.core.config import RayConfig, RunConfig
    from simulations.core.profiles import ProfileTable

log = logging.getLogger("fedagg")

#: Environment for a *local* Ray instance: keep every address on 127.0.0.1, no usage stats.
LOCAL_RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


def use_local_ray_env(address: str | None) -> None:
    """Set :data:`LOCAL_RAY_ENV` (where not set) for a local instance or a loopback ``address``."""
    if address is None or _loopback(address):
        for key, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(key, value)


@contextlib.contextmanager
def ray_session(cfg: RayConfig) -> Iterator[Any]:
    """Connect to ``cfg.address`` or start a local Ray instance; shut down only what we started.

    A local instance runs under :func:`~simulations.core.engine.reaper.reaped`: if this process dies
    without shutting it down (``kill -9``, Ctrl-C during start-up), its processes are killed at
    once instead of lingering for a minute."""
    use_local_ray_env(cfg.address)
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


def worker_pools(ray: Any, cfg: RunConfig, table: ProfileTable) -> list[WorkerPool]:
    """One actor pool per client profile (a single pool from ``ray.*`` without profiles).

    Checks the cluster can host every pool: a profile asking for GPUs on a cluster without any fails
    with a clear message, unless ``gpu: optional`` (then it runs on CPU); custom resources must
    exist in the cluster. Workers per pool: the profile's ``workers``, else a share of the default
    worker count proportional to the profile's clients (at least one). ``table``: the run's client →
    profile assignment.
    """
    n = cfg.num_clients
    if not cfg.profiles:
        opts = {"num_cpus": cfg.ray.cpus_per_worker, "num_gpus": cfg.ray.gpus_per_worker}
        _check_resources(ray, opts, "ray")
        pools = [WorkerPool("default", default_num_workers(ray, cfg.ray, n), opts)]
        _check_capacity(ray, pools)
        return pools
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
