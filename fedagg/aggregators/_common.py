"""Shared machinery of the robust-aggregation family: base classes, input handling, Gram distances.

Every rule runs its math in numpy on CPU, whatever the input kind:

- numpy ``(n, d)`` arrays are used as they are (never written to);
- torch tensors go through ``tensor.detach().cpu().numpy()`` (zero-copy for CPU tensors; a CUDA
  tensor is copied to the host and the result copied back to its device);
- a list of 1-D vectors is stacked first (numpy if the first element is an ndarray, torch otherwise).

The result has the kind, dtype and device of the input. Floating dtypes are kept: float64 is
computed in float64, float32 in float32, and float16/bfloat16 in float32, cast back at the end.
Integer or boolean inputs are promoted (numpy → float64, torch → ``torch.get_default_dtype()``).
Small ``(n, n)`` matrices (Gram, distances, eigenproblems) are always handled in float64.

Pairwise distances use the Gram trick ``‖x_i − x_j‖² = ‖x_i‖² + ‖x_j‖² − 2 x_i·x_j`` (one BLAS
``X Xᵀ``, O(n²d)), clamped at 0. The absolute error of a squared distance is about
``eps · max‖x‖²`` (eps = 1.2e-7 for float32 inputs, 2.2e-16 for float64), so distances far below
the norms of the updates themselves lose relative precision, as in Flower's ``compute_distances``.
Rows with a non-finite entry (±inf, NaN, or a squared norm that overflows) are at distance +inf from
every other row.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Union

import numpy as np

from fedagg.errors import ConfigError
from fedagg.registry import Param

if TYPE_CHECKING:  # torch is imported only when a tensor comes in
    import torch

ArrayLike = Union[np.ndarray, "torch.Tensor", Sequence[np.ndarray], Sequence["torch.Tensor"]]


def is_tensor(x: Any) -> bool:
    """Whether ``x`` is a torch tensor, without importing torch: numpy-only users never load it
    (if torch is not imported yet, nothing can be a tensor)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)

# Parameter shared by most rules: the number of Byzantine clients the rule must tolerate.
F_PARAM = Param("f", int, doc="number of Byzantine clients to tolerate", low=0)


# ------------------------------------------------------------------------------------------------
# Input / output conversion
# ------------------------------------------------------------------------------------------------


def _compute_dtype_np(dtype: np.dtype) -> np.dtype:
    if dtype == np.float64 or dtype == np.float32:
        return dtype
    if np.issubdtype(dtype, np.floating):  # float16, longdouble
        return np.dtype(np.float32) if dtype.itemsize < 4 else np.dtype(np.float64)
    return np.dtype(np.float64)


def to_matrix(updates: ArrayLike, ndim: int = 2) -> tuple[np.ndarray, Callable[[np.ndarray], Any]]:
    """Return ``(X, back)``: a numpy view/copy of ``updates`` and the inverse conversion.

    ``X`` may share memory with the input: callers must never write to it. ``back(out)`` turns a
    fresh numpy result into the kind/dtype/device of the input (copying if ``out`` could alias
    the input, so a result never shares memory with an argument).
    """
    if isinstance(updates, (list, tuple)):
        if len(updates) == 0:
            raise ValueError("updates is an empty list; need at least one vector")
        if all(is_tensor(u) for u in updates):
            import torch

            updates = torch.stack([u.detach().reshape(-1) for u in updates])
        else:
            updates = np.stack([np.asarray(u).reshape(-1) for u in updates])
    if is_tensor(updates):
        import torch

        t = updates.detach()
        orig_dtype, device = t.dtype, t.device
        if t.is_complex():
            raise TypeError("complex tensors are not supported")
        if t.dtype in (torch.float32, torch.float64):
            pass
        elif t.is_floating_point():
            t = t.to(torch.float32)
        else:
            orig_dtype = torch.get_default_dtype()
            t = t.to(orig_dtype)
        X = t.cpu().numpy()

        def back_torch(out: np.ndarray) -> Any:
            if np.may_share_memory(out, X):
                out = out.copy()
            res = torch.from_numpy(np.ascontiguousarray(out))
            return res.to(device=device, dtype=orig_dtype)

        back: Callable[[np.ndarray], Any] = back_torch
    elif isinstance(updates, np.ndarray):
        if np.iscomplexobj(updates):
            raise TypeError("complex arrays are not supported")
        orig_np = updates.dtype if np.issubdtype(updates.dtype, np.floating) else np.dtype(np.float64)
        cdt = _compute_dtype_np(updates.dtype)
        X = updates if updates.dtype == cdt else updates.astype(cdt)
        src = updates

        def back_np(out: np.ndarray) -> np.ndarray:
            if np.may_share_memory(out, src) or np.may_share_memory(out, X):
                out = out.copy()
            return out.astype(orig_np, copy=False)

        back = back_np
    else:
        raise TypeError(
            f"updates must be a numpy array, a torch tensor or a list of 1-D vectors, "
            f"got {type(updates).__name__}"
        )
    if X.ndim != ndim:
        raise ValueError(f"updates must be {ndim}-D (n, d), got shape {tuple(X.shape)}")
    if X.shape[0] == 0:
        raise ValueError("updates has no rows; need at least one vector")
    return X, back


