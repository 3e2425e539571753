"""Engines: where the ClientApp runs.

- ``ray`` (default): our :class:`~simulations.engine.sim_grid.SimGrid` over a pool of Ray actors
  (:class:`~simulations.engine.executors.RayExecutor`), on a local Ray instance or an existing
  cluster (``ray.address``).
- ``inline``: the same grid, every client in this process (no Ray; for debugging and fast tests).
- ``flower``: stock ``flwr.simulation.run_simulation`` with a Flower ``ServerApp`` that runs the same
  round loop on Flower's grid.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from simulations.engine.executors import InlineExecutor, RayExecutor
from simulations.engine.sim_grid import SimGrid

if TYPE_CHECKING:
    from simulations.config import RayConfig
    from simulations.runner import Simulation

#: Environment for a *local* Ray instance: keep every address on 127.0.0.1, no usage stats.
LOCAL_RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


@contextlib.contextmanager
def ray_session(cfg: RayConfig) -> Iterator[Any]:
    """Connect to ``cfg.address`` or start a local Ray instance; shut down only what we started."""
    if cfg.address is None:
        for key, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(key, value)
    import ray

    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING",
                                  "log_to_driver": False}
        if cfg.address is not None:
            kwargs["address"] = cfg.address
        ray.init(**kwargs)
        started = True
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def default_num_workers(ray: Any, cfg: RayConfig, num_clients: int) -> int:
    """``cfg.num_workers`` or one actor per ``cpus_per_worker`` CPUs in the cluster (≤ clients)."""
    if cfg.num_workers is not None:
        return min(cfg.num_workers, num_clients)
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    return max(1, min(num_clients, int(cpus // cfg.cpus_per_worker)))


def run_on_engine(sim: Simulation) -> ArrayRecord:
    """Run ``sim``'s round loop on its configured engine; return the final global model."""
    cfg = sim.cfg
    n = cfg.num_clients
    if cfg.engine == "inline":
        grid = SimGrid(n, InlineExecutor(sim.client_app(), n))
        try:
            return sim.serve(grid)
        finally:
            grid.shutdown()
    if cfg.engine == "ray":
        with ray_session(cfg.ray) as ray:
            executor = RayExecutor(
                sim.client_app(), n, default_num_workers(ray, cfg.ray, n),
                cpus_per_worker=cfg.ray.cpus_per_worker, gpus_per_worker=cfg.ray.gpus_per_worker,
            )
            grid = SimGrid(n, executor)
            try:
                return sim.serve(grid)
            finally:
                grid.shutdown()
    if cfg.engine == "flower":
        return run_with_flower(sim)
    raise ValueError(f"unknown engine {cfg.engine!r}")


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
    if cfg.ray.address is None:
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
    run_simulation(server_app=app, client_app=sim.client_app(), num_supernodes=cfg.num_clients,
                   backend_config=backend_config)
    if "error" in result:
        raise result["error"]
    if "arrays" not in result:
        raise RuntimeError("Flower's run_simulation ended without finishing the run (see its log above)")
    return result["arrays"]
