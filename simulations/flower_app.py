"""fedagg as a Flower App: ``flwr run .`` and SuperLink/SuperNode deployments (docs/deployment.md).

``pyproject.toml`` names :data:`server_app` and :data:`client_app` as the app's components and lists
the run config in ``[tool.flwr.app.config]``. A key is a flag of ``python -m simulations.run``
without its dashes (``strategy``, ``rounds``, ``num-clients``, ``attack``, ``num-byzantine``, ``out``,
…, see :data:`RUN_KEYS`) or any run config key, dotted for nested ones (``momentum``,
``round-timeout``, ``participation.probabilities.mean``); ``-`` and ``_`` are the same. The app's own
keys (:data:`APP_KEYS`):

- ``overrides``: run config keys that ``pyproject.toml`` does not list (Flower refuses those in
  ``--run-config``), as space-separated ``key=value`` pairs like the CLI's
  (``"participation.probabilities.kind=constant participation.probabilities.p=0.7"``);
- ``log``: trackers, ``tensorboard``, ``mlflow`` or both (comma list), as ``--log``;
- ``overwrite``: replace a finished run in ``out``; ``node-wait``: seconds the ServerApp waits for
  the SuperNodes to connect.

An empty string leaves a key at the run config's default; an unset ``num-clients`` means one client
per SuperNode (the ``num-partitions`` of the nodes' node config). Values are validated by
:func:`simulations.core.config.build_config`, so a bad value fails with the CLI's one-line message (the
run ends ``finished:failed`` with it as the status details, see ``flwr ls``).

The ServerApp runs :meth:`simulations.core.runner.Simulation.run` on Flower's grid and writes the same run
directory as ``simulations.run``; Flower's node ids are mapped to clients by asking each node its
``partition-id``. The ClientApp builds its :class:`~simulations.core.client_app.ClientRuntime` from the
run config it receives (``Context.run_config``): in a deployment it is another process, on another
machine, than the ServerApp.
"""

from __future__ import annotations

import dataclasses
import shlex
import time
from collections.abc import Mapping
from logging import ERROR, INFO
from typing import TYPE_CHECKING, Any

from flwr.app import Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from fedagg.errors import ConfigError
from simulations.core.config import RunConfig, build_config, parse_override, set_dotted
from simulations.run import FLAGS, NAME_KEYS

if TYPE_CHECKING:  # torch and the data stack load only in processes that train or serve
    from simulations.core.client_app import ClientRuntime

#: Node config key holding the federation size (Flower's simulation runtime sets it on every node).
NUM_PARTITIONS_KEY = "num-partitions"

#: App config key → run config key: the flags of ``python -m simulations.run`` (the engine is
#: Flower's runtime here, so ``engine`` and ``ray-address`` are not keys of the app).
RUN_KEYS: dict[str, str] = {flag[2:]: key for flag, key, _ in FLAGS if key not in ("engine", "ray.address")}

#: Keys of the app itself, with their types.
APP_KEYS: dict[str, type] = {"overrides": str, "log": str, "overwrite": bool, "node-wait": float}


@dataclasses.dataclass(frozen=True)
class AppSettings:
    """A Flower run config, parsed: run config overrides (dotted keys) and the app's own options."""

    overrides: dict[str, Any]
    log: str = ""
    overwrite: bool = False
    node_wait: float = 120.0

    @property
    def num_clients(self) -> int | None:
        """``num-clients`` when the run config sets it (else one client per SuperNode)."""
        value = self.overrides.get("num_clients")
        return None if value is None else int(value)

    def config(self, num_partitions: int | None = None) -> RunConfig:
        """The validated run config; ``num_partitions`` fills ``num_clients`` when unset."""
        data: dict[str, Any] = {}
        for key, value in self.overrides.items():
            set_dotted(data, key, value)
        if "engine" in data:
            raise ConfigError("engine", f"a Flower App runs on Flower's runtime; drop the key (got {data['engine']!r})")
        data["engine"] = "flower"
        if "num_clients" not in data and num_partitions is not None:
            data["num_clients"] = num_partitions
        return build_config(data)


def parse_run_config(run_config: Mapping[str, Any]) -> AppSettings:
    """``Context.run_config`` → :class:`AppSettings` (ConfigError naming the key on bad input)."""
    overrides: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for key, value in run_config.items():
        if key in APP_KEYS:
            options[key.replace("-", "_")] = _app_option(key, value)
        elif value != "":  # "" leaves the key at its default
            name = RUN_KEYS.get(key, key.replace("-", "_"))
            overrides[name] = str(value) if name in NAME_KEYS else value  # as the CLI
    for text in shlex.split(options.pop("overrides", "")):
        key, value = parse_override(text)
        overrides[key] = value
    return AppSettings(overrides, **options)


def _app_option(key: str, value: Any) -> Any:
    """An app key's value, type-checked (``node-wait``: a positive number of seconds)."""
    kind = APP_KEYS[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is float and not value > 0):
        raise ConfigError(key, f"expected {'a positive number' if kind is float else kind.__name__}, got {value!r}")
    return value


def tracker_names(settings: AppSettings) -> list[str]:
    """Trackers asked for by ``log`` (checked: known names, packages installed)."""
    if not settings.log:
        return []
    from simulations.core.trackers import check_installed, parse_names

    names = parse_names([settings.log])
    check_installed(names)
    return names


# ---------------------------------------------------------------------------------------- server
server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    """Validate the run config, then :func:`serve`; bad input ends the run with the CLI's line."""
    try:
        settings = parse_run_config(context.run_config)
        names = tracker_names(settings)
        if settings.num_clients is not None:
            settings.config()  # bad input fails before any SuperNode is asked anything
        size, nodes = federation(grid, settings)
        serve(grid, settings.config(size), settings, names, nodes)
    except ConfigError as exc:
        log(ERROR, "error: %s", exc)
        raise


