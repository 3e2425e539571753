"""Flower Message-API strategies backed by fedagg's math.

``strategies.build(name, **params)`` returns a ``flwr.serverapp.strategy.Strategy``;
``strategies.names()`` lists the registered names; ``strategies.build_run(run, **offered)`` builds
the strategy of a typed run (:class:`strategies.common.StrategyRun`, e.g. the simulator's
``RunConfig``). Every strategy here works with any Flower
``Grid`` (our Ray engine, ``run_simulation``, or a real deployment).
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import Strategy

# Importing a family module registers its strategies (one module per family).
from strategies import baseline as _baseline  # noqa: F401
from strategies import fedau as _fedau  # noqa: F401
from strategies import fedins as _fedins  # noqa: F401
from strategies import merging as _merging  # noqa: F401
from strategies import robust as _robust  # noqa: F401
from strategies.common import StrategyRun
from strategies.registry import (
    COMMON_NAMES,
    COMMON_PARAMS,
    REGISTRY,
    SERVER_OPTIMIZER_NAMES,
    SERVER_OPTIMIZER_PARAMS,
    run_params,
)

__all__ = ["COMMON_NAMES", "COMMON_PARAMS", "REGISTRY", "SERVER_OPTIMIZER_NAMES",
           "SERVER_OPTIMIZER_PARAMS", "StrategyRun", "build", "build_run", "names", "run_params"]


def build(name: str, **params: Any) -> Strategy:
    """Strategy ``name`` with validated ``params`` (see ``REGISTRY.entry(name).params``)."""
    return REGISTRY.build(name, **params)


def build_run(run: StrategyRun, **offered: Any) -> Strategy:
    """The strategy of ``run``: ``build(run.strategy, **run_params(run, **offered))``. ``offered``
    is what the environment gives strategies that declare it (``num_byzantine``,
    ``probabilities``, ``validation``)."""
    return REGISTRY.build(run.strategy, **run_params(run, **offered))


def names() -> list[str]:
    """Registered strategy names."""
    return REGISTRY.names()
