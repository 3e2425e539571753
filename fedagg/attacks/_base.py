"""The attack calling convention and its input handling.

An attack is a pure function-object::

    attack(honest: (h, d), f: int, rng: np.random.Generator, *, own: (f, d) | None = None) -> (f, d)

``honest`` are the honest updates of the round the attacker knows (all of them for an omniscient
attack); ``own`` are the updates the ``f`` Byzantine clients would have sent if honest (their own
honest computation, used by non-omniscient attacks). The result has the kind (numpy/torch), dtype
and device of ``honest``; no input is modified; the only randomness is ``rng``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from fedagg.aggregators._common import ArrayLike, to_matrix
from fedagg.errors import ConfigError
from fedagg.registry import Param

KNOWLEDGE = Param(
    "knowledge", str, "omniscient",
    "who supplies the statistics: all honest updates (omniscient) or the attackers' own",
    choices=("omniscient", "own"),
)


class Attack:
    """Base class. Subclasses set ``name``, ``PARAMS`` and implement :meth:`_attack` on numpy.

    ``omniscient`` says whether the attack needs every honest update of the round (the runner
    then runs it where those are visible); ``data_attack`` marks client-side attacks on the
    training data (label flipping) that the runner applies inside the Byzantine client.
    """

    name: ClassVar[str] = "attack"
    PARAMS: ClassVar[tuple[Param, ...]] = ()
    data_attack: ClassVar[bool] = False
    stochastic: ClassVar[bool] = False
    needs_own: ClassVar[bool] = False

    @property
    def omniscient(self) -> bool:
        """True if the attack reads the honest updates of other clients."""
        return getattr(self, "knowledge", "omniscient") == "omniscient" and not self.needs_own

    def __call__(
        self,
        honest: ArrayLike,
        f: int,
        rng: np.random.Generator | None = None,
        *,
        own: ArrayLike | None = None,
    ) -> Any:
        """``f`` Byzantine updates ``(f, d)``, same kind/dtype as ``honest`` ``(h, d)``."""
        if isinstance(f, bool) or not isinstance(f, (int, np.integer)) or f < 0:
            raise ValueError(f"{self.name}: f must be a non-negative integer, got {f!r}")
        f = int(f)
        H, back = to_matrix(honest)
        if f == 0:
            return back(np.zeros((0, H.shape[1]), dtype=H.dtype))
        own_arr = None
        if own is not None:
            own_arr, _ = to_matrix(own)
            own_arr = own_arr.astype(H.dtype, copy=False)
            if own_arr.shape != (f, H.shape[1]):
                raise ValueError(
                    f"{self.name}: own must be (f, d) = ({f}, {H.shape[1]}), "
                    f"got {tuple(own_arr.shape)}"
                )
        if self.stochastic and not isinstance(rng, np.random.Generator):
            raise TypeError(f"{self.name}: rng must be a numpy.random.Generator")
        out = self._attack(H, f, rng, own_arr)
        return back(np.ascontiguousarray(out, dtype=H.dtype))

    def _attack(
        self, H: np.ndarray, f: int, rng: np.random.Generator | None, own: np.ndarray | None
    ) -> np.ndarray:
        raise NotImplementedError

    def _source(self, H: np.ndarray, own: np.ndarray | None) -> np.ndarray:
        """The updates the statistics come from: ``H`` (omniscient) or ``own``."""
        if getattr(self, "knowledge", "omniscient") == "own" or self.needs_own:
            if own is None:
                raise ValueError(
                    f"{self.name} (knowledge='own') needs own=: the attackers' honest updates"
                )
            return own
        return H

    def hparams(self) -> dict[str, Any]:
        return {p.name: getattr(self, p.name) for p in self.PARAMS}

    def summary(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())
        return f"{self.name}({args})"

    def __repr__(self) -> str:
        return self.summary()


def repeat(v: np.ndarray, f: int) -> np.ndarray:
    """``(f, d)``: ``f`` copies of ``v`` (all Byzantine clients send the same vector)."""
    return np.broadcast_to(v, (f, v.shape[0])).copy()


def check_choice(rule: str, field: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{rule}.{field}", f"unknown value {value!r}; allowed: {list(allowed)}")

