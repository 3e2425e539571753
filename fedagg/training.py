"""Local training and evaluation of a classifier (plain torch, deterministic given a generator)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


@dataclasses.dataclass(frozen=True)
class LocalTrainConfig:
    """Local optimisation of one client-round.

    ``steps`` minibatch SGD steps of ``batch_size`` samples with learning rate ``lr`` (momentum and
    weight decay as in ``torch.optim.SGD``). Minibatches walk through random permutations of the
    client's data; a partial last batch is skipped (a new permutation starts), unless the client has
    fewer samples than ``batch_size``, in which case every step uses all of them. ``proximal_mu > 0``
    adds FedProx's ``μ/2·‖w − w_global‖²``. ``max_grad_norm`` clips the gradient norm per step.
    """

    steps: int = 5
    lr: float = 0.05
    batch_size: int = 32
    momentum: float = 0.0
    weight_decay: float = 0.0
    proximal_mu: float = 0.0
    max_grad_norm: float | None = None


def minibatches(n: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """``steps`` index batches over ``range(n)`` (see :class:`LocalTrainConfig`)."""
    if n == 0:
        return
    if n <= batch_size:
        full = torch.arange(n)
        for _ in range(steps):
            yield full
        return
    per_epoch = n // batch_size
    perm = torch.randperm(n, generator=generator)
    pos = 0
    for _ in range(steps):
        if pos == per_epoch:
            perm, pos = torch.randperm(n, generator=generator), 0
        yield perm[pos * batch_size : (pos + 1) * batch_size]
        pos += 1


def local_sgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: LocalTrainConfig,
    generator: torch.Generator,
    *,
    loss_fn: nn.Module | None = None,
    params: list[nn.Parameter] | None = None,
) -> float:
    """Train ``model`` in place on ``(x, y)``; return the mean training loss over the steps.

    ``params`` restricts optimisation to a subset (default: all parameters that require grad).
    Returns ``nan`` and leaves the model untouched when the client has no data.
    """
    if len(y) == 0 or cfg.steps == 0:
        return float("nan")
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    trainable = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    anchor = [p.detach().clone() for p in trainable] if cfg.proximal_mu > 0 else None
    model.train()
    total = 0.0
    count = 0
    for idx in minibatches(len(y), cfg.batch_size, cfg.steps, generator):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x[idx]), y[idx])
        total += float(loss.detach())
        count += 1
        if anchor is not None:
            prox = sum(((p - a) ** 2).sum() for p, a in zip(trainable, anchor, strict=True))
            loss = loss + 0.5 * cfg.proximal_mu * prox
        loss.backward()
        if cfg.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        opt.step()
    return total / max(count, 1)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2048) -> tuple[float, float]:
    """``(mean cross-entropy, accuracy in [0, 1])`` of ``model`` on ``(x, y)``; ``(nan, nan)`` if empty."""
    if len(y) == 0:
        return float("nan"), float("nan")
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        logits = model(xb)
        loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    return loss_sum / len(y), correct / len(y)


def federated_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that travel between server and clients.

    A model may define ``federated_state_dict()`` to send only part of itself (e.g. FedIns sends
    its SSF pool, not the frozen backbone); otherwise its whole ``state_dict()`` travels.
    """
    fn = getattr(model, "federated_state_dict", None)
    return fn() if callable(fn) else model.state_dict()


def state_to_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's federated state (see :func:`federated_state`) as numpy copies, in order."""
    return {k: v.detach().cpu().numpy().copy() for k, v in federated_state(model).items()}


def load_numpy_state(model: nn.Module, arrays: Mapping[str, np.ndarray], strict: bool = True) -> None:
    """Copy ``arrays`` into the model's (federated) tensors in place (no new tensors)."""
    state = federated_state(model)
    if strict and set(arrays) != set(state):
        missing, extra = set(state) - set(arrays), set(arrays) - set(state)
        raise KeyError(f"state mismatch: missing {sorted(missing)}, unexpected {sorted(extra)}")
    with torch.no_grad():
        for k, v in arrays.items():
            if k in state:
                state[k].copy_(torch.as_tensor(np.asarray(v)))
