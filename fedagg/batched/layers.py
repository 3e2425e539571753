"""Hand-batched forward passes over stacked client parameters (placeholder).

:func:`stacked_forward` returns, for a model it knows, a callable ``f(params, x)`` where ``params``
maps every *trainable* parameter name to a tensor with a leading client dimension ``k`` and ``x`` is
``(k, B, *input_shape)``; it returns logits ``(k, B, C)`` equal, per client ``i``, to
``torch.func.functional_call(model, {**frozen, **params_i}, x_i)``. ``None`` means "no fast path":
:mod:`fedagg.batched` then uses ``torch.func.vmap`` over ``functional_call``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

__all__ = ["stacked_forward"]


def stacked_forward(
    model: nn.Module, trainable: Sequence[str]
) -> Callable[[Mapping[str, torch.Tensor], torch.Tensor], torch.Tensor] | None:
    """A batched forward for ``model`` with ``trainable`` stacked, or ``None`` (none known here)."""
    del model, trainable
    return None
