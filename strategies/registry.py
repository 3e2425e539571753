"""The strategy registry: CLI name == registry key == docs page name.

Every entry's factory accepts the run-level parameters in :data:`COMMON_PARAMS` (filled by the
runner from the top-level config) plus its own declared knobs (``strategy_args`` in a config).
"""

from __future__ import annotations

import dataclasses

from flwr.serverapp.strategy import Strategy

from fedagg.registry import Param, Registry

REGISTRY: Registry[Strategy] = Registry("strategy")

#: Run-level parameters every strategy accepts; the runner fills them from the top-level config.
COMMON_PARAMS: tuple[Param, ...] = (
    Param("num_clients", int, 10, "total client population N", low=1),
    Param("clients_per_round", int, None, "clients trained per round among the available (null: all)",
          low=1, nullable=True),
    Param("seed", int, 0, "seed of the client-selection stream"),
    Param("server_lr", float, 1.0, "global learning rate η: global += η · aggregate", low=0.0),
    Param("min_replies", int, 1, "fewer usable replies than this keep the global model", low=0),
    Param("max_update_norm", float, None, "reject updates with ‖local − global‖ above this",
          low=0.0, low_open=True, nullable=True),
)
#: The server optimiser of every delta strategy (``strategies.base.DeltaStrategy``): run-level too,
#: but only declared by strategies that honour them (Flower's own rules do not; setting one there
#: is a ConfigError).
SERVER_OPTIMIZER_PARAMS: tuple[Param, ...] = (
    Param("server_momentum", float, None, "heavy-ball momentum m on the aggregate: "
          "v = m·v + aggregate, global += η_t·v (null: 0)", low=0.0, high=1.0, high_open=True,
          nullable=True),
    Param("server_weight_decay", float, None, "server weight decay λ: the aggregate gets −λ·global "
          "(torch SGD's weight_decay; null: 0)", low=0.0, nullable=True),
    Param("server_lr_decay", float, None, "step decay: η_t = server_lr · decay^⌊(t−1)/every⌋ "
          "(with server_lr_decay_every; null: constant)", low=0.0, low_open=True, high=1.0,
          nullable=True),
    Param("server_lr_decay_every", int, None, "rounds between server_lr decays (with "
          "server_lr_decay)", low=1, nullable=True),
)
SERVER_OPTIMIZER_NAMES = frozenset(p.name for p in SERVER_OPTIMIZER_PARAMS)
COMMON_NAMES = frozenset(p.name for p in (*COMMON_PARAMS, *SERVER_OPTIMIZER_PARAMS))


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