def check_weights(
    weights: Any, n: int, rule: str, supported: bool
) -> np.ndarray | None:
    """Validated per-row weights ``(n,)`` as float64, or None for uniform weights.

    Rules that do not support weights accept ``None`` or uniform weights (all equal) and raise a
    ValueError for anything else.
    """
    if weights is None:
        return None
    if is_tensor(weights):
        weights = weights.detach().cpu().numpy()
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape[0] != n:
        raise ValueError(f"{rule}: weights has {w.shape[0]} entries for {n} updates")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"{rule}: weights must be finite and non-negative")
    if w.sum() <= 0:
        raise ValueError(f"{rule}: weights sum to zero")
    if np.all(w == w[0]):
        return None
    if not supported:
        raise ValueError(
            f"{rule} does not support non-uniform weights (its order statistics are unweighted); "
            "pass weights=None, or use mean, multikrum, geomedian or centered-clipping"
        )
    return w / w.sum()


# ------------------------------------------------------------------------------------------------
# Linear algebra helpers
# ------------------------------------------------------------------------------------------------


def gram(X: np.ndarray) -> np.ndarray:
    """``X Xᵀ`` ``(n, n)`` computed in the dtype of ``X`` (one BLAS call), returned as float64."""
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite rows are handled by callers
        return np.asarray(X @ X.T, dtype=np.float64)


def finite_rows(G: np.ndarray) -> np.ndarray:
    """``(n,)`` bool: rows whose squared norm (the Gram diagonal) is finite."""
    return np.isfinite(np.diag(G))


def sq_distances(G: np.ndarray) -> np.ndarray:
    """Squared pairwise distances ``(n, n)`` from the Gram matrix, clamped ≥ 0, zero diagonal.

    Rows flagged by :func:`finite_rows` as non-finite are at distance +inf from every other row.
    """
    sq = np.diag(G).copy()
    ok = np.isfinite(sq)
    sq[~ok] = 0.0
    with np.errstate(invalid="ignore", over="ignore"):
        D = sq[:, None] + sq[None, :] - 2.0 * G
    np.maximum(D, 0.0, out=D)
    D[~ok, :] = np.inf
    D[:, ~ok] = np.inf
    np.fill_diagonal(D, 0.0)
    return D


