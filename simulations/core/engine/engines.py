"""The engines: where the ClientApp runs, and the grid the round loop talks to.

Every engine offers ``run(cfg, runtime, serve)``: it starts what the run needs, calls
``serve(grid, node_of_client)`` with its grid, and releases everything it started before it returns,
also when ``serve`` raises or the run is interrupted. The runner passes its round loop as ``serve``;
engines never import the runner.

- :class:`InlineEngine` and :class:`RayEngine` own their grid: ``with engine.open(cfg, runtime) as
  grid: ...`` hands it over (a :class:`~simulations.core.engine.sim_grid.SimGrid`) and, on leaving the
  block, stops the executor (Ray: kills the actors, then shuts down the Ray instance it started,
  under the reaper). Their ``run`` is that block around ``serve``.
- :class:`FlowerEngine` runs stock ``flwr.simulation.run_simulation``, a blocking call whose grid
  exists only inside a Flower ``ServerApp`` (Flower runs it in its own thread while the calling
  thread drives the client backend until the ServerApp returns). It cannot hand that grid out of a
  ``with`` block, so it has ``run`` only: ``serve`` is called inside the ServerApp, and everything
  is released when ``run_simulation`` returns.

``runtime`` is the server process's :class:`~simulations.core.client_app.ClientRuntime`: the engines
build the ClientApp on it (the inline engine shares its data and model) and read the client
profiles, the batch limit and the fault plan from it.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from simulations.core.client_app import make_client_app
from simulations.core.engine.executors import InlineExecutor, Job, RayExecutor
from simulations.core.engine.ray_cluster import ray_session, use_local_ray_env, worker_pools
from simulations.core.engine.reaper import reaped
from simulations.core.engine.sim_grid import SimGrid
from simulations.core.simtime import expected_work
from strategies.arrays import config_record

if TYPE_CHECKING:
    from simulations.core.client_app import ClientRuntime
    from simulations.core.config import RunConfig

T = TypeVar("T")

#: The round loop an engine runs: ``serve(grid, node_of_client)`` (``node_of_client``: the grid's
#: node id of each client id, None when they are equal).
Serve = Callable[[Grid, "dict[int, int] | None"], T]


class Engine(Protocol):
    """What the runner needs from an engine (see the module docstring)."""

    name: ClassVar[str]

    def run(self, cfg: RunConfig, runtime: ClientRuntime, serve: Serve[T]) -> T:
        """Run ``serve`` on this engine's grid; everything started is released on return."""
        ...


class GridEngine:
    """An engine whose grid lives in this process: :meth:`open` yields it, :meth:`run` serves on it."""

    name: ClassVar[str]

    def open(self, cfg: RunConfig, runtime: ClientRuntime) -> contextlib.AbstractContextManager[SimGrid]:
        """A context manager that starts the workers and yields the grid; it stops them on exit."""
        raise NotImplementedError

    def run(self, cfg: RunConfig, runtime: ClientRuntime, serve: Serve[T]) -> T:
        with self.open(cfg, runtime) as grid:
            return serve(grid, None)


def _work(runtime: ClientRuntime) -> Callable[[int], float]:
    """Expected work of each client (its profile's speed and local steps), for scheduling."""
    table = runtime.profiles
    return lambda cid: expected_work(table, runtime.config, cid)


def _batch_limit(cfg: RunConfig, runtime: ClientRuntime) -> int | None:
    return runtime.batch_limit() if cfg.batched_clients else None


def _pool_of(cfg: RunConfig, runtime: ClientRuntime) -> Callable[[int], int] | None:
    """Client → worker pool (its profile) when the run has profiles, else None (one pool)."""
    return runtime.profiles.index if cfg.profiles else None


