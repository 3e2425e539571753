"""Byzantine attacks as pure function-objects of the round's knowledge.

Calling convention (see :mod:`fedagg.attacks._base`)::

    attack = build("alie", z="paper")
    byz = attack(honest, f, rng, own=None)     # honest (h, d) -> byz (f, d), same kind/dtype

``attack.omniscient`` says whether it needs every honest update of the round (the engine then
applies it where those replies are visible); non-omniscient attacks read ``own``, the updates the
Byzantine clients computed honestly. ``attack.data_attack`` marks client-side attacks on the
training data (``labelflip``: the client trains on :func:`flip_labels` labels). Randomness comes
only from the ``rng`` argument.

>>> from fedagg.attacks import build
>>> build("ipm", epsilon=0.1)(np.array([[1.0, 2.0], [3.0, 4.0]]), 2, None)
array([[-0.2, -0.3],
       [-0.2, -0.3]])

============ ============================================================ ===========
name         update sent                                                  knowledge
============ ============================================================ ===========
signflip     −s·own (default, epfml) or −s·μ (``flavour="mean"``, ByzFL)   own / omni
reverse      −k·own, k = 10 (FlagAggregator)                              own
labelflip    honest training on y' = (C−1) − y (data attack)              own
gaussian     N(μ, σ²) per attacker (ByzFL defaults 0, 1)                  none
random       U[0, 1) per attacker (Garfield / FlagAggregator)             none
ipm          −ε·μ, ε = 0.1 (epfml / FA)                                   omni / own
alie         μ − z·σ, z = z_max(n, f), ddof 1 (epfml)                     omni / own
minmax       μ − γ·μ/‖μ‖, largest γ within the max pairwise distance      omni / own
minsum       μ − γ·μ/‖μ‖, largest γ within the min sum of distances       omni / own
mimic        copy of honest update ``target``                             omni
inf / nan    +∞ / NaN everywhere (robustness checks)                      none
============ ============================================================ ===========
"""

from __future__ import annotations

from typing import Any

from fedagg.attacks._base import Attack
from fedagg.attacks.alie import ALIE, IPM, alie_z
from fedagg.attacks.basic import (
    Gaussian,
    Inf,
    LabelFlip,
    Mimic,
    NaN,
    Reverse,
    SignFlip,
    Uniform,
    flip_labels,
)
from fedagg.attacks.minmax import MinMax, MinSum, gamma_search
from fedagg.registry import Registry

__all__ = [
    "REGISTRY", "build", "names", "Attack", "SignFlip", "Reverse", "LabelFlip", "Gaussian",
    "Uniform", "IPM", "ALIE", "MinMax", "MinSum", "Mimic", "Inf", "NaN", "flip_labels", "alie_z",
    "gamma_search",
]

REGISTRY: Registry[Attack] = Registry("attack")

for _cls in (SignFlip, Reverse, LabelFlip, Gaussian, Uniform, IPM, ALIE, MinMax, MinSum, Mimic,
             Inf, NaN):
    REGISTRY.add(_cls.name, _cls, params=_cls.PARAMS)


def names() -> list[str]:
    """Registered attack names, sorted."""
    return REGISTRY.names()


def build(name: str, /, **params: Any) -> Attack:
    """Build the attack ``name`` with validated ``params`` (ConfigError on unknown keys/values)."""
    return REGISTRY.build(name, **params)
