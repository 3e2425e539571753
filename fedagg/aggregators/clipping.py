"""Centered clipping (Karimireddy, He & Jaggi 2021, arXiv:2012.10333), a stateful rule.

The iterate ``v`` is always ``γ·v₀ + Σ_i c_i x_i``, so the distances ``‖x_i − v‖`` come from
``X v₀``, the row norms and (for more than one iteration) the Gram matrix; the data are read a
constant number of times whatever the number of iterations.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from fedagg.aggregators._common import Aggregator, combine, gram, is_tensor
from fedagg.registry import Param


class CenteredClipping(Aggregator):
    r"""Centered clipping with an explicit momentum state ``v``.

    .. math:: v_{l+1} = v_l + \sum_i \alpha_i \,(x_i - v_l)\,
              \min\Big(1, \frac{\tau}{\|x_i - v_l\|}\Big), \qquad l = 0, \dots, L-1

    with :math:`\alpha_i = 1/n` (or the normalised weights) and :math:`v_0` = the previous call's
    output (0 on the first call), Karimireddy, He & Jaggi 2021, arXiv:2012.10333. Defaults
    ``tau=100, iterations=1`` follow epfml, ByzFL ``CenteredClipping()`` and FLPoison
    (fedlib/Blades use τ = 5, L = 5).

    The state lives in the object: :meth:`state_dict` returns ``{"v": (d,) array}`` (``{}`` before
    the first call) and :meth:`load_state_dict` restores it, so a checkpoint can resume the same
    sequence of outputs; :meth:`reset` forgets it. Rows with ±inf/NaN are given a zero clipped difference (as if
    ``x_i = v``), so the output stays finite. ``(n, d) -> (d,)``; weights supported.

    Example
    -------
    >>> cc = CenteredClipping(tau=1.0)
    >>> cc(np.array([[0.5, 0.0], [0.0, 0.5], [30.0, 40.0]]))   # (x₁ + x₂ + x₃/50) / 3
    array([0.36666667, 0.43333333])
    """

    name: ClassVar[str] = "centered-clipping"
    PARAMS: ClassVar[tuple[Param, ...]] = (
        Param("tau", float, 100.0, "clipping radius τ", low=0.0),
        Param("iterations", int, 1, "clipping iterations L per call", low=1),
    )
    supports_weights: ClassVar[bool] = True
    tolerates_nonfinite: ClassVar[bool] = True

    def __init__(self, tau: float = 100.0, iterations: int = 1) -> None:
        if tau < 0 or iterations < 1:
            raise ValueError("centered-clipping: need tau >= 0 and iterations >= 1")
        self.tau = float(tau)
        self.iterations = int(iterations)
        self.v: np.ndarray | None = None

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """``{"v": copy of the momentum (d,)}``, or ``{}`` before the first call."""
        return {} if self.v is None else {"v": self.v.copy()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``v`` from :meth:`state_dict` (numpy or torch; ``{}`` or None resets)."""
        unknown = set(state) - {"v"}
        if unknown:
            raise ValueError(f"centered-clipping: unknown state keys {sorted(unknown)}")
        v = state.get("v")
        if is_tensor(v):
            v = v.detach().cpu().numpy()
        self.v = None if v is None else np.array(v, copy=True).reshape(-1)

    def reset(self) -> None:
        """Forget the momentum: the next call starts from ``v₀ = 0``."""
        self.v = None

    # -- math --------------------------------------------------------------------------------
    def _aggregate(self, X: np.ndarray, w: np.ndarray | None) -> np.ndarray:
        n, d = X.shape
        alpha = np.full(n, 1.0 / n) if w is None else w
        v0 = self.v
        if v0 is not None and v0.shape[0] != d:
            raise ValueError(f"centered-clipping: state has d={v0.shape[0]}, updates have d={d}")
        if v0 is not None:
            v0 = v0.astype(X.dtype, copy=False)
            with np.errstate(invalid="ignore", over="ignore"):
                xv0 = np.asarray(X @ v0, dtype=np.float64)
            v0sq = float(np.dot(v0.astype(np.float64), v0.astype(np.float64)))
        else:
            xv0, v0sq = np.zeros(n), 0.0
        G: np.ndarray | None = None
        if self.iterations > 1:
            G = gram(X)
            sq = np.diag(G).copy()
        else:
            with np.errstate(invalid="ignore", over="ignore"):
                sq = np.einsum("ij,ij->i", X, X).astype(np.float64)
        ok = np.isfinite(sq) & np.isfinite(xv0)
        if not ok.all():  # zero the bad rows so that 0 * inf never reaches a product
            sq, xv0 = np.where(ok, sq, 0.0), np.where(ok, xv0, 0.0)
            if G is not None:
                G[~ok, :] = 0.0
                G[:, ~ok] = 0.0
        gamma, c = 1.0, np.zeros(n)
        for _ in range(self.iterations):
            Gc = np.zeros(n) if G is None else G @ c
            vsq = gamma * gamma * v0sq + 2.0 * gamma * (c @ xv0) + c @ Gc
            with np.errstate(invalid="ignore", over="ignore"):
                dist = np.sqrt(np.maximum(sq - 2.0 * (gamma * xv0 + Gc) + vsq, 0.0))
            with np.errstate(divide="ignore"):
                scale = np.where(dist > self.tau, self.tau / np.where(dist > 0, dist, 1.0), 1.0)
            s = np.where(ok, alpha * scale, 0.0)
            keep = 1.0 - s.sum()
            gamma, c = gamma * keep, c * keep + s
        out = combine(X, c)
        if v0 is not None and gamma != 0.0:
            out = out + (gamma * v0).astype(X.dtype)
        self.v = out.copy()
        return out
