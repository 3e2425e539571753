"""Geometric median by smoothed Weiszfeld (RFA: Pillutla, Kakade & Harchaoui, arXiv:1912.13445).

Every iterate is a convex combination of the updates, ``z = Σ_i c_i x_i``, so the iteration runs on
the coefficients ``c`` with distances from the Gram matrix ``G = X Xᵀ``:
``‖z − x_i‖² = cᵀGc − 2(Gc)_i + G_ii``. One ``X Xᵀ`` (O(n²d)) and one final ``cᵀX`` (O(nd)) touch
the data; each iteration costs O(n²), so running to convergence is cheap.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from fedagg.aggregators._common import Aggregator, combine, finite_rows, gram
from fedagg.registry import Param


def weiszfeld_coefficients(
    G: np.ndarray,
    alpha: np.ndarray,
    nu: float,
    max_iter: int,
    tol: float,
    c0: np.ndarray,
) -> tuple[np.ndarray, int]:
    r"""Smoothed Weiszfeld on coefficients; returns ``(c, iterations)``.

    .. math:: \beta_i = \frac{\alpha_i}{\max(\nu, \|z_t - x_i\|)}, \qquad
              z_{t+1} = \frac{\sum_i \beta_i x_i}{\sum_i \beta_i}

    ``G`` ``(n, n)`` is the Gram matrix of the points, ``alpha`` ``(n,)`` their weights (sum 1),
    ``c0`` the coefficients of ``z_0``. Stops after ``max_iter`` updates or when
    ``‖c_{t+1} − c_t‖₁ ≤ tol`` (which bounds ``‖z_{t+1} − z_t‖ ≤ tol · max_i ‖x_i‖``);
    ``tol = 0`` runs exactly ``max_iter`` updates (ByzFL/epfml style).
    """
    diag = np.diag(G)
    c = c0.astype(np.float64)
    it = 0
    while it < max_iter:
        it += 1
        Gc = G @ c
        dist = np.sqrt(np.maximum(c @ Gc - 2.0 * Gc + diag, 0.0))
        beta = alpha / np.maximum(nu, dist)
        c_new = beta / beta.sum()
        step = np.abs(c_new - c).sum()
        c = c_new
        if tol > 0 and step <= tol:
            break
    return c, it


class GeometricMedian(Aggregator):
    r"""Geometric median (RFA), Pillutla, Kakade & Harchaoui 2019, arXiv:1912.13445.

    .. math:: \mathrm{GM}(x) = \arg\min_z \sum_i \alpha_i \|z - x_i\|_2,
              \qquad \alpha_i = w_i / \textstyle\sum_k w_k

    computed by smoothed Weiszfeld (:func:`weiszfeld_coefficients`) from ``z_0`` = the weighted
    mean (``init="mean"``, as ``geom_median``/fedlib) or 0 (``init="zero"``, as ByzFL/epfml).
    Defaults run to convergence (ν = 1e-6, up to 1000 updates, tol 1e-10); ByzFL's
    ``GeometricMedian(nu=0.1, T=3)`` is ``nu=0.1, max_iter=3, tol=0, init="zero"``.
    Rows with ±inf/NaN are dropped first (as ByzFL does), so they never reach the output.
    ``(n, d) -> (d,)``; weights supported.

    Example
    -------
    >>> X = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]])
    >>> np.round(GeometricMedian()(X), 6)   # Σ_i (z − x_i)/‖z − x_i‖ = 0 at (½, ½)
    array([0.5, 0.5])
    """

    name: ClassVar[str] = "geomedian"
    PARAMS: ClassVar[tuple[Param, ...]] = (
        Param("nu", float, 1e-6, "smoothing ν: distances are floored at ν", low=0.0, low_open=True),
        Param("max_iter", int, 1000, "maximum number of Weiszfeld updates", low=0),
        Param("tol", float, 1e-10, "stop when ‖c_{t+1} − c_t‖₁ ≤ tol (0: run max_iter)", low=0.0),
        Param("init", str, "mean", "z_0: weighted mean or zero", choices=("mean", "zero")),
    )
    supports_weights: ClassVar[bool] = True
    tolerates_nonfinite: ClassVar[bool] = True

    def __init__(
        self, nu: float = 1e-6, max_iter: int = 1000, tol: float = 1e-10, init: str = "mean"
    ) -> None:
        if not nu > 0:
            raise ValueError(f"geomedian: nu must be > 0, got {nu}")
        self.nu = float(nu)
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.init = init
        self.last_iterations = 0

    def _aggregate(self, X: np.ndarray, w: np.ndarray | None) -> np.ndarray:
        n = X.shape[0]
        G = gram(X)
        ok = finite_rows(G)
        if not ok.any():
            return X.mean(axis=0)
        idx = np.flatnonzero(ok)
        alpha = np.ones(idx.size) if w is None else w[idx]
        if alpha.sum() <= 0:
            raise ValueError("geomedian: all finite updates have zero weight")
        alpha = alpha / alpha.sum()
        c0 = alpha.copy() if self.init == "mean" else np.zeros(idx.size)
        c, self.last_iterations = weiszfeld_coefficients(
            G[np.ix_(idx, idx)], alpha, self.nu, self.max_iter, self.tol, c0
        )
        full = np.zeros(n)
        full[idx] = c
        return combine(X, full)
