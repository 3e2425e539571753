"""The Flower ClientApp of a simulation, and what a client process keeps between messages.

``make_client_app(cfg)`` returns a real ``flwr.clientapp.ClientApp``: it runs under our Ray
engine, under ``flwr.simulation.run_simulation`` and, given a ``partition-id`` in the node config,
on a real SuperNode. A :class:`ClientRuntime` is built once per process and reused for every
virtual client that process serves; it holds the run's typed :class:`~simulations.core.config.RunConfig`
(a process boundary carries it as JSON and rebuilds it once on the other side). The federated data is loaded once (from the on-disk cache), and
one model instance per model kind is kept and loaded in place with each message's weights.

What a train message asks for is the ``task`` key of its ConfigRecord (default ``train``: local SGD);
tasks are listed in :mod:`simulations.core.tasks` (:data:`TASKS`; families add their own, e.g. ``fisher``).
All local randomness comes from a generator keyed by ``(seed, "local-train", round, client)``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedagg.batched import ClientJob, can_batch
from fedagg.data import FederatedData, load_federated
from fedagg.models import build_model
from fedagg.rng import numpy_rng, torch_generator
from fedagg.training import LocalTrainConfig, evaluate, load_numpy_state
from simulations.core.config import RunConfig
from simulations.core.profiles import ProfileTable
from simulations.core.tasks import BATCHED_TASKS, TASKS
from strategies.arrays import config_record, metric_record, record_dict, to_numpy, to_record

PARTITION_ID_KEY = "partition-id"

#: Clients whose data tensors a process keeps (least recently used ones are dropped).
TENSOR_CACHE = 256


def resolve_device(requested: str = "auto") -> torch.device:
    """``cuda`` when asked for or (``auto``) when this process sees a GPU, else ``cpu``."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device: cuda requested but no GPU is visible to this process")
        return torch.device("cuda")
    return torch.device("cpu")


@dataclasses.dataclass
class ClientTensors:
    """A client's train and test data as tensors on the runtime's device."""

    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


