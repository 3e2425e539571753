"""Local training of a FedIns pool (:class:`~fedagg.ssf.pool.SSFPoolModel`): one client, or many batched.

A step on a minibatch of ``b`` samples minimises the FedIns surrogate (``fedins_merging.md`` §2.3)

.. math::  L = (1 − λ)\\,\\mathrm{CE}(\\mathrm{logits}, y) + λ\\Big(1 − \\frac1b \\sum_b \\sum_{j∈I_b}
           \\cos(q_b, k_j)\\Big)

over the pool tensors only (the backbone is frozen), with SGD (momentum and weight decay as
``torch.optim.SGD``) or Adam (``torch.optim.Adam`` defaults), clipping the pool's gradient norm to
``max_grad_norm`` first. :func:`train_pool` trains one client in place; :func:`batched_train_pool`
trains many from the same pool in one computation (see :mod:`fedagg.batched`) with the same result
per client, to float32 rounding. ``proximal_mu`` is not used here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fedagg.batched.core import (
    BatchedResult,
    BatchPlan,
    ClientJob,
    StepFn,
    check_batchable,
    masked_mean,
    run_batched,
    vmap_clients,
)
from fedagg.errors import ConfigError
from fedagg.ssf.pool import SSFPoolModel, fedins_loss
from fedagg.training import LocalTrainConfig, minibatches

__all__ = ["OPTIMIZERS", "batched_train_pool", "train_pool"]

OPTIMIZERS = ("sgd", "adam")
METRICS = ("train_loss", "train_ce", "train_cos", "slots_used")


def _check_optimizer(optimizer: str) -> None:
    if optimizer not in OPTIMIZERS:
        raise ConfigError("strategy_args.optimizer",
                          f"unknown value {optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")


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
        return dict.fromkeys(METRICS, nan)
    params = model.pool_parameters()
    _check_optimizer(optimizer)
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
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


class _FromQuery(nn.Module):
    """``(x, q) -> (logits (B, K), Σ_{j∈I_b} cos(q_b, k_j) (B,), I (B, k))`` of ``model``."""

    def __init__(self, model: SSFPoolModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, match = self.model.forward_from_query(x, query)
        return logits, match.sim.gather(1, match.idx).sum(1), match.idx


def batched_train_pool(
    model: SSFPoolModel, jobs: Sequence[ClientJob], *, lam: float = 0.1, optimizer: str = "sgd",
) -> BatchedResult:
    """:func:`train_pool` for every job from ``model``'s current pool, in one computation.

    ``model`` is not modified. ``result.metrics[i]`` holds client ``i``'s ``train_loss``,
    ``train_ce``, ``train_cos`` and ``slots_used`` (all NaN without data or steps), and
    ``result.losses[i]`` its ``train_loss``. The query pass (frozen backbone, no SSF) runs once per
    step on all clients' minibatches together. Needs per-instance slot selection (see
    :func:`fedagg.batched.can_batch`).
    """
    _check_optimizer(optimizer)
    if not isinstance(model, SSFPoolModel):
        raise TypeError(f"batched_train_pool needs an SSFPoolModel, got {type(model).__name__}")
    check_batchable(model, jobs)
    names = [n for n, _ in model.named_pool_parameters()]
    wrapper = _FromQuery(model)
    forward = vmap_clients(lambda p, x, q: torch.func.functional_call(
        wrapper, {f"model.{n}": v for n, v in p.items()}, (x, q)))
    seen: dict[str, tuple[BatchPlan, torch.Tensor]] = {}

    def make_step(plan: BatchPlan) -> StepFn:
        used = torch.zeros(len(plan.order), model.keys.shape[0], dtype=torch.bool,
                           device=plan.x.device)
        seen["plan"] = (plan, used)

        def step(params: dict[str, torch.Tensor], rows: torch.Tensor, valid: torch.Tensor | None,
                 count: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            m, b = rows.shape
            x, y = plan.x[rows], plan.y[rows]
            query = model.query(x.reshape(m * b, *x.shape[2:])).reshape(m, b, -1)
            logits, sim, top = forward(params, x, query)
            ce = masked_mean(F.cross_entropy(logits.reshape(m * b, -1), y.reshape(-1),
                                             reduction="none").reshape(m, b), valid, count)
            cos = masked_mean(sim, valid, count)
            with torch.no_grad():
                if valid is not None:  # padded samples select nothing: use the client's first
                    top = torch.where(valid[..., None], top, top[:, :1])
                used[:m].scatter_(1, top.reshape(m, -1), True)
            return (1.0 - lam) * ce + lam * (1.0 - cos), {"train_ce": ce, "train_cos": cos}

        return step

    result, means = run_batched(model, jobs, names, make_step, optimizer=optimizer,  # type: ignore[arg-type]
                                prox=False, records=("train_ce", "train_cos"))
    slots = dict.fromkeys(range(len(jobs)), float("nan"))
    if "plan" in seen:
        plan, used = seen["plan"]
        for slot, i in enumerate(plan.order):
            slots[i] = float(used[slot].sum())
    result.metrics = [
        {"train_loss": loss, "train_ce": mean["train_ce"],
         "train_cos": mean["train_cos"] / model.top_k, "slots_used": slots[i]}
        for i, (loss, mean) in enumerate(zip(result.losses, means, strict=True))
    ]
    return result
