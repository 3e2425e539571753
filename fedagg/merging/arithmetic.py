"""Task arithmetic and TIES merging, with mergekit's conventions (``generalized_task_arithmetic``).

- Task arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023,
  arXiv 2212.04089): task vectors ``δ_i = θ_i − θ_base`` are added to the base,
  ``θ = θ_base + λ Σ_i w_i δ_i`` (mergekit ``task_arithmetic``: ``normalize`` default False).
- TIES (Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023,
  arXiv 2306.01708): **trim** each δ_i to its top-``density`` entries by magnitude, **elect** a sign
  per coordinate from the summed weighted trimmed deltas (mergekit's ``"sum"`` consensus), and
  **disjoint merge** the weighted deltas that agree with it (mergekit ``ties``: ``normalize``
  default True). See ``../shared/reference/fedins_merging.md`` §6.

Models are dicts ``{name: array}`` (numpy or torch) keyed and shaped like the base; they do not
include the base itself. Outputs have the kind, dtype and device of the base's entries.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedagg.errors import ConfigError
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

__all__ = ["magnitude_trim", "task_arithmetic", "ties"]


def magnitude_trim(delta: torch.Tensor, density: float, name: str = "") -> torch.Tensor:
    r"""Keep the ``k = ⌊density · numel⌋`` entries of largest ``|δ|``, zero the rest (mergekit
    ``sparsify`` method ``magnitude``, no rescaling).

    ``density ≥ 1`` returns ``delta`` unchanged. Ties in magnitude at the cut are broken by flat
    index (earliest kept); mergekit's unstable ``argsort`` leaves that order unspecified.
    ``k = 0`` raises :class:`~fedagg.errors.ConfigError` on ``density`` (mergekit asserts too).

    >>> magnitude_trim(torch.tensor([1.0, -2.0, 3.0, 0.5]), 0.5)
    tensor([ 0., -2.,  3.,  0.])
    """
    if density >= 1:
        return delta
    n = delta.numel()
    k = int(density * n)
    if k <= 0:
        raise ConfigError(
            "density",
            f"{density} keeps no entry of tensor {name!r} ({n} entries); "
            "need density * numel >= 1",
        )
    flat = delta.reshape(-1)
    order = torch.argsort(flat.abs(), descending=True, stable=True)
    keep = torch.zeros(n, dtype=torch.bool, device=delta.device)
    keep[order[:k]] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).reshape(delta.shape)


def task_arithmetic(
    base: StateDict,
    models: Sequence[StateDict],
    weights: Sequence[float],
    lambda_: float = 1.0,
    normalize: bool = False,
) -> dict[str, Array]:
    r"""Task arithmetic (Ilharco et al. 2023, arXiv 2212.04089), mergekit ``task_arithmetic``.

    .. math::

        δ_i = θ_i − θ_{base},\qquad
        θ = θ_{base} + λ\,\frac{Σ_i w_i δ_i}{D},\qquad
        D = \begin{cases} Σ_i w_i & \text{normalize (1 where } |Σ_i w_i| < 10^{-8})\\
        1 & \text{otherwise.}\end{cases}

    Parameters
    ----------
    base : dict ``{name: array}``, the common pre-trained model.
    models : list of K dicts keyed and shaped like ``base`` (the fine-tuned models).
    weights : (K,) floats ``w_i`` (negative weights subtract a task).
    lambda_ : global scale λ (mergekit ``lambda``).
    normalize : divide by ``Σ_i w_i`` (mergekit default False for this method).

    Returns
    -------
    dict keyed like ``base``; non-floating entries copied from ``base``. Where every model holds
    the same value and the effective coefficient ``λ Σ_i w_i / D`` is exactly 1, that value is
    returned bit for bit (e.g. one model with weight 1 gives the model back, not
    ``base + (θ − base)`` rounded).

    >>> import numpy as np
    >>> b = {"w": np.array([1.0, 1.0])}
    >>> ms = [{"w": np.array([2.0, 3.0])}, {"w": np.array([0.0, 1.0])}]
    >>> task_arithmetic(b, ms, [1.0, 0.5], lambda_=0.5)["w"]
    array([1.25, 2.  ])
    """
    return _generalized(base, models, weights, lambda_, normalize, density=None, ties_=False)


def ties(
    base: StateDict,
    models: Sequence[StateDict],
    weights: Sequence[float],
    density: float | Sequence[float],
    lambda_: float = 1.0,
    normalize: bool = True,
) -> dict[str, Array]:
    r"""TIES merging (Yadav et al. 2023, arXiv 2306.01708), mergekit ``ties``.

    Per tensor, with ``δ_i = θ_i − θ_base``:

    1. trim: ``δ̂_i = magnitude_trim(δ_i, density_i)`` (top ``⌊density_i · numel⌋`` by ``|δ|``);
    2. elect: ``s = +1 if Σ_i w_i δ̂_i ≥ 0 else −1`` (mergekit consensus ``"sum"``, on the
       *weighted* trimmed deltas);
    3. disjoint merge: ``m_i = [sign(w_i δ̂_i) = s]`` (a zero entry never agrees),
       ``δ = Σ_i w_i δ̂_i m_i / D`` with ``D = Σ_i w_i m_i`` (set to 1 where it is 0) if
       ``normalize``, else ``D = 1``;
    4. ``θ = θ_base + λ δ``.

    Parameters
    ----------
    base : dict ``{name: array}``.
    models : list of K dicts keyed and shaped like ``base``.
    weights : (K,) floats ``w_i``.
    density : fraction of entries kept per tensor, in (0, 1]; one float or one per model.
    lambda_ : global scale λ.
    normalize : mergekit default True for ``ties``.

    Returns
    -------
    dict keyed like ``base``. Where every model holds the same value and ``λ Σ_i w_i m_i / D`` is
    exactly 1 the value is returned bit for bit.

    >>> import numpy as np
    >>> b = {"w": np.zeros(4)}
    >>> ms = [{"w": np.array([1.0, -2.0, 3.0, 0.5])}, {"w": np.array([-1.0, 1.0, 2.0, -4.0])}]
    >>> ties(b, ms, [1.0, 1.0], density=0.5)["w"]
    array([ 0. , -2. ,  2.5, -4. ])
    """
    k = len(models)
    if isinstance(density, (int, float)):
        dens = [float(density)] * k
    else:
        dens = scalars(density, k, "density")
    for d in dens:
        if not 0 < d <= 1:
            raise ConfigError("density", f"must be in (0, 1], got {d}")
    return _generalized(base, models, weights, lambda_, normalize, density=dens, ties_=True)


def _generalized(
    base: StateDict,
    models: Sequence[StateDict],
    weights: Sequence[float],
    lambda_: float,
    normalize: bool,
    density: list[float] | None,
    ties_: bool,
) -> dict[str, Array]:
    """mergekit's generalized task arithmetic: optional trim, optional sign consensus."""
    k = len(models)
    if k == 0:
        raise ValueError("models must not be empty")
    keys = check_keys([base, *models], "[base, *models]")
    w = scalars(weights, k, "weights")
    lam = float(lambda_)
    out: dict[str, Array] = {}
    for name in keys:
        ref = base[name]
        if not is_float(ref):
            out[name] = copy_of(ref)
            continue
        b0 = as_torch(ref)
        b = b0.to(compute_dtype(b0))
        thetas = gather(models, name, b)
        deltas = [t - b for t in thetas]
        if density is not None:
            deltas = [
                magnitude_trim(d, dens, name) for d, dens in zip(deltas, density, strict=True)
            ]
        weighted = [wi * d for wi, d in zip(w, deltas, strict=True)]
        if ties_:
            sign = torch.where(_sum(weighted) >= 0, 1.0, -1.0).to(b.dtype)
            masks = [torch.sign(wd) == sign for wd in weighted]
            mixed = _sum([wd * m for wd, m in zip(weighted, masks, strict=True)])
            coef = _sum([wi * m.to(b.dtype) for wi, m in zip(w, masks, strict=True)])
            if normalize:
                divisor = torch.where(coef == 0, torch.ones_like(coef), coef)
                mixed = mixed / divisor
                coef = coef / divisor
            unit = coef * lam == 1  # effective coefficient on a task vector shared by all models
        else:
            mixed = _sum(weighted)
            total = sum(w)
            divisor = 1.0 if abs(total) < 1e-8 else total
            if normalize:
                mixed = mixed / divisor
            unit = torch.tensor((total / divisor if normalize else total) * lam == 1.0)
        if lam != 1.0:
            mixed = mixed * lam
        merged = torch.where(all_equal(thetas) & unit.to(b.device), thetas[0], b + mixed)
        out[name] = to_kind(merged, ref)
    return out


def _sum(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    acc = ts[0]
    for t in ts[1:]:
        acc = acc + t
    return acc