class ClientRuntime:
    """Per-process state shared by all virtual clients of one run (lazy; cheap to pickle)."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self._data: FederatedData | None = None
        self._models: dict[str, torch.nn.Module] = {}
        self._tensors: dict[int, ClientTensors] = {}
        self._device: torch.device | None = None
        self._profiles: ProfileTable | None = None
        self._broadcast: tuple[RecordDict, dict[str, np.ndarray]] | None = None
        self._batch_reasons: dict[int, str | None] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config.model_dump(mode="json")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(RunConfig.model_validate(state["config"]))  # type: ignore[misc]

    # ------------------------------------------------------------------ lazy resources
    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def device(self) -> torch.device:
        if self._device is None:
            self._device = resolve_device(self.config.device)
        return self._device

    def set_data(self, data: FederatedData) -> None:
        """Use already-loaded federated data (the server loads it once for evaluation)."""
        self._data = data

    @property
    def data(self) -> FederatedData:
        if self._data is None:
            c = self.config
            self._data = load_federated(
                c.dataset, c.num_clients, self.seed, partition=c.partition,
                partition_args=c.resolved_partition_args(), dataset_args=c.dataset_args,
                test_fraction=c.test_fraction,
            )
        return self._data

    def model(self, name: str | None = None, params: Mapping[str, Any] | None = None) -> torch.nn.Module:
        """The process's model instance of kind ``name`` (default: the run's model)."""
        name = name or self.config.model
        params = dict(params if params is not None else self.config.model_args)
        key = f"{name}:{sorted(params.items())}"
        if key not in self._models:
            d = self.data
            self._models[key] = build_model(name, d.input_shape, d.num_classes, self.seed, params).to(self.device)
        return self._models[key]

    def tensors(self, cid: int) -> ClientTensors:
        """Client ``cid``'s data on the device (an LRU cache of :data:`TENSOR_CACHE` clients per
        process, so memory does not grow with the population)."""
        if cid in self._tensors:
            self._tensors[cid] = self._tensors.pop(cid)  # most recently used last
        else:
            while len(self._tensors) >= TENSOR_CACHE:
                self._tensors.pop(next(iter(self._tensors)))
            from simulations.core.byzantine import data_attack

            train, test = self.data.client(cid)
            dev = self.device
            y = data_attack(self.config, cid, train.y, num_classes=self.data.num_classes)
            self._tensors[cid] = ClientTensors(
                torch.as_tensor(train.x, device=dev), torch.as_tensor(y, device=dev),
                torch.as_tensor(test.x, device=dev), torch.as_tensor(test.y, device=dev),
            )
        return self._tensors[cid]

    @property
    def profiles(self) -> ProfileTable:
        """Client → hardware profile of this run (computed once per process)."""
        if self._profiles is None:
            self._profiles = ProfileTable(self.config)
        return self._profiles

    def train_config(self, config: ConfigRecord, cid: int | None = None) -> LocalTrainConfig:
        """Local optimisation settings: the message's ConfigRecord, falling back to the run config;
        client ``cid``'s profile overrides ``local_steps``/``batch_size`` where it sets them."""
        c = self.config
        steps = int(config.get("local-steps", c.local_steps))
        batch = int(config.get("batch-size", c.batch_size))
        if cid is not None and c.profiles:
            prof = self.profiles.of(cid)
            steps = prof.local_steps if prof.local_steps is not None else steps
            batch = prof.batch_size if prof.batch_size is not None else batch
        return LocalTrainConfig(
            steps=steps,
            lr=float(config.get("lr", c.lr)),
            batch_size=batch,
            momentum=float(config.get("momentum", c.momentum)),
            weight_decay=float(config.get("weight-decay", c.weight_decay)),
            proximal_mu=float(config.get("proximal-mu", 0.0)),
        )

    def generator(self, purpose: str, server_round: int, cid: int) -> torch.Generator:
        return torch_generator(self.seed, purpose, server_round, cid)

    def broadcast_state(self, content: RecordDict) -> dict[str, np.ndarray]:
        """The global model a message carries (``arrays``), decoded once per broadcast content:
        every client of a round gets the same RecordDict object, so a worker decodes it once."""
        if self._broadcast is None or self._broadcast[0] is not content:
            self._broadcast = (content, to_numpy(content["arrays"]))  # type: ignore[arg-type]
        return self._broadcast[1]

    def batch_reason(self, content: RecordDict) -> str | None:
        """Why train messages with ``content`` cannot be served by :meth:`train_batch` (None: they can)."""
        if not self.config.batched_clients:
            return "batched_clients is off"
        config = config_record(content)
        task = str(config.get("task", "train"))
        if task not in BATCHED_TASKS:
            return f"task {task!r} has no batched path (batched: {', '.join(sorted(BATCHED_TASKS))})"
        model = self.model()
        if id(model) not in self._batch_reasons:
            self._batch_reasons[id(model)] = can_batch(model)
        return self._batch_reasons[id(model)]

    def batch_limit(self) -> int:
        """Most clients per batched call: what fits in ``batch_memory_mb`` (per client: parameters,
        gradients, momentum, FedProx anchor and a working copy of the trainable tensors, plus
        activations of a minibatch), at least one. Engines cut a round's train messages into
        chunks of at most this many, by client id, the same way on every engine."""
        model = self.model()
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        width = sum(p.shape[0] for p in model.parameters() if p.requires_grad and p.dim() > 1)
        batch = self.config.batch_size
        sample = int(math.prod(self.data.input_shape))
        per_client = 4 * (5 * params + 4 * batch * (sample + width))
        budget = self.config.batch_memory_mb * 2**20
        return max(1, int(budget // per_client))

    def train_batch(self, messages: list[Message], client_ids: list[int]) -> list[Message | Exception]:
        """Serve train messages that share one broadcast content with one batched computation
        (the task's entry in :data:`BATCHED_TASKS`, e.g. :func:`fedagg.batched.batched_local_sgd`):
        one reply per message, in order; a client whose injected fault fires, or every client when
        the batched call raises, gets the exception instead (the engine turns it into an error
        reply). Results equal the per-client path to float32 rounding."""
        content = messages[0].content
        config = config_record(content)
        server_round = int(config.get("server-round", 0))
        out: list[Message | Exception | None] = [None] * len(messages)
        jobs: list[ClientJob] = []
        where: list[int] = []
        shared = None if self.config.profiles else self.train_config(config)  # same for all
        for i, cid in enumerate(client_ids):
            try:
                self.inject_faults(server_round, cid)
            except Exception as exc:  # noqa: BLE001 - this client's failure only
                out[i] = exc
                continue
            t = self.tensors(cid)
            jobs.append(ClientJob(t.x, t.y, shared or self.train_config(config, cid),
                                  self.generator("local-train", server_round, cid)))
            where.append(i)
        if not jobs:
            return out  # type: ignore[return-value]
        model = self.model()
        load_numpy_state(model, self.broadcast_state(content))
        try:
            result = BATCHED_TASKS[str(config.get("task", "train"))](self, model, config, jobs)
        except Exception as exc:  # noqa: BLE001 - as if each client had raised it
            for i in where:
                out[i] = exc
            return out  # type: ignore[return-value]
        stacked = result.numpy()  # (k, ...) arrays, converted once; client j's tensors are views
        for j, job in enumerate(jobs):
            i = where[j]
            metrics = {"num-examples": int(len(job.y)), "train_loss": float(result.losses[j]),
                       "client-id": int(client_ids[i]), **result.metrics[j]}
            reply = record_dict({"arrays": to_record({k: v[j] for k, v in stacked.items()}),
                                 "metrics": metric_record(metrics)})
            out[i] = Message(reply, reply_to=messages[i])
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ handlers
    def inject_faults(self, server_round: int, cid: int) -> None:
        """Injected failures of the run's ``faults`` config (see ``FaultsConfig``)."""
        if self.config.profiles:
            prof = self.profiles.of(cid)
            p = prof.dropout_prob
            if p > 0 and numpy_rng(self.seed, "dropout", server_round, cid).random() < p:
                raise ClientDropout(f"client {cid} dropped out in round {server_round} "
                                    f"(profile {prof.name!r})")
        crash, hang, kill = self.faults(server_round, cid)
        if kill:
            os._exit(17)  # the worker process dies mid-task (as on an OOM kill)
        if crash:
            raise InjectedFault(f"injected crash of client {cid} in round {server_round}")
        if hang:
            time.sleep(self.config.faults.hang_seconds)

    def faults(self, server_round: int, cid: int) -> tuple[bool, bool, bool]:
        """``(crash, hang, kill_worker)``: which injected faults fire for ``cid`` in ``server_round``
        (drawn from ``(seed, "fault", round, client)``, so engines can plan around a hang)."""
        faults = self.config.faults
        if not (faults.crash_prob or faults.hang_prob or faults.hang or faults.kill_worker):
            return False, False, False
        here = (server_round, cid)
        kill = here in faults.kill_worker
        u = numpy_rng(self.seed, "fault", server_round, cid).random(2)
        crash = bool(u[0] < faults.crash_prob)
        hang = not crash and (here in faults.hang or bool(u[1] < faults.hang_prob))
        return crash, hang, kill

    def handle_train(self, msg: Message, context: Context) -> Message:
        cid = client_id(context)
        config = config_record(msg.content)
        self.inject_faults(int(config.get("server-round", 0)), cid)
        task = str(config.get("task", "train"))
        handler: Callable[..., RecordDict] = TASKS.entry(task, field="task").factory
        return Message(handler(self, cid, msg.content, context), reply_to=msg)

    def handle_evaluate(self, msg: Message, context: Context) -> Message:
        cid = client_id(context)
        model = self.model()
        load_numpy_state(model, self.broadcast_state(msg.content))
        t = self.tensors(cid)
        loss, acc = evaluate(model, t.x_test, t.y_test)
        metrics = {"num-examples": int(len(t.y_test)), "test_loss": loss, "test_accuracy": acc,
                   "client-id": cid}
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    def handle_query(self, msg: Message, context: Context) -> Message:
        """Report this node's partition id (lets a server map Flower node ids to clients)."""
        content = RecordDict({"metrics": MetricRecord({"client-id": client_id(context)})})
        return Message(content, reply_to=msg)


class InjectedFault(RuntimeError):
    """A failure injected on purpose (``faults.crash_prob``)."""


class ClientDropout(RuntimeError):
    """A client of a profile with ``dropout_prob`` left the round."""


def client_id(context: Context) -> int:
    """The client (partition) id of the node running this message."""
    if PARTITION_ID_KEY not in context.node_config:
        raise KeyError(f"node_config has no {PARTITION_ID_KEY!r}; start the SuperNode with "
                       f"--node-config 'partition-id=<k>'")
    return int(context.node_config[PARTITION_ID_KEY])


def make_client_app(config: RunConfig, runtime: ClientRuntime | None = None) -> ClientApp:
    """A Flower ClientApp for the run described by ``config``.

    ``runtime`` shares an existing :class:`ClientRuntime` (the inline engine reuses the server's:
    one dataset, one model instance in the process); a pickled app carries only the config.
    """
    runtime = runtime if runtime is not None else ClientRuntime(config)
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        return runtime.handle_train(msg, context)

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return runtime.handle_evaluate(msg, context)

    @app.query()
    def _query(msg: Message, context: Context) -> Message:
        return runtime.handle_query(msg, context)

    app.fedagg_runtime = runtime  # type: ignore[attr-defined]  # lets engines warm it up
    return app


def warm_up(app: ClientApp) -> None:
    """Load the data and build the model of ``app``'s runtime now (engines call this when a worker
    starts, so the first round does not pay for it). No-op for other ClientApps."""
    runtime = getattr(app, "fedagg_runtime", None)
    if isinstance(runtime, ClientRuntime):
        model = runtime.model()
        # the first optimizer a process builds imports torch._dynamo (~2 s): pay it now
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad][:1] or
                        [torch.zeros(1, requires_grad=True)], lr=0.1)


def num_params(arrays: ArrayRecord) -> int:
    """Number of scalars in an ArrayRecord."""
    return int(sum(np.prod(v.shape) for v in arrays.values()))
