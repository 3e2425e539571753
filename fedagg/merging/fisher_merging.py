"""Fisher merging (Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022,
arXiv 2111.09832), as the official code ``mmatena/model_merging`` defines it.

Each model's posterior is approximated by a Laplace / diagonal Gaussian ``N(θ_i, diag(F_i)⁻¹)``;
the merged parameters maximise ``Σ_i λ_i log p(θ | θ_i, F_i)``, which is, per coordinate,

    θ* = Σ_i λ'_i F̃_i θ_i / Σ_i λ'_i F̃_i.

Isotropic merging (plain weighted averaging) is the special case ``F_i = 1``. The coefficients λ
are tuned on held-out data in the paper: :func:`pairwise_grid_coefficients` (2 models) and
:func:`dirichlet_coefficients` (more) generate the candidate sets, :func:`search_coefficients`
keeps the best. See ``../shared/reference/fedins_merging.md`` §4 and §8.1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from fedagg.merging._tensors import (
    Array,
    StateDict,
    all_equal,
    as_torch,
    check_keys,
    compute_dtype,
    copy_of,
    gather,
    is_float,
    scalars,
    to_kind,
)

__all__ = [
    "dirichlet_coefficients",
    "fisher_merge",
    "fisher_norm",
    "pairwise_grid_coefficients",
    "search_coefficients",
]


def fisher_norm(fisher: StateDict) -> float:
    """Global L2 norm of a Fisher, all tensors pooled: ``‖F‖₂ = sqrt(Σ_tensors Σ_j F_j²)``.

    Accumulated in float64.
    """
    total = 0.0
    for value in fisher.values():
        t = as_torch(value).to(torch.float64)
        total += float(torch.sum(t * t))
    return math.sqrt(total)


def fisher_merge(
    models: Sequence[StateDict],
    fishers: Sequence[StateDict] | None,
    coefficients: Sequence[float],
    normalize: bool = True,
    floor: float = 1e-6,
    favor_target: bool = True,
) -> dict[str, Array]:
    r"""Fisher-weighted average of ``models`` (Matena & Raffel 2022, arXiv 2111.09832).

    For every coordinate of every tensor named in the Fishers:

    .. math::

        θ^* = \frac{Σ_i λ'_i \tilde F_i θ_i}{Σ_i λ'_i \tilde F_i},\qquad
        λ'_i = \begin{cases} λ_i / ‖F_i‖_2 & \text{normalize} \\ λ_i & \text{otherwise}\end{cases},
        \qquad \tilde F_i = \begin{cases} \max(F_i, \text{floor})
        & i = 0 \text{ or not favor\_target} \\ F_i & \text{otherwise.}\end{cases}

    Model 0 is the *target*. Flags, exactly as the reference ``_merge_with_coeffs`` defines them:

    - ``normalize`` (default True): divide each *coefficient* λ_i by the global L2 norm of that
      model's **raw** Fisher, all its tensors pooled, ``‖F_i‖₂ = sqrt(Σ_tensors Σ F_i²)``
      (:func:`fisher_norm`). The Fishers themselves are not rescaled. Since the rule divides by
      ``Σ_i λ'_i F̃_i``, only the ratios of the λ'_i matter.
    - ``floor`` (default 1e-6): ``F̃ = max(F, floor)`` elementwise on the raw Fisher (the norm
      above is taken before flooring). It keeps the denominator positive.
    - ``favor_target`` (default True): floor only the target's Fisher, so where every Fisher is
      ~0 (below ``floor``) the others contribute ~0 and the result falls back to the **target's**
      value. With ``favor_target=False`` every Fisher is floored and such coordinates get the
      λ'-weighted mean of all models (vectors M4 vs M5 of the reference notes §8.1).

    ``fishers=None`` is the isometric merge (every ``F = 1``): the λ-weighted mean of all
    floating-point entries. Entries of ``models[0]`` that the Fishers do not name (e.g. a
    classification head, as in the reference) and non-floating entries are copied from the target.

    Parameters
    ----------
    models : list of K dicts ``{name: array}``
        numpy arrays or torch tensors; every model must hold the Fisher-named entries, same shapes.
    fishers : list of K dicts ``{name: array}`` or None
        Diagonal Fishers, equally keyed (shapes as in the models), e.g. from
        :func:`fedagg.merging.diagonal_fisher`.
    coefficients : (K,) floats
        λ_i ≥ 0, not all 0; they need not sum to 1.
    normalize, floor, favor_target
        See above.

    Returns
    -------
    dict ``{name: array}`` keyed like ``models[0]``; each entry has the kind, dtype and device of
    ``models[0][name]``. Where every model holds the same value the result is that value, bit for
    bit (merging a model with itself returns it). Where the denominator is exactly 0 (only
    possible with λ_0 = 0 or ``floor = 0``) the target's value is returned instead of NaN.

    Examples
    --------
    >>> m = [{"w": np.array([1.0, 1.0, 1.0])}, {"w": np.array([3.0, 3.0, 3.0])}]
    >>> F = [{"w": np.array([1.0, 3.0, 0.5])}, {"w": np.array([1.0, 1.0, 1.5])}]
    >>> fisher_merge(m, F, [0.5, 0.5], normalize=False)["w"]
    array([2. , 1.5, 2.5])
    """
    k = len(models)
    if k == 0:
        raise ValueError("models must not be empty")
    lam = scalars(coefficients, k, "coefficients")
    if any(v < 0 for v in lam) or not any(v > 0 for v in lam):
        raise ValueError(f"coefficients must be >= 0 and not all 0, got {lam}")
    if not (floor >= 0 and math.isfinite(floor)):
        raise ValueError(f"floor must be a finite number >= 0, got {floor}")
    if fishers is not None and len(fishers) != k:
        raise ValueError(f"{len(fishers)} fishers for {k} models")

    if fishers is None:
        merged_keys = [n for n, v in models[0].items() if is_float(v)]
        floors = [False] * k
        scale = lam
    else:
        merged_keys = check_keys(fishers, "fishers")
        floors = [i == 0 or not favor_target for i in range(k)]
        scale = list(lam)
        if normalize:
            for i, fisher in enumerate(fishers):
                norm = fisher_norm(fisher)
                if not norm > 0 or not math.isfinite(norm):
                    raise ValueError(
                        f"fishers[{i}] has L2 norm {norm}; normalize=True needs a finite, "
                        "non-zero norm (use normalize=False)"
                    )
                scale[i] = lam[i] / norm
    check_keys(models, "models", merged_keys)

    out: dict[str, Array] = {}
    for name, ref in models[0].items():
        if name not in merged_keys:
            out[name] = copy_of(ref)
            continue
        if not is_float(ref):
            raise ValueError(f"cannot Fisher-merge non-floating entry {name!r}")
        t0 = as_torch(ref)
        like = t0.to(compute_dtype(t0))
        thetas = gather(models, name, like)
        num = den = None
        for i, theta in enumerate(thetas):
            if fishers is None:
                w = torch.full_like(theta, scale[i])
            else:
                f = gather([fishers[i]], name, like)[0]
                if floors[i]:
                    f = torch.clamp_min(f, floor)
                w = scale[i] * f
            num = w * theta if num is None else num + w * theta
            den = w if den is None else den + w
        assert num is not None and den is not None
        safe = den != 0
        merged = torch.where(safe, num / torch.where(safe, den, torch.ones_like(den)), thetas[0])
        merged = torch.where(all_equal(thetas), thetas[0], merged)
        out[name] = to_kind(merged, ref)
    return out


def pairwise_grid_coefficients(n: int) -> list[tuple[float, float]]:
    """``n`` evenly spaced pairs ``(1 − t, t)``, ``t = 0, 1/(n−1), …, 1`` (reference
    ``create_pairwise_grid_coeffs``; its default ``n = 51`` gives a step of 0.02).

    >>> pairwise_grid_coefficients(5)
    [(1.0, 0.0), (0.75, 0.25), (0.5, 0.5), (0.25, 0.75), (0.0, 1.0)]
    """
    if n < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    return [(1.0 - i / (n - 1), i / (n - 1)) for i in range(n)]


def dirichlet_coefficients(num_models: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``(n, num_models)`` coefficient sets drawn from ``Dirichlet(1, …, 1)`` with an explicit
    generator (the reference's ``random`` search for more than 2 models)."""
    if num_models < 1 or n < 1:
        raise ValueError(f"num_models and n must be >= 1, got {num_models}, {n}")
    return rng.dirichlet(np.ones(num_models), size=n)


def search_coefficients(
    models: Sequence[StateDict],
    fishers: Sequence[StateDict] | None,
    evaluate: Callable[[dict[str, Array]], float],
    candidates: Sequence[Sequence[float]],
    *,
    normalize: bool = True,
    floor: float = 1e-6,
    favor_target: bool = True,
) -> tuple[list[float], float, dict[str, Array]]:
    """Merge with every coefficient set in ``candidates`` and keep the one with the highest
    held-out ``evaluate(merged)`` (reference ``merge_and_evaluate``; first one wins ties).

    Returns ``(coefficients, score, merged)``.
    """
    best: tuple[list[float], float, dict[str, Array]] | None = None
    for coeffs in candidates:
        merged = fisher_merge(models, fishers, coeffs, normalize, floor, favor_target)
        score = float(evaluate(merged))
        if best is None or score > best[1]:
            best = ([float(c) for c in coeffs], score, merged)
    if best is None:
        raise ValueError("candidates must not be empty")
    return best
