"""Bulyan (El Mhamdi, Guerraoui & Rouault 2018, arXiv:1802.07927) and its library variants.

Bulyan selects θ updates with a Krum-type rule, then averages, per coordinate, the β selected
values closest to the coordinate-wise median. The selection step differs between libraries
(``../shared/reference/byzantine.md`` §3, §5.3; measured to disagree on ~92 % of random inputs):

============ ==================================================== ======== ====================
variant      selection                                            θ        β
============ ==================================================== ======== ====================
``paper``    Krum (squared, k = n' − f − 2 ≥ 1) run θ times on    n − 2f   θ − 2f
             the *shrinking* set (= Flower legacy
             ``aggregate_bulyan(..., aggregate_krum)``)
``flower``   one-shot Multi-Krum: the θ lowest scores on the      n − 2f   θ − 2f
             full set (= Flower Message-API ``Bulyan``)
``garfield`` scores (plain L2, k = n − f − 2) computed once;      n−2f−2  θ − 2f
             row i = mean of the ranks ``i .. n−f−3``
             (Garfield / FlagAggregator "Bulyan over Multi-Krum")
============ ==================================================== ======== ====================

All variants require ``n ≥ 4f + 3``.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from fedagg.aggregators._common import (
    F_PARAM,
    Aggregator,
    closest_to_center_mean,
    gram,
    infeasible,
    sorted_median,
    sq_distances,
)
from fedagg.aggregators.krum import krum_scores
from fedagg.errors import ConfigError
from fedagg.registry import Param

BULYAN_VARIANTS = ("paper", "flower", "garfield")


class Bulyan(Aggregator):
    r"""Bulyan: Krum-type selection of θ updates, then a coordinate-wise trimmed average.

    .. math:: S = \mathrm{select}_\theta(x), \quad
              y_j = \frac{1}{\beta} \sum_{i \in M_j} x_{ij}, \quad
              M_j = \beta \text{ indices } i \in S \text{ closest to } \operatorname{median}_{i\in S} x_{ij}

    with θ = n − 2f and β = θ − 2f for the ``paper`` (El Mhamdi et al. 2018, arXiv:1802.07927) and
    ``flower`` selections; see the module doc for the exact selection of each ``variant``.
    Requires ``n ≥ 4f + 3``. ``(n, d) -> (d,)``. Rows with ±inf/NaN are never selected while
    enough finite rows exist. Weights: uniform only.

    Example
    -------
    >>> X = np.array([[1.0], [1.1], [0.9], [1.05], [0.95], [1.2], [50.0]])
    >>> Bulyan(f=1)(X), Bulyan(f=1, variant="garfield")(X)
    (array([1.]), array([1.025]))
    """

    name: ClassVar[str] = "bulyan"
    PARAMS: ClassVar[tuple[Param, ...]] = (
        F_PARAM,
        Param("variant", str, "paper", "selection step (see module doc)", choices=BULYAN_VARIANTS),
        Param("squared", bool, None, "squared L2 in the Krum scores (None: True for paper/flower, "
              "False for garfield)", nullable=True),
    )
    tolerates_nonfinite: ClassVar[bool] = True

    def __init__(self, f: int, variant: str = "paper", squared: bool | None = None) -> None:
        if variant not in BULYAN_VARIANTS:
            raise ConfigError(f"{self.name}.variant", f"unknown value {variant!r}")
        self.f = int(f)
        self.variant = variant
        self.squared = squared

    def _distances(self, X: np.ndarray) -> np.ndarray:
        squared = (self.variant != "garfield") if self.squared is None else bool(self.squared)
        D = sq_distances(gram(X))
        return D if squared else np.sqrt(D)

    def selected_rows(self, X: np.ndarray) -> np.ndarray:
        """The θ selected vectors ``(θ, d)`` (for ``garfield``: the n − 2f − 2 Multi-Krum means)."""
        n, f = X.shape[0], self.f
        if n < 4 * f + 3:
            raise infeasible(
                self.name, f"bulyan needs n ≥ 4f + 3 (El Mhamdi et al. 2018); got n={n}, f={f}"
            )
        D = self._distances(X)
        if self.variant == "paper":
            remaining = list(range(n))
            chosen: list[int] = []
            for _ in range(n - 2 * f):
                sub = D[np.ix_(remaining, remaining)]
                best = int(np.argmin(krum_scores(sub, len(remaining) - f - 2)))
                chosen.append(remaining.pop(best))
            return X[chosen]
        order = np.argsort(krum_scores(D, n - f - 2), kind="stable")
        if self.variant == "flower":
            return X[order[: n - 2 * f]]
        # garfield: rows i = mean of ranks i .. m-1, m = n - f - 2, for i < n - 2f - 2
        m = n - f - 2
        suffix = np.cumsum(X[order[:m][::-1]], axis=0)[::-1]  # suffix[i] = sum of ranks i..m-1
        counts = (m - np.arange(n - 2 * f - 2)).astype(X.dtype)
        return suffix[: n - 2 * f - 2] / counts[:, None]

    def _aggregate(self, X: np.ndarray, w: np.ndarray | None) -> np.ndarray:
        rows = self.selected_rows(X)
        beta = rows.shape[0] - 2 * self.f
        S = np.sort(rows, axis=0)
        return closest_to_center_mean(S, sorted_median(S), beta)