class InlineEngine(GridEngine):
    """Every client in this process, sharing the server's runtime (no Ray)."""

    name = "inline"

    @contextlib.contextmanager
    def open(self, cfg: RunConfig, runtime: ClientRuntime) -> Iterator[SimGrid]:
        n = cfg.num_clients
        app = make_client_app(runtime.config, runtime=runtime)
        executor = InlineExecutor(app, n, batch_limit=_batch_limit(cfg, runtime), pool_of=_pool_of(cfg, runtime))
        with _shut_down_after(SimGrid(n, executor, work=_work(runtime))) as grid:
            yield grid


class RayEngine(GridEngine):
    """Clients in a pool of Ray actors per profile, on a local Ray instance or ``ray.address``."""

    name = "ray"

    @contextlib.contextmanager
    def open(self, cfg: RunConfig, runtime: ClientRuntime) -> Iterator[SimGrid]:
        n = cfg.num_clients
        work = _work(runtime)
        limit = _batch_limit(cfg, runtime)

        def alone(job: Job) -> bool:  # an injected hang or worker kill takes down only itself
            return any(runtime.faults(_round_of(job), job.client_id)[1:])

        with ray_session(cfg.ray) as ray:
            executor = RayExecutor(make_client_app(runtime.config, runtime=runtime), n,
                                   worker_pools(ray, cfg, runtime.profiles), pool_of=_pool_of(cfg, runtime),
                                   batch_limit=limit, alone=alone)
            with _shut_down_after(SimGrid(n, executor, work=work)) as grid:
                yield grid


@contextlib.contextmanager
def _shut_down_after(grid: SimGrid) -> Iterator[SimGrid]:
    """``grid`` for the block; its executor is shut down when the block ends, also on an error."""
    try:
        yield grid
    finally:
        grid.shutdown()


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


@contextlib.contextmanager
def pythonpath_kept() -> Iterator[None]:
    """Put ``PYTHONPATH`` back as it was when the block ends: Flower's Ray backend writes this
    process's whole ``sys.path`` into it (for its workers) and leaves it there, so any Python a
    later subprocess starts, even another interpreter, would import from this environment."""
    before = os.environ.get("PYTHONPATH")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before


class FlowerEngine:
    """Stock ``flwr.simulation.run_simulation`` (Flower's Ray backend); ``run`` only (see above)."""

    name = "flower"

    def run(self, cfg: RunConfig, runtime: ClientRuntime, serve: Serve[T]) -> T:
        from flwr.serverapp import ServerApp
        from flwr.simulation import run_simulation

        use_local_ray_env(cfg.ray.address)
        result: dict[str, Any] = {}
        app = ServerApp()

        @app.main()
        def _main(grid: Grid, context: Any) -> None:
            try:
                result["value"] = serve(grid, partition_map(grid, cfg.num_clients))
            except BaseException as exc:  # re-raised in the caller's thread
                result["error"] = exc

        init_args: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING",
                                     "log_to_driver": False}
        if cfg.ray.address is not None:
            init_args["address"] = cfg.ray.address
        backend_config = {
            "client_resources": {"num_cpus": cfg.ray.cpus_per_worker, "num_gpus": cfg.ray.gpus_per_worker},
            "init_args": init_args,
        }
        # reaped: see ray_session
        with reaped() if cfg.ray.address is None else contextlib.nullcontext(), pythonpath_kept():
            run_simulation(server_app=app, client_app=make_client_app(runtime.config, runtime=runtime),
                           num_supernodes=cfg.num_clients, backend_config=backend_config)
        if "error" in result:
            raise result["error"]
        if "value" not in result:
            raise RuntimeError("Flower's run_simulation ended without finishing the run (see its log above)")
        return result["value"]  # type: ignore[no-any-return]


#: The engines by name (``auto`` is resolved by :func:`simulations.core.engine.choose_engine`).
ENGINES: dict[str, GridEngine | FlowerEngine] = {e.name: e for e in (InlineEngine(), RayEngine(), FlowerEngine())}


def get_engine(name: str) -> GridEngine | FlowerEngine:
    """The engine called ``name`` (``inline``, ``ray`` or ``flower``)."""
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r} (engines: {', '.join(ENGINES)})")
    return ENGINES[name]
