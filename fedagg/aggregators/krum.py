"""Krum and Multi-Krum (Blanchard et al. 2017, arXiv:1703.02757).

Libraries disagree on the score (``../shared/reference/byzantine.md`` §3), so the neighbour count,
the squaring and the number of selected vectors are parameters, with presets:

============ ========= ================ =============== =========================================
variant      squared   neighbours k     Multi-Krum m    reproduces
============ ========= ================ =============== =========================================
``paper``    yes       n − f − 2        n − f           the paper; Flower ``aggregate_krum`` /
                                                        ``select_multikrum`` (given the same m)
``byzfl``    yes       n − f − 1        n − f           ByzFL ``Krum(f)`` / ``MultiKrum(f)``
``garfield`` no        n − f − 1        n − f − 2       Garfield / FlagAggregator ``krum``
============ ========= ================ =============== =========================================

``squared``, ``offset`` (k = n − f − offset) and ``m`` override the preset. ``paper`` and
``garfield`` require ``n > 2f + 2`` (the paper's condition); ``byzfl``, like ByzFL, only requires
``k ≥ 1`` neighbours.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from fedagg.aggregators._common import (
    F_PARAM,
    Aggregator,
    combine,
    gram,
    infeasible,
    sq_distances,
)
from fedagg.errors import ConfigError
from fedagg.registry import Param

KRUM_VARIANTS: dict[str, dict[str, Any]] = {
    "paper": {"squared": True, "offset": 2, "m_offset": 0},
    "byzfl": {"squared": True, "offset": 1, "m_offset": 0},
    "garfield": {"squared": False, "offset": 1, "m_offset": 2},
}

_VARIANT = Param(
    "variant", str, "paper", "score convention preset (see module doc)",
    choices=tuple(KRUM_VARIANTS),
)
_SQUARED = Param(
    "squared", bool, None, "squared L2 distances in the score (None: from variant)", nullable=True
)
_OFFSET = Param(
    "offset", int, None, "neighbour count k = n − f − offset (None: from variant)",
    low=0, nullable=True,
)


def krum_scores(D: np.ndarray, k: int) -> np.ndarray:
    r"""Krum scores ``(n,)``: for each row, the sum of its ``k`` smallest distances to *other* rows.

    .. math:: s(i) = \sum_{j \in N_k(i)} D_{ij}, \quad N_k(i) = k \text{ nearest } j \ne i

    ``D`` is an ``(n, n)`` (squared or plain) distance matrix; ``k`` is clipped to ``[1, n − 1]``
    (Flower's ``max(1, n − f − 2)``). A row at distance +inf from everything scores +inf.

    Example
    -------
    >>> D = np.abs(np.subtract.outer([0.2, 0.7, 1.0], [0.2, 0.7, 1.0])) ** 2
    >>> krum_scores(D, 1)
    array([0.25, 0.09, 0.09])
    """
    n = D.shape[0]
    if n == 1:
        return np.zeros(1)
    k = min(max(1, k), n - 1)
    E = D.copy()
    np.fill_diagonal(E, np.inf)
    part = np.partition(E, k - 1, axis=1)[:, :k] if k < n - 1 else np.sort(E, axis=1)[:, :k]
    with np.errstate(invalid="ignore"):
        return part.sum(axis=1)


class _KrumBase(Aggregator):
    tolerates_nonfinite: ClassVar[bool] = True

    def __init__(
        self,
        f: int,
        variant: str = "paper",
        squared: bool | None = None,
        offset: int | None = None,
    ) -> None:
        if variant not in KRUM_VARIANTS:
            raise ConfigError(f"{self.name}.variant", f"unknown value {variant!r}")
        self.f = int(f)
        self.variant = variant
        self.squared = squared
        self.offset = offset

    def _conv(self) -> tuple[bool, int]:
        preset = KRUM_VARIANTS[self.variant]
        squared = preset["squared"] if self.squared is None else bool(self.squared)
        offset = preset["offset"] if self.offset is None else int(self.offset)
        return squared, offset

    def order(self, X: np.ndarray) -> np.ndarray:
        """Row indices ``(n,)`` sorted by increasing Krum score (stable: ties keep row order)."""
        n, f = X.shape[0], self.f
        squared, offset = self._conv()
        if n <= 2 * f + 2 and self.variant != "byzfl":
            raise infeasible(
                self.name, f"{self.name} needs n > 2f + 2 (Blanchard et al. 2017); got n={n}, f={f}"
            )
        if n - f - offset < 1:
            raise infeasible(
                self.name, f"{self.name} needs k = n − f − {offset} ≥ 1 neighbours; got n={n}, f={f}"
            )
        D = sq_distances(gram(X))
        if not squared:
            D = np.sqrt(D)
        return np.argsort(krum_scores(D, n - f - offset), kind="stable")


class Krum(_KrumBase):
    r"""Krum: the update with the smallest sum of distances to its ``k`` nearest neighbours.

    .. math:: \mathrm{Krum}(x_1..x_n) = x_{i^*}, \quad
              i^* = \arg\min_i \sum_{j \in N_k(i)} \|x_i - x_j\|^2, \quad k = n - f - 2

    Blanchard et al. 2017, arXiv:1703.02757. Requires ``n > 2f + 2``. Distances use the Gram trick
    (one ``X Xᵀ``). ``(n, d) -> (d,)`` (a copy of one row). Weights are accepted and ignored (the
    output is a single update). Rows with ±inf/NaN score +inf and are never selected while a
    finite row exists. See the module doc for the ``variant`` presets.

    Example
    -------
    >>> X = np.array([[0.0], [0.6], [1.0], [0.45], [9.0]])
    >>> Krum(f=1)(X), Krum(f=1, variant="byzfl")(X)
    (array([0.6]), array([0.45]))
    """

    name: ClassVar[str] = "krum"
    PARAMS: ClassVar[tuple[Param, ...]] = (F_PARAM, _VARIANT, _SQUARED, _OFFSET)
    supports_weights: ClassVar[bool] = True

    def _aggregate(self, X: np.ndarray, w: np.ndarray | None) -> np.ndarray:
        return X[self.order(X)[0]].copy()


class MultiKrum(_KrumBase):
    r"""Multi-Krum: the (weighted) mean of the ``m`` updates with the lowest Krum scores.

    .. math:: \mathrm{MultiKrum}(x) = \frac{\sum_{i \in S_m} w_i x_i}{\sum_{i \in S_m} w_i},
              \quad S_m = \text{the } m \text{ lowest scores } s(i)
              = \sum_{j \in N_k(i)} \|x_i - x_j\|^2

    Blanchard et al. 2017, arXiv:1703.02757 (their experiments use ``m = n − f``). Weights, if
    given, only weight the final average (as Flower weights by ``num_examples``); the selection is
    unweighted. Requires ``n > 2f + 2`` and ``m ≤ n``. ``(n, d) -> (d,)``. Non-finite rows are
    never selected while ``m`` finite rows exist.

    Example
    -------
    >>> MultiKrum(f=1, m=2)(np.array([[0.0], [0.6], [1.0], [0.45], [9.0]]))
    array([0.525])
    """

    name: ClassVar[str] = "multikrum"
    PARAMS: ClassVar[tuple[Param, ...]] = (
        F_PARAM,
        Param("m", int, None, "number of updates averaged (None: n − f, or n − f − 2 for "
              "variant garfield)", low=1, nullable=True),
        _VARIANT,
        _SQUARED,
        _OFFSET,
    )
    supports_weights: ClassVar[bool] = True

    def __init__(
        self,
        f: int,
        m: int | None = None,
        variant: str = "paper",
        squared: bool | None = None,
        offset: int | None = None,
    ) -> None:
        super().__init__(f, variant, squared, offset)
        self.m = m

    def selected(self, X: np.ndarray) -> np.ndarray:
        """Indices ``(m,)`` of the selected rows, best score first."""
        n = X.shape[0]
        m = n - self.f - KRUM_VARIANTS[self.variant]["m_offset"] if self.m is None else self.m
        if not 1 <= m <= n:
            raise ConfigError(f"{self.name}.m", f"must be in [1, n={n}], got {m}")
        return self.order(X)[:m]

    def _aggregate(self, X: np.ndarray, w: np.ndarray | None) -> np.ndarray:
        sel = self.selected(X)
        c = np.zeros(X.shape[0])
        if w is None:
            c[sel] = 1.0 / sel.size
        else:
            total = w[sel].sum()
            if total <= 0:
                raise ValueError("multikrum: the selected updates all have zero weight")
            c[sel] = w[sel] / total
        return combine(X, c)
