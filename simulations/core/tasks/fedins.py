"""Client tasks of the fedins family: ``fedins`` (local training of the SSF pool only).

The ``fedins`` strategy (``strategies/fedins.py``) asks for it with ``task: fedins`` in its train
ConfigRecord, plus ``fedins-lambda`` (λ) and ``optimizer`` (``sgd`` | ``adam``). The client loads the
broadcast pool in place (the frozen backbone never travels), runs ``local-steps`` minibatch steps of
the FedIns surrogate loss (``fedins_merging.md`` §2.3)

    L = (1 − λ)·CE(logits, y) + λ·(1 − Σ_{j∈top-k} cos(q, k_j))     (batch means)

on the pool tensors only, and replies with the pool (``arrays``) and ``metrics``. The reference
(§2.4) takes plain SGD steps (lr 1e-2, no momentum) on batches of 32 and, in its 2025 code, one
instance at a time; here a step is one minibatch with per-instance slot selection (the batch loss
is the mean of the per-instance losses), with SGD (``momentum``/``weight-decay`` from the run
config) or Adam. Batches come from :func:`fedagg.training.minibatches` with the generator
``(seed, "local-train", round, client)``. The training loop is
:func:`fedagg.ssf.training.train_pool`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from flwr.app import ConfigRecord, Context, MetricRecord, RecordDict

from fedagg.batched import BatchedResult, ClientJob
from fedagg.errors import ConfigError
from fedagg.ssf.pool import SSFPoolModel
from fedagg.ssf.training import OPTIMIZERS, batched_train_pool, train_pool
from fedagg.training import load_numpy_state, state_to_numpy
from strategies.arrays import to_record

if TYPE_CHECKING:
    from simulations.core.client_app import ClientRuntime

__all__ = ["OPTIMIZERS", "batched_fedins", "fedins_task", "train_pool"]


def _fedins_args(rt: ClientRuntime, config: ConfigRecord) -> tuple[SSFPoolModel, float, str]:
    """The pool model, λ and the optimizer of a ``fedins`` train message (ConfigError if bad)."""
    model = rt.model()
    if not isinstance(model, SSFPoolModel):
        raise ConfigError("model", f"task 'fedins' needs model: fedins, got {rt.config.model!r}")
    lam = float(config.get("fedins-lambda", 0.1))
    if not 0.0 <= lam <= 1.0 or math.isnan(lam):
        raise ConfigError("strategy_args.lam", f"must be in [0, 1], got {lam}")
    return model, lam, str(config.get("optimizer", "sgd"))


def batched_fedins(rt: ClientRuntime, model: torch.nn.Module, config: ConfigRecord,
                   jobs: list[ClientJob]) -> BatchedResult:
    """``fedins`` for many clients at once: :func:`fedagg.ssf.training.batched_train_pool`."""
    pool, lam, optimizer = _fedins_args(rt, config)
    return batched_train_pool(pool, jobs, lam=lam, optimizer=optimizer)


def fedins_task(rt: ClientRuntime, cid: int, content: RecordDict, context: Context) -> RecordDict:
    """Load the broadcast pool in place, run :func:`train_pool`, reply ``arrays`` + ``metrics``."""
    del context
    config = content.config_records.get("config", ConfigRecord())
    model, lam, optimizer = _fedins_args(rt, config)
    load_numpy_state(model, rt.broadcast_state(content))
    t = rt.tensors(cid)
    server_round = int(config.get("server-round", 0))
    stats = train_pool(model, t.x, t.y, rt.train_config(config),
                       rt.generator("local-train", server_round, cid), lam=lam, optimizer=optimizer)
    metrics = {"num-examples": int(len(t.y)), "client-id": cid, **stats}
    return RecordDict({"arrays": to_record(state_to_numpy(model)), "metrics": MetricRecord(metrics)})
