"""Client tasks: what a train message asks a client to do (the ``task`` key of its ConfigRecord).

This module is the one place that lists them. :func:`register_tasks` puts every task of the task
modules into a registry; :data:`TASKS` and :data:`BATCHED_TASKS` are built from it here, so
importing :mod:`simulations.core.client_app` (which uses them) needs nothing imported first. Task modules
only define functions; to add a task, write it in a module here and list it in
:func:`register_tasks`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from flwr.app import ConfigRecord, RecordDict

from fedagg.batched import BatchedResult, ClientJob
from fedagg.registry import Registry
from simulations.core.tasks import fedins, merging, train

if TYPE_CHECKING:
    from simulations.core.client_app import ClientRuntime

#: A batched version of a client task: ``fn(runtime, model, config, jobs) -> BatchedResult`` trains
#: ``jobs`` from ``model``'s current weights in one computation (``ClientRuntime.train_batch``).
BatchedTask = Callable[["ClientRuntime", torch.nn.Module, ConfigRecord, list[ClientJob]], BatchedResult]


def register_tasks(tasks: Registry[RecordDict], batched: dict[str, BatchedTask]) -> None:
    """Add every client task to ``tasks`` (``task(runtime, client_id, content, context) ->
    RecordDict``, the reply content) and the batched versions to ``batched``."""
    tasks.add("train", train.train_task,
              doc="Local SGD from the broadcast model; reply with the local model.")
    tasks.add("fisher", merging.fisher_task,
              doc="Local SGD, then the diagonal Fisher at the local model on local data; "
                  "reply arrays + fisher + metrics.")
    tasks.add("fedins", fedins.fedins_task,
              doc="FedIns: train only the SSF pool with the surrogate loss; reply with the pool.")
    batched["train"] = train.batched_train
    batched["fedins"] = fedins.batched_fedins


#: Client tasks by name (``train``: plain local SGD; families add theirs in :func:`register_tasks`).
TASKS: Registry[RecordDict] = Registry("client task")
#: Tasks with a batched path, by name (the others run once per client).
BATCHED_TASKS: dict[str, BatchedTask] = {}
register_tasks(TASKS, BATCHED_TASKS)
