"""Diagonal Fisher information of a classifier, per parameter, from per-example gradients.

For a model mapping an input ``x`` to logits ``z(x; θ) ∈ R^C`` with ``p = softmax(z)``, three
estimators of ``diag F`` (Matena & Raffel 2022, arXiv 2111.09832, §2; reference
``mmatena/model_merging/fisher.py``):

- ``"true"`` (the reference): exact expectation over the model's own predictive distribution,
  ``F(x) = Σ_y p(y|x) (∇_θ log p(y|x))²`` — one gradient per class per example; labels unused.
- ``"sampled"``: ``F(x) = (∇_θ log p(ŷ|x))²`` with ``ŷ ~ p(·|x)`` drawn through an explicit
  ``torch.Generator`` (an unbiased Monte-Carlo estimate of ``"true"``; cheaper for many classes).
- ``"empirical"``: ``F(x) = (∇_θ log p(y|x))²`` with the true label ``y`` (the "empirical
  Fisher"; *not* what the reference computes).

The estimate over examples is ``F̂ = (1/N) Σ_{n≤N} F(x_n)`` (``reduction="mean"``, the reference,
with ``N = 4096`` train examples there) or the sum (``reduction="sum"``, which keeps data-size
information, e.g. for federated clients). Per-example gradients are vectorised over the batch with
``torch.func`` (``functional_call`` + ``vmap`` + ``jacrev``/``grad``); the module is called on
batch-of-1 slices, as the reference does.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from fedagg.errors import ConfigError, unknown_name

__all__ = ["FISHER_ESTIMATORS", "diagonal_fisher"]

FISHER_ESTIMATORS = ("true", "sampled", "empirical")

Batch = torch.Tensor | tuple | list


def diagonal_fisher(
    model: nn.Module,
    data: torch.Tensor | np.ndarray | Iterable[Batch],
    *,
    estimator: Literal["true", "sampled", "empirical"] = "true",
    labels: torch.Tensor | np.ndarray | None = None,
    generator: torch.Generator | None = None,
    max_examples: int | None = None,
    batch_size: int = 32,
    reduction: Literal["mean", "sum"] = "mean",
    eval_mode: bool = True,
) -> dict[str, torch.Tensor]:
    r"""Diagonal Fisher of every trainable parameter of a classifier ``model``.

    .. math::

        \hat F = \frac{1}{N}\sum_{n=1}^{N} F(x_n),\qquad
        F(x) = \begin{cases}
          Σ_y p_θ(y|x)\,(∇_θ \log p_θ(y|x))^{⊙2} & \text{true (reference)}\\
          (∇_θ \log p_θ(ŷ|x))^{⊙2},\ ŷ \sim p_θ(·|x) & \text{sampled}\\
          (∇_θ \log p_θ(y_n|x))^{⊙2} & \text{empirical}
        \end{cases}

    (Matena & Raffel 2022, arXiv 2111.09832). For softmax regression ``z = xW + b`` the true
    Fisher is ``F_W[j,k] = mean_n x_{nj}² p_{nk}(1 − p_{nk})`` and
    ``F_b[k] = mean_n p_{nk}(1 − p_{nk})``.

    Parameters
    ----------
    model : ``nn.Module`` mapping a batch ``(B, *in)`` to logits ``(B, C)``.
    data : a tensor (or numpy array) ``(N, *in)`` of inputs, or an iterable of batches, each an input tensor
        ``(B, *in)`` or a tuple/list ``(x, y, …)`` whose second item holds labels ``(B,)``.
    estimator : ``"true"`` (default, the reference), ``"sampled"`` or ``"empirical"``.
    labels : ``(N,)`` integer labels when ``data`` is a tensor (``"empirical"`` only).
    generator : ``torch.Generator`` for ``"sampled"`` (required there). Labels are drawn on the
        generator's device from float64 probabilities, so a CPU generator gives the same draws
        whatever device the model runs on (for the same data order and ``batch_size``).
    max_examples : use at most the first ``max_examples`` examples (reference: 4096).
    batch_size : examples per vectorised chunk (batches from an iterable are split too). Memory is
        ``O(batch_size · C · #params)`` for ``"true"`` and ``O(batch_size · #params)`` otherwise.
    reduction : ``"mean"`` over examples (reference) or ``"sum"``.
    eval_mode : run the model in eval mode (dropout off, BatchNorm running stats), restoring
        every submodule's mode afterwards. The reference calls its Keras model in inference mode.

    Returns
    -------
    dict ``{name: (shape of the parameter)}`` for every ``named_parameters()`` entry with
    ``requires_grad`` (frozen parameters and buffers are treated as constants), on the
    parameters' device and dtype, detached. ``model`` and its ``.grad`` fields are untouched.

    Examples
    --------
    >>> lin = nn.Linear(3, 4)
    >>> F = diagonal_fisher(lin, torch.randn(8, 3, generator=torch.Generator().manual_seed(0)))
    >>> sorted(F), tuple(F["weight"].shape)
    (['bias', 'weight'], (4, 3))
    """
    if estimator not in FISHER_ESTIMATORS:
        raise unknown_name("estimator", estimator, FISHER_ESTIMATORS)
    if reduction not in ("mean", "sum"):
        raise unknown_name("reduction", reduction, ["mean", "sum"])
    if max_examples is not None and max_examples < 1:
        raise ConfigError("max_examples", f"must be >= 1, got {max_examples}")
    if batch_size < 1:
        raise ConfigError("batch_size", f"must be >= 1, got {batch_size}")
    if estimator == "sampled" and generator is None:
        raise ValueError('estimator "sampled" needs an explicit torch.Generator')

    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ValueError("model has no trainable parameters")
    constants = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    constants.update(dict(model.named_buffers()))
    first = next(iter(trainable.values()))
    device = first.device

    def log_probs(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """log p(·|x) for one example ``x`` (shape ``in``), as ``(C,)``."""
        logits = functional_call(model, (params, constants), (x.unsqueeze(0),))
        if logits.dim() != 2 or logits.shape[0] != 1:
            raise ValueError(f"model must map (B, *in) to logits (B, C), got {tuple(logits.shape)}")
        return torch.log_softmax(logits[0], dim=-1)

    def true_fisher(xb: torch.Tensor) -> dict[str, torch.Tensor]:
        def with_aux(params: dict[str, torch.Tensor], x: torch.Tensor):
            lp = log_probs(params, x)
            return lp, lp.detach()

        jac, logp = vmap(jacrev(with_aux, has_aux=True), in_dims=(None, 0))(trainable, xb)
        p = logp.exp()  # (B, C)
        out = {}
        for name, j in jac.items():  # j: (B, C, *shape)
            weight = p.reshape(*p.shape, *([1] * (j.dim() - 2))).to(j.dtype)
            out[name] = (weight * j.square()).sum(dim=(0, 1))
        return out

    def label_fisher(xb: torch.Tensor, yb: torch.Tensor) -> dict[str, torch.Tensor]:
        def picked(params: dict[str, torch.Tensor], x: torch.Tensor, onehot: torch.Tensor):
            return (log_probs(params, x) * onehot).sum()  # log p(y|x)

        with torch.no_grad():
            num_classes = functional_call(model, (trainable, constants), (xb[:1],)).shape[-1]
        onehot = torch.nn.functional.one_hot(yb.long(), int(num_classes)).to(first.dtype)
        g = vmap(grad(picked), in_dims=(None, 0, 0))(trainable, xb, onehot)
        return {name: gi.square().sum(dim=0) for name, gi in g.items()}

    def sample_labels(xb: torch.Tensor) -> torch.Tensor:
        assert generator is not None
        with torch.no_grad():
            logits = functional_call(model, (trainable, constants), (xb,))
        probs = torch.softmax(logits.to(torch.float64), dim=-1).to(generator.device)
        return torch.multinomial(probs, 1, generator=generator).reshape(-1).to(device)

    modes = {m: m.training for m in model.modules()}
    if eval_mode:
        model.eval()
    try:
        total: dict[str, torch.Tensor] = {n: torch.zeros_like(p) for n, p in trainable.items()}
        seen = 0
        for xb, yb in _batches(data, labels, batch_size):
            if max_examples is not None:
                if seen >= max_examples:
                    break
                xb = xb[: max_examples - seen]
                yb = None if yb is None else yb[: max_examples - seen]
            if xb.shape[0] == 0:
                continue
            xb = xb.to(device)
            if estimator == "true":
                part = true_fisher(xb)
            else:
                if estimator == "empirical":
                    if yb is None:
                        raise ValueError('estimator "empirical" needs labels')
                    yb = yb.to(device)
                else:
                    yb = sample_labels(xb)
                part = label_fisher(xb, yb)
            for name in total:
                total[name] += part[name]
            seen += xb.shape[0]
    finally:
        for module, training in modes.items():
            module.training = training  # per module: train() would recurse into children
    if seen == 0:
        raise ValueError("data holds no examples")
    if reduction == "mean":
        total = {n: t / seen for n, t in total.items()}
    return total


def _batches(
    data: torch.Tensor | np.ndarray | Iterable[Batch],
    labels: torch.Tensor | np.ndarray | None,
    batch_size: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """``(x, y)`` chunks of at most ``batch_size`` rows, from a tensor or an iterable of batches."""
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(data)
    if isinstance(labels, np.ndarray):
        labels = torch.from_numpy(labels)
    if isinstance(data, torch.Tensor):
        if labels is not None and labels.shape[0] != data.shape[0]:
            raise ValueError(f"{labels.shape[0]} labels for {data.shape[0]} examples")
        batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]] = [(data, labels)]
    elif labels is not None:
        raise ValueError("labels= is for tensor data; batches carry their own labels")
    else:
        batches = (_split(batch) for batch in data)
    for x, y in batches:
        for start in range(0, x.shape[0], batch_size):
            stop = start + batch_size
            yield x[start:stop], None if y is None else y[start:stop]


def _split(batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` or ``(x, y, …)`` → ``(x, y or None)`` as tensors."""
    if isinstance(batch, (tuple, list)):
        y = batch[1] if len(batch) > 1 else None
        return torch.as_tensor(batch[0]), None if y is None else torch.as_tensor(y)
    return torch.as_tensor(batch), None
