"""Pre-aggregators ``(n, d) -> (n', d)``: nearest-neighbour mixing, bucketing, static clipping.

They are meant to be chained before a final rule by name, e.g. ``build("nnm+trimmed-mean", f=3)``
(see :mod:`fedagg.aggregators`). Each maps the per-row weights along with the rows.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from fedagg.aggregators._common import (
    F_PARAM,
    PreAggregator,
    finite_rows,
    gram,
    infeasible,
    sq_distances,
)
from fedagg.registry import Param
from fedagg.rng import numpy_rng


class NNM(PreAggregator):
    r"""Nearest-neighbour mixing (Allouah et al. 2023, "Fixing by Mixing", arXiv:2302.01772).

    .. math:: y_i = \frac{1}{n-f} \sum_{j \in N_{n-f}(i)} x_j

    where :math:`N_{n-f}(i)` are the ``n − f`` nearest updates to ``x_i`` in L2, **including**
    ``x_i`` itself (as ByzFL ``NNM(f)``); ties keep the lower index. Distances come from one Gram
    matrix and the mixing is one ``(n, n) @ (n, d)`` product. ``(n, d) -> (n, d)``; weights pass
    through unchanged. A row with ±inf/NaN is never a neighbour of a finite row; its own output
    row is non-finite (left to the final rule). Requires ``n > f``.

    Example
    -------
    >>> NNM(f=1)(np.array([[1.0, 2, 3], [4, 5, 6], [7, 8, 9]]))
    array([[2.5, 3.5, 4.5],
           [2.5, 3.5, 4.5],
           [5.5, 6.5, 7.5]])
    """

    name: ClassVar[str] = "nnm"
    PARAMS: ClassVar[tuple[Param, ...]] = (F_PARAM,)

    def __init__(self, f: int) -> None:
        self.f = int(f)

    def neighbours(self, X: np.ndarray, G: np.ndarray | None = None) -> np.ndarray:
        """``(n, n − f)`` indices of each row's nearest neighbours, self first."""
        n = X.shape[0]
        if n <= self.f:
            raise infeasible(self.name, f"nnm needs n > f; got n={n}, f={self.f}")
        E = sq_distances(gram(X) if G is None else G)
        np.fill_diagonal(E, -1.0)
        return np.argsort(E, axis=1, kind="stable")[:, : n - self.f]

    def _transform(
        self, X: np.ndarray, w: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        n = X.shape[0]
        G = gram(X)
        nbr = self.neighbours(X, G)
        M = np.zeros((n, n), dtype=X.dtype)
        M[np.arange(n)[:, None], nbr] = 1.0 / nbr.shape[1]
        ok = finite_rows(G)
        if ok.all():
            return M @ X, w
        Y = np.empty_like(X)
        clean = ok[nbr].all(axis=1)
        Y[clean] = M[np.ix_(clean, ok)] @ X[ok]
        for i in np.flatnonzero(~clean):
            Y[i] = X[nbr[i]].mean(axis=0)
        return Y, w


class Bucketing(PreAggregator):
    r"""Bucketing (Karimireddy, He & Jaggi 2022, arXiv:2006.09365).

    .. math:: \pi \sim \mathrm{Unif}(S_n), \qquad
              y_b = \frac{1}{|B_b|} \sum_{i \in B_b} x_{\pi(i)}, \quad
              B_b = \{bs, \dots, \min(n, (b+1)s) - 1\}

    ``⌈n/s⌉`` buckets of ``s`` consecutive permuted updates (the last may be smaller, as ByzFL).
    The permutation comes from an explicit ``np.random.Generator``: ``rng`` if given, otherwise
    ``fedagg.rng.numpy_rng(seed, "bucketing")``; global RNGs are never used. The generator
    advances on every call and its state is part of :meth:`state_dict`. With weights, a bucket is
    the weighted mean of its members and carries their total weight.
    ``(n, d) -> (⌈n/s⌉, d)``.

    Example
    -------
    >>> Bucketing(s=2, seed=0)(np.array([[1.0], [2.0], [3.0], [4.0]])).shape
    (2, 1)
    """

    name: ClassVar[str] = "bucketing"
    PARAMS: ClassVar[tuple[Param, ...]] = (
        Param("s", int, 2, "bucket size", low=1),
        Param("seed", int, 0, "seed of the permutation stream (ignored if rng is given)", low=0),
        Param("rng", object, None, "explicit np.random.Generator (overrides seed)", nullable=True),
    )

    def __init__(self, s: int = 2, seed: int = 0, rng: np.random.Generator | None = None) -> None:
        if rng is not None and not isinstance(rng, np.random.Generator):
            raise TypeError("bucketing: rng must be a numpy.random.Generator")
        self.s = int(s)
        self.seed = int(seed)
        self.rng = rng if rng is not None else numpy_rng(self.seed, "bucketing")

    def state_dict(self) -> dict[str, np.ndarray]:
        """``{"rng": the bit-generator state as JSON bytes (uint8 array)}``: restoring it replays
        the same permutations."""
        blob = json.dumps(self.rng.bit_generator.state).encode()
        return {"rng": np.frombuffer(blob, dtype=np.uint8).copy()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if set(state) != {"rng"}:
            raise ValueError(f"bucketing: expected state key 'rng', got {sorted(state)}")
        self.rng.bit_generator.state = json.loads(bytes(np.asarray(state["rng"], dtype=np.uint8)))

    def _transform(
        self, X: np.ndarray, w: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        n = X.shape[0]
        perm = self.rng.permutation(n)
        starts = np.arange(0, n, self.s)
        if w is None:
            counts = np.minimum(starts + self.s, n) - starts
            sums = np.add.reduceat(X[perm], starts, axis=0)
            return sums / counts[:, None].astype(X.dtype), None
        Y = np.empty((starts.size, X.shape[1]), dtype=X.dtype)
        wb = np.empty(starts.size)
        for b, s0 in enumerate(starts):
            idx = perm[s0 : s0 + self.s]
            wb[b] = w[idx].sum()
            if wb[b] > 0:
                nz = idx[w[idx] > 0]
                Y[b] = (w[nz] / wb[b]).astype(X.dtype) @ X[nz]
            else:
                Y[b] = X[idx].mean(axis=0)
        return Y, wb / wb.sum()


class Clipping(PreAggregator):
    r"""Static norm clipping of every update.

    .. math:: y_i = x_i \cdot \min\Big(1, \frac{\tau}{\|x_i\|_2}\Big)

    As ByzFL ``Clipping(c=τ)`` (default τ = 2.0, its default), but the input is not modified. A row
    with ±inf/NaN (or whose squared norm overflows) has no usable direction and is mapped to the
    zero vector. ``(n, d) -> (n, d)``;
    weights pass through.

    Example
    -------
    >>> Clipping(tau=1.0)(np.array([[3.0, 4.0], [0.3, 0.4]]))
    array([[0.6, 0.8],
           [0.3, 0.4]])
    """

    name: ClassVar[str] = "clipping"
    PARAMS: ClassVar[tuple[Param, ...]] = (
        Param("tau", float, 2.0, "clipping radius τ (L2 norm)", low=0.0),
    )

    def __init__(self, tau: float = 2.0) -> None:
        if tau < 0:
            raise ValueError(f"clipping: tau must be >= 0, got {tau}")
        self.tau = float(tau)

    def _transform(
        self, X: np.ndarray, w: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        with np.errstate(invalid="ignore", over="ignore"):
            norms = np.sqrt(np.einsum("ij,ij->i", X, X).astype(np.float64))
        ok = np.isfinite(norms)
        scale = np.where(norms > self.tau, self.tau / np.where(norms > 0, norms, 1.0), 1.0)
        scale = np.where(ok, scale, 0.0)
        with np.errstate(invalid="ignore"):
            Y = X * scale[:, None].astype(X.dtype)
        if not ok.all():
            Y[~ok] = 0.0
        return Y, w