def combine(X: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``Σ_i c_i x_i`` ``(d,)`` in the dtype of ``X``; rows with ``c_i == 0`` are skipped exactly.

    Skipping matters when a zero-weight row holds inf/NaN (``0 · inf = NaN`` inside BLAS).
    """
    c = np.asarray(c, dtype=np.float64)
    idx = np.flatnonzero(c)
    if idx.size == 0:
        return np.zeros(X.shape[1], dtype=X.dtype)
    if idx.size == X.shape[0]:
        return c.astype(X.dtype) @ X
    return c[idx].astype(X.dtype) @ X[idx]


def window_mean(S: np.ndarray, t: np.ndarray, k: int) -> np.ndarray:
    """Per column ``j``, the mean of ``S[t_j : t_j + k, j]`` for a column-sorted ``S`` ``(n, d)``.

    ``t`` ``(d,)`` holds window starts in ``[0, n − k]``. Rows outside a column's window are
    excluded with ``np.where`` (never multiplied by 0), so ±inf/NaN there do not leak.
    """
    n = S.shape[0]
    e = n - k
    if e == 0:
        return S.mean(axis=0)
    total = S[e:k].sum(axis=0) if e < k else np.zeros(S.shape[1], dtype=S.dtype)
    for j in range(n):
        if e <= j < k:
            continue  # inside every window
        inside = (t <= j) & (j < t + k)
        total += np.where(inside, S[j], 0)
    return total / k


def closest_to_center_mean(S: np.ndarray, center: np.ndarray, k: int) -> np.ndarray:
    """Per coordinate, the mean of the ``k`` values closest to ``center`` ``(d,)``.

    ``S`` is ``X`` sorted along axis 0. The k nearest values to a point form a contiguous window
    of the sorted column; its start is the number of windows ``t`` with
    ``center − S[t] > S[t+k] − center``, a prefix because ``S[t] + S[t+k]`` is non-decreasing in t.
    Ties keep the lower values. NaN sorts last and is never preferred.
    """
    n = S.shape[0]
    if k >= n:
        return S.mean(axis=0)
    with np.errstate(invalid="ignore"):
        h = (S[: n - k] - center) + (S[k:] - center)  # (n-k, d)
        t = np.count_nonzero(h < 0, axis=0)
    return window_mean(S, t, k)


def sorted_median(S: np.ndarray) -> np.ndarray:
    """Coordinate-wise median of a column-sorted ``S`` (mean of the two middles for even n)."""
    n = S.shape[0]
    if n % 2:
        return S[n // 2].copy()
    return 0.5 * (S[n // 2 - 1] + S[n // 2])


# ------------------------------------------------------------------------------------------------
# Base classes
# ------------------------------------------------------------------------------------------------


def infeasible(rule: str, message: str) -> ConfigError:
    """The error for a rule that cannot run with this (n, f): names ``<rule>.f``."""
    return ConfigError(f"{rule}.f", message)


class _Rule:
    """What aggregators and pre-aggregators share: declared hyperparameters (``PARAMS``, stored
    as attributes), explicit state (empty unless a stateful rule overrides it) and a summary."""

    name: ClassVar[str] = "rule"
    PARAMS: ClassVar[tuple[Param, ...]] = ()
    #: Hyperparameters left out of :meth:`summary` (generators, arrays).
    UNSUMMARISED: ClassVar[tuple[str, ...]] = ("rng",)

    # explicit state (only stateful rules override)
    def state_dict(self) -> dict[str, np.ndarray]:
        """State to checkpoint: a flat ``{key: numpy array}`` dict (empty for stateless rules)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ValueError(f"{self.name} is stateless; got state keys {sorted(state)}")

    def hparams(self) -> dict[str, Any]:
        """The declared hyperparameters and their values."""
        return {p.name: getattr(self, p.name) for p in self.PARAMS}

    def summary(self) -> str:
        """One line naming the rule and its knobs (for logs)."""
        args = ", ".join(
            f"{k}={v!r}" for k, v in self.hparams().items() if k not in self.UNSUMMARISED
        )
        return f"{self.name}({args})"

    def __repr__(self) -> str:
        return self.summary()


class Aggregator(_Rule):
    """A robust aggregation rule ``(n, d) -> (d,)``.

    Subclasses set ``name``, ``PARAMS`` (declared :class:`~fedagg.registry.Param`) and implement
    :meth:`_aggregate` on a numpy matrix. ``supports_weights`` says whether non-uniform
    per-row weights are meaningful for the rule.
    """

    name: ClassVar[str] = "aggregator"
    PARAMS: ClassVar[tuple[Param, ...]] = ()
    UNSUMMARISED: ClassVar[tuple[str, ...]] = ("rng", "y0")
    supports_weights: ClassVar[bool] = False
    tolerates_nonfinite: ClassVar[bool] = False

    def __call__(self, updates: ArrayLike, weights: Any = None) -> Any:
        """Aggregate ``updates`` ``(n, d)`` (optionally weighted, ``(n,)``) into ``(d,)``.

        The result has the kind (numpy/torch), dtype and device of ``updates``; the input is
        never modified.
        """
        X, back = to_matrix(updates)
        w = check_weights(weights, X.shape[0], self.name, self.supports_weights)
        return back(self._aggregate(X, w))

    def _aggregate(self, X: np.ndarray, w: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError


class PreAggregator(_Rule):
    """A pre-aggregation ``(n, d) -> (n', d)`` applied before a final rule (e.g. NNM, bucketing).

    Subclasses implement :meth:`_transform`, which also maps the per-row weights (``None`` for
    uniform) to weights of the output rows.
    """

    name: ClassVar[str] = "pre-aggregator"
    PARAMS: ClassVar[tuple[Param, ...]] = ()

    def __call__(self, updates: ArrayLike, weights: Any = None) -> Any:
        """Transform ``updates`` ``(n, d)`` into ``(n', d)`` of the same kind and dtype."""
        X, back = to_matrix(updates)
        w = check_weights(weights, X.shape[0], self.name, True)
        Y, _ = self._transform(X, w)
        return back(Y)

    def _transform(
        self, X: np.ndarray, w: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError
