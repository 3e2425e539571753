r"""Flag Aggregator (Almasi et al., ICLR 2024, arXiv:2302.05865), exactly as the reference code.

What the reference (hamidralmasi/FlagAggregator HEAD 1ae2c45, ``aggregators/flag.py`` +
``center_algorithms_torch.py``) computes, per ``../shared/reference/fedau_flag.md`` §3.2:

1. unit-normalise every update, :math:`\hat g_i = g_i / \max(\|g_i\|, 10^{-12})`;
2. start from an orthonormal basis :math:`Y_0 \in \mathbb{R}^{d\times m}` (QR of
   ``torch.rand(d, m) − 0.5`` drawn after ``manual_seed(seed)``);
3. IRLS on the flag-median objective
   :math:`E(Y) = \sum_i \sqrt{\max(0, 1 - \|Y^\top \hat g_i\|^2)}`: with
   :math:`s_i = |1 - \|Y^\top \hat g_i\|^2|`, take the top-``m`` left singular vectors of
   :math:`A = [\hat g_i (s_i+\epsilon)^{-1/4}]_i` (plus, if λ > 0, the ordered-pair columns
   :math:`d_{ij}(s_{ij}+\epsilon)^{-1/4}\,\lambda/(p(p-1))`, :math:`d_{ij} = \hat g_i - \hat g_j`,
   so λ enters squared); stop after ``iterations`` steps or when the decrease of E or E itself is
   ≤ ``tol``, and keep the previous Y if the last step did not decrease E;
4. return :math:`Y (Y^\top \textstyle\sum_i \hat g_i) / m` (note ``/m``, and the normalised
   updates: ``‖output‖ ≤ p/m`` whatever the update norms).

**Fast path** (``solver="gram"``, default). Everything above depends on Y only through its span,
and every IRLS iterate lies in :math:`\mathrm{span}(\hat g_1..\hat g_p)`. With
:math:`\hat G = \hat X \hat X^\top` (one ``X Xᵀ``, O(p²d)) and :math:`A A^\top = \hat X^\top B \hat X`,
:math:`B = \mathrm{diag}(a^2) + \sum_{i \ne j} b_{ij}^2 (e_i - e_j)(e_i - e_j)^\top`, the step is
the eigendecomposition of the ``p × p`` matrix :math:`F^\top \hat G F` (:math:`B = F F^\top`,
Cholesky), never an SVD of the ``d × p`` (or ``d × p²`` when λ > 0) matrix. A subspace is held as
coefficients ``C`` with :math:`Y = \hat X^\top C`, and the output is one final :math:`\alpha^\top X`.
The random ``Y_0`` enters only through :math:`Y_0^\top \hat X^\top` (one ``X R`` product with the
``d × m`` draw). Eigen-directions with eigenvalue below ``10·p·eps(dtype)`` times the largest are
dropped: they are orthogonal to every :math:`\hat g_i` (rank deficiency, ``m`` larger than the rank)
and change neither E nor the output. ``solver="svd"`` is the straightforward transcription
(explicit ``A``, ``numpy.linalg.svd``), kept as a cross-check.

Rows with ±inf/NaN are treated as zero vectors (the reference would return NaN). Weights: uniform
only (the reference has none).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from fedagg.aggregators._common import Aggregator, combine, gram, is_tensor
from fedagg.registry import Param

NORM_FLOOR = 1e-12


def reference_random_init(d: int, m: int, seed: int) -> np.ndarray:
    """The reference's raw init ``torch.rand(d, m) − 0.5`` after seeding, float32 ``(d, m)``.

    Drawn from a private ``torch.Generator`` (the reference reseeds the *global* RNG on every call;
    the numbers are the same). Its span is the span of the reference's QR-orthonormalised ``Y_0``.
    """
    import torch  # the reference's own generator; only the flag rule's random init needs torch

    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    return torch.rand(d, m, generator=gen).sub_(0.5).numpy()


def _objective(q: np.ndarray) -> float:
    """E(Y) from ``q_i = ‖Yᵀĝ_i‖²``."""
    return float(np.sqrt(np.maximum(0.0, 1.0 - q)).sum())


def _orthonormaliser(R: np.ndarray, rtol: float) -> np.ndarray:
    """``T`` ``(m, r)`` with ``R T`` orthonormal and spanning ``span(R)`` (eigh of ``RᵀR``)."""
    mu, U = np.linalg.eigh(np.asarray(R.T @ R, dtype=np.float64))
    keep = mu > rtol * max(float(mu[-1]), 0.0)
    return U[:, keep] / np.sqrt(mu[keep])


class FlagAggregator(Aggregator):
    r"""Flag Aggregator: the aggregate is the projection of the summed unit updates onto an IRLS
    flag-median subspace.

    .. math:: \mathrm{FA}(g_1..g_p) = \frac{1}{m} Y Y^\top \sum_i \hat g_i, \qquad
              Y \approx \arg\min_{Y^\top Y = I_m} \sum_i \sqrt{1 - \|Y^\top \hat g_i\|^2}

    Almasi et al. 2024, arXiv:2302.05865; the exact reference procedure, its fast Gram-matrix
    evaluation and the degenerate cases are in the module docstring. ``(p, d) -> (d,)``.

    Parameters
    ----------
    m : int or None
        Subspace dimension (reference ``r_col``); None gives ``(p + 1) // 2`` as in the paper.
        If ``m ≥ d`` (or ``m`` ≥ the rank of the updates) the output is ``Σ ĝ_i / m``.
    lam : float
        Pairwise regulariser λ ≥ 0 (reference ``lambda_``, default 0).
    iterations : int
        Maximum IRLS steps (1 = reference HEAD, 4 = its first commit).
    eps, tol : float
        ``(s + eps)^(-1/4)`` weights (1e-7) and the stopping tolerance on E and its decrease (1e-10).
    init : {"random", "svd"}
        ``random``: the reference draw (seeded by ``seed``, default 1, through a private generator:
        the same ``Y_0`` on every call, like the reference). ``svd``: ``Y_0`` = top-``m`` left
        singular subspace of the normalised updates (no ``d × m`` draw; at large d the reference's
        first step from a random ``Y_0`` lands there, so ``svd`` with k iterations ≈ ``random``
        with k + 1).
    y0 : array (d, r) or None
        Explicit initial basis (its span is used); overrides ``init``.
    cache_init : bool
        The random ``Y_0`` depends only on ``(seed, d, m)``, so it is drawn once and kept
        (``d·m`` floats) instead of being redrawn on every call as the reference does.
    scale : {"reference", "median-norm"}
        ``reference``: the output as above, built from unit-normalised updates (``‖·‖ ≤ p/m``
        whatever the update norms: a normalised direction). ``median-norm`` (not in the reference):
        multiply it by ``(m/p)·median_i ‖g_i‖`` (finite rows), so that ``p`` identical updates
        ``g`` return ``g`` and the output has the units of the updates, like every other rule;
        the median norm is robust while fewer than half the updates are Byzantine. Useful when
        the updates are multi-step model deltas whose size shrinks during training.
    solver : {"gram", "svd"}
        Fast Gram/eigh path or the straightforward thin-SVD path (same result to ~1e-10).

    Attributes
    ----------
    objective_trace : list of float
        E(Y_0), E(Y_1), ... of the last call (before the final accept/reject).

    Example
    -------
    >>> X = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> np.round(FlagAggregator(m=2)(X), 6)   # m ≥ d: Σ ĝ_i / m
    array([0.853553, 0.853553])
    """

    name: ClassVar[str] = "flag"
    PARAMS: ClassVar[tuple[Param, ...]] = (
        Param("m", int, None, "subspace dimension (None: (p+1)//2)", low=1, nullable=True),
        Param("lam", float, 0.0, "pairwise regulariser λ (enters squared)", low=0.0),
        Param("iterations", int, 1, "maximum IRLS steps (reference HEAD: 1)", low=0),
        Param("eps", float, 1e-7, "eps in the (s + eps)^(-1/4) IRLS weights", low=0.0, low_open=True),
        Param("tol", float, 1e-10, "tolerance on E and on its decrease", low=0.0),
        Param("init", str, "random", "initial subspace", choices=("random", "svd")),
        Param("seed", int, 1, "seed of the random init (reference: 1)", low=0),
        Param("y0", object, None, "explicit initial basis (d, r); overrides init", nullable=True),
        Param("solver", str, "gram", "gram (fast, eigh of p×p) or svd (thin SVD of d×p)",
              choices=("gram", "svd")),
        Param("cache_init", bool, True, "keep the random init between calls (d·m floats)"),
        Param("scale", str, "reference", "output length: reference (‖·‖ ≤ p/m, from unit "
              "updates) or median-norm (× (m/p)·median‖g_i‖)", choices=("reference", "median-norm")),
    )
    tolerates_nonfinite: ClassVar[bool] = True

    def __init__(
        self,
        m: int | None = None,
        lam: float = 0.0,
        iterations: int = 1,
        eps: float = 1e-7,
        tol: float = 1e-10,
        init: str = "random",
        seed: int = 1,
        y0: Any = None,
        solver: str = "gram",
        cache_init: bool = True,
        scale: str = "reference",
    ) -> None:
        if init not in ("random", "svd") or solver not in ("gram", "svd"):
            raise ValueError(f"flag: bad init {init!r} or solver {solver!r}")
        if scale not in ("reference", "median-norm"):
            raise ValueError(f"flag: bad scale {scale!r}; allowed: reference, median-norm")
        self.scale = scale
        if lam < 0 or eps <= 0 or iterations < 0 or (m is not None and m < 1):
            raise ValueError("flag: need lam >= 0, eps > 0, iterations >= 0, m >= 1")
        self.m, self.lam, self.iterations = m, float(lam), int(iterations)
        self.eps, self.tol, self.init, self.seed = float(eps), float(tol), init, int(seed)
        if is_tensor(y0):
            y0 = y0.detach().cpu().numpy()
        self.y0 = None if y0 is None else np.array(y0, dtype=np.float64, copy=True)
        self.solver = solver
        self.cache_init = bool(cache_init)
        self._init_cache: tuple[tuple[int, int, str], tuple[np.ndarray, np.ndarray]] | None = None
        self.objective_trace: list[float] = []

    # ------------------------------------------------------------------------------------------
    def _initial_basis(
        self, d: int, m: int, dtype: np.dtype
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """``(R, T)``: a raw ``(d, r)`` initial basis and ``T`` with ``R T`` orthonormal, or None
        for ``init="svd"``."""
        rtol = 10.0 * m * float(np.finfo(dtype).eps)
        if self.y0 is not None:
            y0 = self.y0.reshape(d, -1) if self.y0.ndim == 1 else self.y0
            if y0.shape[0] != d:
                raise ValueError(f"flag: y0 has {y0.shape[0]} rows, updates have d={d}")
            raw = y0.astype(dtype)
            return raw, _orthonormaliser(raw, rtol)
        if self.init == "svd":
            return None
        key = (d, m, np.dtype(dtype).str)
        if self._init_cache is not None and self._init_cache[0] == key:
            return self._init_cache[1]
        raw = reference_random_init(d, m, self.seed).astype(dtype, copy=False)
        basis = (raw, _orthonormaliser(raw, rtol))
        if self.cache_init:
            self._init_cache = (key, basis)
        return basis

    def _aggregate(self, X: np.ndarray, w: np.ndarray | None) -> np.ndarray:
        p, d = X.shape
        m = (p + 1) // 2 if self.m is None else self.m
        G = gram(X)
        sq = np.diag(G).copy()
        ok = np.isfinite(sq)
        if not ok.all():
            G[~ok, :] = 0.0
            G[:, ~ok] = 0.0
            sq[~ok] = 0.0
        inv = np.where(ok, 1.0 / np.maximum(np.sqrt(sq), NORM_FLOOR), 0.0)
        if m >= d:  # Y Yᵀ = I: the output is Σ ĝ_i / m
            self.objective_trace = [_objective(sq * inv * inv)]
            out = combine(X, inv / m)
        elif self.solver == "svd":
            out = self._svd_path(X, inv, m)
        else:
            out = self._gram_path(X, G, inv, m)
        if self.scale == "median-norm":
            med = float(np.median(np.sqrt(sq[ok]))) if ok.any() else 0.0
            out = out * np.asarray(med * m / p, dtype=out.dtype)
        return out

    # -- fast path ------------------------------------------------------------------------------
    def _gram_path(self, X: np.ndarray, G: np.ndarray, inv: np.ndarray, m: int) -> np.ndarray:
        p, d = X.shape
        Gh = inv[:, None] * G * inv[None, :]
        rtol = 10.0 * p * float(np.finfo(X.dtype).eps)
        ones = np.ones(p)

        def span_state(F: np.ndarray, H: np.ndarray) -> np.ndarray:
            """C ``(p, r)`` from the top-m eigenpairs of ``H = Fᵀ Ĝ F`` (Y = X̂ᵀ C)."""
            vals, vecs = np.linalg.eigh(H)
            keep = np.flatnonzero(vals > rtol * max(float(vals[-1]), 0.0))[::-1][:m]
            return F @ vecs[:, keep] / np.sqrt(vals[keep])

        # a subspace is ("span", C) with Y = X̂ᵀC, or ("raw", (R, T)) with Y = R T for Y0;
        # W = Yᵀ X̂ᵀ (r, p) holds the projections of every ĝ_i, Q = WᵀW their inner products
        basis = self._initial_basis(d, m, X.dtype)
        if basis is None:
            C = span_state(np.eye(p), Gh)
            W = C.T @ Gh
            state: tuple[str, Any] = ("span", C)
        else:
            raw, T = basis
            with np.errstate(invalid="ignore", over="ignore"):
                K = np.asarray(X @ raw, dtype=np.float64)  # (p, r) = X Raw
            K[inv == 0.0] = 0.0
            W = T.T @ (K * inv[:, None]).T
            state = ("raw", (raw, T))

        def step(Q: np.ndarray) -> np.ndarray:
            q = np.diag(Q)
            B = np.diag((np.abs(1.0 - q) + self.eps) ** -0.5)
            if self.lam > 0 and p > 1:
                pair = np.abs(1.0 - (q[:, None] + q[None, :] - 2.0 * Q))
                b2 = (pair + self.eps) ** -0.5 * (self.lam / (p * (p - 1))) ** 2
                np.fill_diagonal(b2, 0.0)
                b2 = b2 + b2.T  # (i, j) and (j, i) columns
                B += np.diag(b2.sum(axis=1)) - b2
            F = np.linalg.cholesky(B)
            return span_state(F, F.T @ Gh @ F)

        Q = W.T @ W
        err = _objective(np.diag(Q))
        self.objective_trace = [err]
        diff, it = np.inf, 0
        prev_state, prev_W = state, W
        while it < self.iterations and diff > self.tol and err > self.tol:
            prev_state, prev_W = state, W
            C = step(Q)
            W = C.T @ Gh
            state = ("span", C)
            Q = W.T @ W
            new = _objective(np.diag(Q))
            diff, err = err - new, new
            self.objective_trace.append(new)
            it += 1
        if diff <= 0:
            state, W = prev_state, prev_W
        proj = W @ ones  # Yᵀ Σ ĝ  (r,)
        if state[0] == "span":
            return combine(X, (state[1] @ proj) * inv / m)
        raw, T = state[1]
        return raw @ (T @ proj / m).astype(X.dtype)

    # -- straightforward path -----------------------------------------------------------------
    def _svd_path(self, X: np.ndarray, inv: np.ndarray, m: int) -> np.ndarray:
        p, d = X.shape
        with np.errstate(invalid="ignore"):
            Xh = np.where(inv[:, None] > 0, X * inv[:, None].astype(X.dtype), 0).T  # (d, p)
        Xh = np.asarray(Xh, dtype=np.float64)
        basis = self._initial_basis(d, m, np.dtype(np.float64))
        if basis is None:
            Y = np.linalg.svd(Xh, full_matrices=False)[0][:, :m]
        else:
            Y = np.linalg.qr(basis[0])[0][:, :m]
        if p > 1:
            pi, pj = np.nonzero(~np.eye(p, dtype=bool))  # ordered pairs i != j
            pair_scale = self.lam / (p * (p - 1))

        def energy(Y: np.ndarray, V: np.ndarray) -> np.ndarray:
            return ((Y.T @ V) ** 2).sum(axis=0)

        def E(Y: np.ndarray) -> float:
            return _objective(energy(Y, Xh))

        err = E(Y)
        self.objective_trace = [err]
        diff, it, Yprev = np.inf, 0, Y
        while it < self.iterations and diff > self.tol and err > self.tol:
            Yprev = Y
            cols = [Xh * (np.abs(1.0 - energy(Y, Xh)) + self.eps) ** -0.25]
            if self.lam > 0 and p > 1:
                Dp = Xh[:, pi] - Xh[:, pj]
                cols.append(Dp * ((np.abs(1.0 - energy(Y, Dp)) + self.eps) ** -0.25 * pair_scale))
            A = np.hstack(cols)
            Y = np.linalg.svd(A, full_matrices=False)[0][:, :m]
            new = E(Y)
            diff, err = err - new, new
            self.objective_trace.append(new)
            it += 1
        if diff <= 0:
            Y = Yprev
        out = Y @ (Y.T @ Xh.sum(axis=1)) / m
        return out.astype(X.dtype)