def serve(grid: Grid, cfg: RunConfig, settings: AppSettings, trackers: list[str],
          nodes: dict[int, int]) -> None:
    """Run ``cfg`` on Flower's ``grid`` (``nodes``: client id → node id) and write its run
    directory (and tracker outputs)."""
    from simulations.core.runner import Simulation
    from simulations.core.trackers import Trackers

    sim = Simulation(cfg, overwrite=settings.overwrite, on_round=_log_round(cfg.rounds))
    tracking = Trackers(trackers, sim.run_dir, sim.cfg)
    tracking.attach(sim)
    try:
        result = sim.run(grid=grid, node_of_client=nodes)
        tracking.finish(result)
    finally:
        tracking.close()
    s = result.summary
    log(INFO, "%s on %s: final test accuracy %.2f %% after %d rounds (%.1f s) -> %s", s["strategy"],
        s["dataset"], 100 * s["final_test_accuracy"], s["rounds"], s["wall_seconds"],
        result.run_dir.resolve())


def _log_round(rounds: int) -> Any:
    """An ``on_round`` callback that logs one line per round (``flwr log`` shows them)."""

    def on_round(row: dict[str, Any]) -> None:
        acc = row.get("test_accuracy", float("nan"))
        extra = "" if acc != acc else f", test accuracy {100 * acc:.1f} %"
        log(INFO, "round %d/%d: %s clients%s", row["round"], rounds, row.get("clients", 0), extra)

    return on_round


def federation(grid: Grid, settings: AppSettings) -> tuple[int, dict[int, int]]:
    """The number of clients and ``{client id: node id}``, from one query to the SuperNodes.

    Waits up to ``node-wait`` s for a first SuperNode, asks every connected one its
    ``partition-id`` and ``num-partitions``; the number of clients is ``num-clients`` or, unset,
    the nodes' ``num-partitions`` (they must agree). SuperNodes still missing then are waited for
    by :func:`simulations.core.engine.partition_map`, which asks them all again.
    """
    from simulations.core.engine import partition_map

    deadline = time.monotonic() + settings.node_wait
    while not (nodes := sorted(grid.get_node_ids())):
        if time.monotonic() > deadline:
            raise ConfigError("node-wait", f"no SuperNode connected within {settings.node_wait:g} s")
        time.sleep(0.2)
    replies = grid.send_and_receive([Message(RecordDict(), int(n), MessageType.QUERY) for n in nodes],
                                    timeout=settings.node_wait)
    clients: dict[int, int] = {}
    partitions: set[int] = set()
    for reply in replies:
        if reply.has_error():
            raise RuntimeError(f"SuperNode {reply.metadata.src_node_id} failed the id query: {reply.error.reason}")
        metrics = next(iter(reply.content.metric_records.values()))
        cid, node = int(metrics["client-id"]), int(reply.metadata.src_node_id)  # type: ignore[arg-type]
        if cid in clients:
            raise ConfigError("partition-id", f"SuperNodes {clients[cid]} and {node} both hold partition-id={cid}")
        clients[cid] = node
        if NUM_PARTITIONS_KEY in metrics:
            partitions.add(int(metrics[NUM_PARTITIONS_KEY]))  # type: ignore[arg-type]
    if len(partitions) > 1:
        raise ConfigError(NUM_PARTITIONS_KEY, f"the SuperNodes disagree: {sorted(partitions)}")
    held = next(iter(partitions), None)
    size = settings.num_clients if settings.num_clients is not None else held
    if size is None:
        raise ConfigError("num-clients", f"the SuperNodes have no {NUM_PARTITIONS_KEY!r} in their "
                          "node config; set num-clients")
    if held is not None and held != size:
        raise ConfigError("num-clients", f"{size}, but the SuperNodes hold {NUM_PARTITIONS_KEY}={held} "
                          "(one client per SuperNode)")
    if sorted(clients) == list(range(size)):
        return size, clients
    return size, partition_map(grid, size, timeout=max(1.0, deadline - time.monotonic()))


# ---------------------------------------------------------------------------------------- client
client_app = ClientApp()

#: One ClientRuntime per run config in this process (a SuperNode's process may serve several runs).
_RUNTIMES: dict[tuple[tuple[str, Any], ...], ClientRuntime] = {}


def runtime_for(context: Context) -> ClientRuntime:
    """The :class:`ClientRuntime` of the run ``context`` belongs to (built once per process)."""
    from simulations.core.client_app import ClientRuntime

    partitions = context.node_config.get(NUM_PARTITIONS_KEY)
    key = (*sorted(context.run_config.items()), (NUM_PARTITIONS_KEY, partitions))
    if key not in _RUNTIMES:
        settings = parse_run_config(context.run_config)
        cfg = settings.config(None if partitions is None else int(partitions))  # type: ignore[arg-type]
        _RUNTIMES[key] = ClientRuntime(cfg)
    return _RUNTIMES[key]


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    return runtime_for(context).handle_train(msg, context)


@client_app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    return runtime_for(context).handle_evaluate(msg, context)


@client_app.query()
def _query(msg: Message, context: Context) -> Message:
    """This node's partition id and federation size (no data or model needed)."""
    from simulations.core.client_app import client_id

    metrics: dict[str, int] = {"client-id": client_id(context)}
    if NUM_PARTITIONS_KEY in context.node_config:
        metrics[NUM_PARTITIONS_KEY] = int(context.node_config[NUM_PARTITIONS_KEY])  # type: ignore[arg-type]
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


__all__ = ["AppSettings", "client_app", "parse_run_config", "server_app"]
