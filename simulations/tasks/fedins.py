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
``(seed, "local-train", round, client)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from flwr.app import ConfigRecord, Context, MetricRecord, RecordDict

from fedagg.errors import ConfigError
from fedagg.ssf.pool import SSFPoolModel, fedins_loss
from fedagg.training import LocalTrainConfig, load_numpy_state, minibatches, state_to_numpy
from simulations.client_app import TASKS, ClientRuntime
from strategies.arrays import to_record

__all__ = ["OPTIMIZERS", "fedins_task", "train_pool"]

OPTIMIZERS = ("sgd", "adam")


def train_pool(
    model: SSFPoolModel, x: torch.Tensor, y: torch.Tensor, cfg: LocalTrainConfig,
    generator: torch.Generator, *, lam: float = 0.1, optimizer: str = "sgd",
) -> dict[str, float]:
    """Train ``model``'s pool tensors in place on ``(x, y)``; the backbone is not touched.

    ``cfg.steps`` steps on minibatches of ``cfg.batch_size`` (see :class:`LocalTrainConfig`), loss
    :func:`~fedagg.ssf.pool.fedins_loss` with weight ``lam``; ``optimizer`` ``sgd`` (lr, momentum,
    weight decay from ``cfg``) or ``adam`` (lr, weight decay). ``cfg.max_grad_norm`` clips.

    Returns
    -------
    dict
        Means over the steps: ``train_loss`` (the surrogate loss), ``train_ce`` (cross-entropy),
        ``train_cos`` (mean cosine of a sample to its k selected keys, in [-1, 1]) and
        ``slots_used`` (distinct slots selected at least once). NaN for a client without data.
    """
    nan = float("nan")
    if len(y) == 0 or cfg.steps == 0:
        return {"train_loss": nan, "train_ce": nan, "train_cos": nan, "slots_used": nan}
    params = model.pool_parameters()
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    elif optimizer == "adam":
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        raise ConfigError("strategy_args.optimizer",
                          f"unknown value {optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")
    model.train()
    totals = {"train_loss": 0.0, "train_ce": 0.0, "train_cos": 0.0}
    used = torch.zeros(model.keys.shape[0], dtype=torch.bool)
    steps = 0
    for idx in minibatches(len(y), cfg.batch_size, cfg.steps, generator):
        opt.zero_grad(set_to_none=True)
        logits, match = model.forward_with_match(x[idx])
        loss = fedins_loss(logits, y[idx], match.reduced_sim, lam)
        loss.backward()
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        with torch.no_grad():
            totals["train_loss"] += float(loss)
            totals["train_ce"] += float(F.cross_entropy(logits, y[idx]))
            totals["train_cos"] += float(match.reduced_sim) / model.top_k
            used[match.idx.reshape(-1).cpu()] = True
        steps += 1
    out = {k: v / steps for k, v in totals.items()}
    out["slots_used"] = float(used.sum())
    return out


@TASKS.register("fedins", doc="FedIns: train only the SSF pool with the surrogate loss; reply "
                "with the pool.")
def fedins_task(rt: ClientRuntime, cid: int, content: RecordDict, context: Context) -> RecordDict:
    """Load the broadcast pool in place, run :func:`train_pool`, reply ``arrays`` + ``metrics``."""
    del context
    config = content.config_records.get("config", ConfigRecord())
    model = rt.model()
    if not isinstance(model, SSFPoolModel):
        raise ConfigError("model", f"task 'fedins' needs model: fedins, got {rt.config['model']!r}")
    load_numpy_state(model, rt.broadcast_state(content))
    t = rt.tensors(cid)
    server_round = int(config.get("server-round", 0))
    lam = float(config.get("fedins-lambda", 0.1))
    if not 0.0 <= lam <= 1.0 or math.isnan(lam):
        raise ConfigError("strategy_args.lam", f"must be in [0, 1], got {lam}")
    stats = train_pool(model, t.x, t.y, rt.train_config(config),
                       rt.generator("local-train", server_round, cid), lam=lam,
                       optimizer=str(config.get("optimizer", "sgd")))
    metrics = {"num-examples": int(len(t.y)), "client-id": cid, **stats}
    return RecordDict({"arrays": to_record(state_to_numpy(model)), "metrics": MetricRecord(metrics)})
