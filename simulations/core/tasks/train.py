"""The default client task ``train``: local SGD from the broadcast model, and its batched version."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from flwr.app import ConfigRecord, Context, MetricRecord, RecordDict

from fedagg.batched import BatchedResult, ClientJob, batched_local_sgd
from fedagg.training import load_numpy_state, local_sgd, state_to_numpy
from strategies.arrays import config_record, to_record

if TYPE_CHECKING:
    from simulations.core.client_app import ClientRuntime


def train_task(rt: ClientRuntime, cid: int, content: RecordDict, context: Context) -> RecordDict:
    """Load the global model in place, run local SGD, reply ``arrays`` + ``metrics``."""
    config = config_record(content)
    model = rt.model()
    load_numpy_state(model, rt.broadcast_state(content))
    t = rt.tensors(cid)
    server_round = int(config.get("server-round", 0))
    loss = local_sgd(model, t.x, t.y, rt.train_config(config, cid), rt.generator("local-train", server_round, cid))
    metrics = {"num-examples": int(len(t.y)), "train_loss": float(loss), "client-id": cid}
    return RecordDict({"arrays": to_record(state_to_numpy(model)), "metrics": MetricRecord(metrics)})


def batched_train(rt: ClientRuntime, model: torch.nn.Module, config: ConfigRecord,
                  jobs: list[ClientJob]) -> BatchedResult:
    """``train`` for many clients at once: :func:`fedagg.batched.batched_local_sgd`."""
    del rt, config
    return batched_local_sgd(model, jobs)
