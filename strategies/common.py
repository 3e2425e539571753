"""The run-level parameters of strategies, declared once.

:class:`StrategyRun` is the typed, frozen part of a run that strategies read: which strategy
(``strategy``, ``strategy_args``, ``aggregator``) and the run-level parameters every strategy may
take (:class:`CommonParams`, :class:`ServerOptimizerParams`). The runner's configuration
(``simulations.core.config.RunConfig``) inherits these fields, so each top-level key is declared here
and nowhere else; the registry's :data:`~strategies.registry.COMMON_PARAMS` and
:data:`~strategies.registry.SERVER_OPTIMIZER_PARAMS` are derived from them (:func:`params_of`).
"""

from __future__ import annotations

import types
from typing import Any, Union, get_args, get_origin

import annotated_types as at
from pydantic import BaseModel, ConfigDict, Field

from fedagg.registry import Param


class Frozen(BaseModel):
    """Strict, frozen model: unknown keys and non-finite numbers are errors, fields read-only."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class StrategyChoice(Frozen):
    """Which strategy a run uses, and its own parameters."""

    strategy: str = Field("fedavg", description="strategy registry name")
    strategy_args: dict[str, Any] = Field(default_factory=dict,
                                          description="the strategy's own parameters")
    aggregator: str | None = Field(None, description="aggregation pipeline, for strategies that "
                                   "declare `aggregator` (e.g. nnm+trimmed-mean)")


class CommonParams(Frozen):
    """Run-level parameters every strategy takes (those registered with ``server_lr=False`` all
    but ``server_lr``)."""

    num_clients: int = Field(10, ge=1, description="total client population N")
    clients_per_round: int | None = Field(None, ge=1, description="clients trained per round "
                                          "among the available (null: all)")
    seed: int = Field(0, ge=0, description="seed of the client-selection stream")
    server_lr: float = Field(1.0, ge=0.0, description="global learning rate η: global += η · aggregate")
    min_replies: int = Field(1, ge=0, description="fewer usable replies than this keep the global model")
    max_update_norm: float | None = Field(None, gt=0.0, description="reject updates with "
                                          "‖local − global‖ above this")


class ServerOptimizerParams(Frozen):
    """The server optimiser of every delta strategy (``strategies.base.DeltaStrategy``); only
    strategies that honour it declare it (null = off)."""

    server_momentum: float | None = Field(None, ge=0.0, lt=1.0, description="heavy-ball momentum m "
                                          "on the aggregate: v = m·v + aggregate, global += η_t·v "
                                          "(null: 0)")
    server_weight_decay: float | None = Field(None, ge=0.0, description="server weight decay λ: the "
                                              "aggregate gets −λ·global (torch SGD's weight_decay; "
                                              "null: 0)")
    server_lr_decay: float | None = Field(None, gt=0.0, le=1.0, description="step decay: η_t = "
                                          "server_lr · decay^⌊(t−1)/every⌋ (with "
                                          "server_lr_decay_every; null: constant)")
    server_lr_decay_every: int | None = Field(None, ge=1, description="rounds between server_lr "
                                              "decays (with server_lr_decay)")


class StrategyRun(ServerOptimizerParams, CommonParams, StrategyChoice):
    """Everything a run tells its strategy (field order: choice, common, server optimiser).
    Build the strategy with :func:`strategies.build_run`."""


def params_of(model: type[BaseModel]) -> tuple[Param, ...]:
    """The fields of ``model`` as registry :class:`~fedagg.registry.Param` declarations (type,
    default, description, bounds, nullability)."""
    out = []
    for name, field in model.model_fields.items():
        typ, nullable = _base_type(field.annotation)
        bounds: dict[str, Any] = {}
        for m in field.metadata:
            if isinstance(m, at.Ge):
                bounds["low"] = m.ge
            elif isinstance(m, at.Gt):
                bounds.update(low=m.gt, low_open=True)
            elif isinstance(m, at.Le):
                bounds["high"] = m.le
            elif isinstance(m, at.Lt):
                bounds.update(high=m.lt, high_open=True)
        out.append(Param(name, typ, field.get_default(call_default_factory=True),
                         field.description or "", nullable=nullable, **bounds))
    return tuple(out)


def _base_type(annotation: Any) -> tuple[type, bool]:
    """``int | None`` → ``(int, True)``; ``float`` → ``(float, False)``."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return _base_type(args[0])[0], True
    origin = get_origin(annotation)
    return (origin or annotation), False
