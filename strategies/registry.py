"""The strategy registry: CLI name == registry key == docs page name.

Every entry's factory accepts the run-level parameters in :data:`COMMON_PARAMS` plus its own
declared knobs (``strategy_args`` in a config). The run-level parameters are declared once, as the
typed fields of :class:`strategies.common.StrategyRun`; :func:`run_params` reads them from that
object for one strategy.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flwr.serverapp.strategy import Strategy

from fedagg.errors import ConfigError
from fedagg.registry import Param, Registry
from strategies.common import CommonParams, ServerOptimizerParams, StrategyRun, params_of

REGISTRY: Registry[Strategy] = Registry("strategy")

#: Run-level parameters every strategy accepts (from :class:`~strategies.common.CommonParams`).
COMMON_PARAMS: tuple[Param, ...] = params_of(CommonParams)
#: The server optimiser of every delta strategy (``strategies.base.DeltaStrategy``): run-level too,
#: but only declared by strategies that honour them (Flower's own rules do not; setting one there
#: is a ConfigError). From :class:`~strategies.common.ServerOptimizerParams`.
SERVER_OPTIMIZER_PARAMS: tuple[Param, ...] = params_of(ServerOptimizerParams)
SERVER_OPTIMIZER_NAMES = frozenset(p.name for p in SERVER_OPTIMIZER_PARAMS)
COMMON_NAMES = frozenset(p.name for p in (*COMMON_PARAMS, *SERVER_OPTIMIZER_PARAMS))


def run_params(run: StrategyRun, **offered: Any) -> dict[str, Any]:
    """Keyword arguments for ``build(run.strategy, ...)``, read from the typed ``run``.

    Run-level parameters (:data:`COMMON_NAMES`) and ``aggregator`` go to a strategy that declares
    them (null ones are left to its default); one it does not declare is a ConfigError naming the
    key unless it has its default value (never silently dropped). ``offered`` are what the
    environment can give (``num_byzantine``, ``probabilities``, ``validation``): passed to a
    strategy that declares them. ``strategy_args`` come last and win; a run-level name in them is a
    ConfigError (set the top-level key).
    """
    entry = REGISTRY.entry(run.strategy, field="strategy")
    clash = sorted(set(run.strategy_args) & COMMON_NAMES)
    if clash:
        raise ConfigError(f"strategy_args.{clash[0]}", f"set the top-level key `{clash[0]}` instead")
    out: dict[str, Any] = {}
    for key, field in [*CommonParams.model_fields.items(), *ServerOptimizerParams.model_fields.items(),
                       ("aggregator", StrategyRun.model_fields["aggregator"])]:
        value = getattr(run, key)
        if entry.param(key) is not None:
            if value is not None:
                out[key] = value
        elif value != field.default:
            raise ConfigError(key, _cannot_honour(entry.name, key, entry.param("eta") is not None))
    out.update({k: v for k, v in offered.items() if entry.param(k) is not None})
    out.update(run.strategy_args)
    return out


def _cannot_honour(name: str, key: str, has_eta: bool) -> str:
    """Why strategy ``name`` refuses run-level ``key`` (see :func:`run_params`)."""
    if key == "server_lr":
        own = " (its server step is strategy_args.eta)" if has_eta else ""
        return (f"strategy {name!r} is Flower's own rule and has no server learning rate to "
                f"set{own}; unset server_lr or use a fedagg delta strategy")
    if key == "aggregator":
        return f"strategy {name!r} has no aggregator to choose"
    return (f"strategy {name!r} is Flower's own rule with its own server step and cannot honour "
            "it; use a fedagg delta strategy (fedavg, fedau, the robust rules, soups) or unset it")


@dataclasses.dataclass(frozen=True)
class Needs:
    """What a strategy needs from the run beyond its parameters (checked when a config loads).

    ``models``: the model kinds it works with (empty: any); the first is selected when the run
    config does not set ``model``. ``participation``: it compensates unequal client participation,
    so it is pointless when every client takes part in every round.
    """

    models: tuple[str, ...] = ()
    participation: bool = False


#: Strategy name → its :class:`Needs` (strategies that need nothing are absent).
NEEDS: dict[str, Needs] = {}


def needs(name: str) -> Needs:
    """The :class:`Needs` of strategy ``name`` (``Needs()`` when it declared none)."""
    return NEEDS.get(name, Needs())


def register(name: str, *, params: list[Param] | tuple[Param, ...] = (), doc: str = "",
             server_optimizer: bool = True, server_lr: bool = True, needs: Needs | None = None):
    """Register a strategy factory under ``name`` with the common params plus ``params``.

    ``server_optimizer=False`` for strategies whose server step is not ours (Flower's rules): they
    do not declare :data:`SERVER_OPTIMIZER_PARAMS` (a strategy's own ``params`` may declare one it
    honours in its own way, e.g. fedavgm's ``server_momentum``). ``server_lr=False`` for those
    whose server step size is a parameter of their own (FedAdam's ``eta``): they do not declare
    ``server_lr``, so building one with it is an error instead of a silently dropped value.
    ``needs``: see :class:`Needs`.
    """
    if needs is not None:
        NEEDS[name] = needs
    common = [*(p for p in COMMON_PARAMS if server_lr or p.name != "server_lr"),
              *(SERVER_OPTIMIZER_PARAMS if server_optimizer else ())]
    own = {p.name for p in params}
    return REGISTRY.register(name, params=[*(p for p in common if p.name not in own), *params],
                             doc=doc)
