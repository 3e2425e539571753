"""Mean and the coordinate-wise robust rules: median, trimmed mean, MeaMed, Phocas.

All order statistics come from one sort of each coordinate (``np.sort(X, axis=0)``, O(n log n · d));
NaN sorts after +inf, so a NaN coordinate behaves like a very large value and is trimmed like one.
None of these rules accepts non-uniform weights except ``mean``.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from fedagg.aggregators._common import (
    F_PARAM,
    Aggregator,
    closest_to_center_mean,
    combine,
    infeasible,
    sorted_median,
)
from fedagg.registry import Param


class Mean(Aggregator):
    r"""Plain (optionally weighted) average, the FedAvg aggregate.

    .. math:: \bar x = \sum_i w_i x_i \Big/ \sum_i w_i \qquad (w_i = 1 \text{ by default})

    ``updates: (n, d) -> (d,)``. Not robust: one ±inf/NaN row makes the output non-finite.

    Example
    -------
    >>> Mean()(np.array([[1.0, 2.0], [3.0, 4.0]]))
    array([2., 3.])
    """

    name: ClassVar[str] = "mean"
    PARAMS: ClassVar[tuple[Param, ...]] = ()
    supports_weights: ClassVar[bool] = True

    def _aggregate(self, X: np.ndarray, w: np.ndarray | None) -> np.ndarray:
        if w is None:
            return X.mean(axis=0)
        return combine(X, w)


class Median(Aggregator):
    r"""Coordinate-wise median (Yin et al. 2018, arXiv:1803.01498).

    .. math:: y_j = \operatorname{median}(x_{1j}, \dots, x_{nj})

    For even ``n`` the two middle values are averaged (numpy, ByzFL, Flower ``aggregate_median``;
    ``torch.median``/Garfield would take the lower one). ``(n, d) -> (d,)``. Tolerates up to
    ``⌈n/2⌉ − 1`` rows of ±inf/NaN. Weights: uniform only.

    Example
    -------
    >>> Median()(np.array([[1.0, 2.0], [3.0, 4.0], [100.0, -7.0]]))
    array([3., 2.])
    """

    name: ClassVar[str] = "median"
    PARAMS: ClassVar[tuple[Param, ...]] = ()
    tolerates_nonfinite: ClassVar[bool] = True

    def _aggregate(self, X: np.ndarray, w: np.ndarray | None) -> np.ndarray:
        return sorted_median(np.sort(X, axis=0))


class _TrimRule(Aggregator):
    """Base of the rules with a trim count ``f`` that need ``n > 2f`` (trimmed mean, MeaMed,
    Phocas); they tolerate ``f`` rows of ±inf/NaN."""

    PARAMS: ClassVar[tuple[Param, ...]] = (F_PARAM,)
    tolerates_nonfinite: ClassVar[bool] = True
    #: The rule as the infeasibility message names it.
    label: ClassVar[str]

    def __init__(self, f: int) -> None:
        self.f = int(f)

    def _sorted(self, X: np.ndarray) -> np.ndarray:
        """``X`` sorted per coordinate ``(n, d)``; infeasible (a ConfigError on ``f``) unless
        ``n > 2f``."""
        n, f = X.shape[0], self.f
        if n <= 2 * f:
            raise infeasible(self.name, f"{self.label} needs n > 2f; got n={n}, f={f}")
        return np.sort(X, axis=0)


class TrimmedMean(_TrimRule):
    r"""Coordinate-wise trimmed mean with a trim *count* f (Yin et al. 2018, arXiv:1803.01498).

    .. math:: y_j = \frac{1}{n - 2f} \sum_{k=f+1}^{n-f} x_{(k)j}

    where :math:`x_{(1)j} \le \dots \le x_{(n)j}` are the sorted values of coordinate ``j``. Requires
    ``n > 2f``. Same as ByzFL ``TrMean(f)`` and epfml ``TM(b=f)``; Flower's
    ``aggregate_trimmed_avg`` takes a fraction and needs ``(f + 0.5)/n`` to cut exactly ``f``.
    ``(n, d) -> (d,)``; tolerates ``f`` rows of ±inf/NaN. Weights: uniform only.

    Example
    -------
    >>> TrimmedMean(f=1)(np.array([[1.0], [2.0], [3.0], [100.0]]))
    array([2.5])
    """

    name: ClassVar[str] = "trimmed-mean"
    label: ClassVar[str] = "trimmed mean"

    def _aggregate(self, X: np.ndarray, w: np.ndarray | None) -> np.ndarray:
        n, f = X.shape[0], self.f
        return self._sorted(X)[f : n - f].mean(axis=0)


class MeaMed(_TrimRule):
    r"""Mean around the median (Xie, Koyejo & Gupta 2018, arXiv:1802.10116).

    .. math:: y_j = \frac{1}{n-f} \sum_{i \in N_j} x_{ij}, \quad
              N_j = \text{the } n-f \text{ indices with smallest } |x_{ij} - \operatorname{med}_j|

    Matches ByzFL ``Meamed(f)`` and the FlagAggregator/Garfield ``meamed``. Requires ``n > 2f``
    (the median must be robust). Ties in distance keep the smaller values. ``(n, d) -> (d,)``;
    tolerates ``f`` rows of ±inf/NaN. Weights: uniform only.

    Example
    -------
    >>> MeaMed(f=1)(np.array([[1.0], [2.0], [4.0], [100.0]]))
    array([2.33333333])
    """

    name: ClassVar[str] = "meamed"
    label: ClassVar[str] = "meamed"

    def _aggregate(self, X: np.ndarray, w: np.ndarray | None) -> np.ndarray:
        S = self._sorted(X)
        return closest_to_center_mean(S, sorted_median(S), X.shape[0] - self.f)


class Phocas(_TrimRule):
    r"""Phocas: mean around the trimmed mean (Xie, Koyejo & Gupta 2018, arXiv:1805.09682).

    .. math:: y_j = \frac{1}{n-f} \sum_{i \in N_j} x_{ij}, \quad
              N_j = \text{the } n-f \text{ indices with smallest } |x_{ij} - \mathrm{TM}_f(x)_j|

    with :math:`\mathrm{TM}_f` the trimmed mean of :class:`TrimmedMean`. Matches the
    FlagAggregator repo's ``phocas`` (``aggregators/trmean.py``). Requires ``n > 2f``.
    ``(n, d) -> (d,)``; tolerates ``f`` rows of ±inf/NaN. Weights: uniform only.

    Example
    -------
    >>> Phocas(f=1)(np.array([[1.0], [2.0], [4.0], [100.0]]))
    array([2.33333333])
    """

    name: ClassVar[str] = "phocas"
    label: ClassVar[str] = "phocas"

    def _aggregate(self, X: np.ndarray, w: np.ndarray | None) -> np.ndarray:
        n, f = X.shape[0], self.f
        S = self._sorted(X)
        return closest_to_center_mean(S, S[f : n - f].mean(axis=0), n - f)
