"""SSF layers: scale-and-shift after chosen affine ops, and the fold back into a plain model.

SSF (Lian et al., "Scaling & Shifting Your Features", NeurIPS 2022, arXiv 2210.08823) follows an
operation ``op`` whose output has ``C`` channels with

.. math::  y = \\gamma \\odot \\mathrm{op}(x) + \\beta, \\qquad \\gamma, \\beta \\in \\mathbb{R}^C,

broadcast along the channel dimension (the last dimension for Linear / LayerNorm outputs
``(B, …, C)``, dimension ``-2`` for Conv1d ``(B, C, L)`` and ``-3`` for Conv2d ``(B, C, H, W)``).
Initialisation as in the official code: ``γ ~ N(1, 0.02²)``, ``β ~ N(0, 0.02²)``.

Because every site follows an affine op, SSF folds into it (re-parameterisation, derived in
``fedins_merging.md`` §1): Linear / Conv ``W' = γ[:, None, …] · W``, ``b' = γ ⊙ b + β``; LayerNorm
``w' = γ ⊙ w``, ``b' = γ ⊙ b + β`` (with ``w = 1, b = 0`` when the norm has no affine).

Example
-------
>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
>>> adapted = inject_ssf(net, generator=torch.Generator().manual_seed(0))
>>> find_ssf_sites(adapted)
['0', '2']
>>> x = torch.randn(5, 3)
>>> bool(torch.allclose(fold(adapted)(x), adapted(x), atol=1e-6))
True
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "DEFAULT_SITE_TYPES",
    "SSF",
    "BaseSSFSite",
    "SSFSite",
    "channel_dim",
    "find_sites",
    "find_ssf_sites",
    "fold",
    "fold_site",
    "init_scale_shift",
    "inject_ssf",
    "resolve_sites",
    "ssf_apply",
    "ssf_named_parameters",
]

DEFAULT_SITE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.LayerNorm, nn.Conv1d, nn.Conv2d)
"""Module types SSF can follow (and fold into)."""


def channel_dim(module: nn.Module) -> tuple[int, int]:
    """``(C, dim)``: channel count of ``module``'s output and the (negative) dimension it lies on.

    Linear ``(out_features, -1)``, LayerNorm ``(normalized_shape[-1], -1)``, Conv1d
    ``(out_channels, -2)``, Conv2d ``(out_channels, -3)``. Negative dims make unbatched inputs work.
    """
    if isinstance(module, nn.Linear):
        return module.out_features, -1
    if isinstance(module, nn.LayerNorm):
        return int(module.normalized_shape[-1]), -1
    if isinstance(module, nn.Conv1d):
        return module.out_channels, -2
    if isinstance(module, nn.Conv2d):
        return module.out_channels, -3
    raise TypeError(
        f"SSF can follow {', '.join(t.__name__ for t in DEFAULT_SITE_TYPES)}; "
        f"got {type(module).__name__}"
    )


def _tensor_kwargs(module: nn.Module) -> dict[str, Any]:
    """``dtype`` / ``device`` of ``module``'s first parameter (empty if it has none)."""
    ref = next(module.parameters(), None)
    return {} if ref is None else {"dtype": ref.dtype, "device": ref.device}


def ssf_apply(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``γ ⊙ x + β`` along channel dimension ``dim``.

    Parameters
    ----------
    x : (B, …) tensor
        Features; ``x.shape[dim] == C``.
    scale, shift : (C,) or (B, C) tensors
        Shared parameters, or per-sample parameters (row ``b`` applies to ``x[b]``).
    dim : int
        Channel dimension of ``x`` (negative or positive).

    Returns
    -------
    (B, …) tensor, same shape as ``x``.

    Example
    -------
    >>> ssf_apply(torch.ones(2, 3, 2), torch.tensor([2., 3.]), torch.tensor([0., 1.]))[0, 0]
    tensor([2., 4.])
    """
    d = dim % x.ndim
    shape = [1] * x.ndim
    shape[d] = x.shape[d]
    if scale.ndim == 2:
        if d == 0:
            raise ValueError("per-sample SSF needs a batch dimension before the channel dimension")
        shape[0] = x.shape[0]
    return x * scale.reshape(shape) + shift.reshape(shape)


def init_scale_shift(
    scale: torch.Tensor, shift: torch.Tensor, generator: torch.Generator | None, std: float = 0.02
) -> None:
    """In place: ``scale ~ N(1, std²)``, ``shift ~ N(0, std²)`` (scale first, then shift).

    ``generator=None`` gives the identity (``scale = 1``, ``shift = 0``).
    """
    with torch.no_grad():
        if generator is None:
            scale.fill_(1.0)
            shift.zero_()
        else:
            nn.init.normal_(scale, mean=1.0, std=std, generator=generator)
            nn.init.normal_(shift, mean=0.0, std=std, generator=generator)


class SSF(nn.Module):
    """One SSF operator ``y = γ ⊙ x + β`` with ``γ, β ∈ R^C`` on channel dimension ``dim``.

    ``generator=None`` initialises to the identity; otherwise ``γ ~ N(1, std²)``, ``β ~ N(0, std²)``.
    """

    def __init__(
        self, num_features: int, dim: int = -1, *, generator: torch.Generator | None = None,
        std: float = 0.02, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.scale = nn.Parameter(torch.empty(num_features, device=device, dtype=dtype))
        self.shift = nn.Parameter(torch.empty(num_features, device=device, dtype=dtype))
        init_scale_shift(self.scale, self.shift, generator, std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ssf_apply(x, self.scale, self.shift, self.dim)

    def extra_repr(self) -> str:
        return f"{self.scale.numel()}, dim={self.dim}"


class BaseSSFSite(nn.Module):
    """A module ``base`` followed by some SSF; the common type of every SSF site.

    The base module's parameters appear under ``<site>.base.*`` while SSF is attached.
    """

    base: nn.Module


class SSFSite(BaseSSFSite):
    """``base`` followed by an :class:`SSF`: ``forward(*a) = ssf(base(*a))``.

    :func:`fold` replaces it by the folded ``base``, restoring the original names and architecture.
    """

    def __init__(self, base: nn.Module, ssf: SSF) -> None:
        super().__init__()
        self.base = base
        self.ssf = ssf

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        return self.ssf(self.base(*args, **kwargs))


def find_sites(
    model: nn.Module, *, types: Sequence[type[nn.Module]] = DEFAULT_SITE_TYPES,
    include: Sequence[str] | None = None, exclude: Sequence[str] = (),
) -> list[str]:
    """Qualified names of the modules SSF would follow, in ``named_modules()`` order.

    A module is a site when it is an instance of one of ``types`` (each a subclass of a
    :data:`DEFAULT_SITE_TYPES` type), its name matches one of the ``include`` glob patterns
    (``fnmatch``, e.g. ``"blocks.*.attn.qkv"``; ``None`` = all) and none of ``exclude``. Never
    sites: the root module, modules inside an existing SSF site, and the projections inside
    ``nn.MultiheadAttention`` (it reads their weights directly, so a wrapper would never run).

    Example
    -------
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    >>> find_sites(net, types=(nn.Linear,), exclude=["2"])
    ['0']
    """
    for t in types:
        if not issubclass(t, DEFAULT_SITE_TYPES):
            raise TypeError(f"SSF cannot follow {t.__name__}; allowed: "
                            f"{', '.join(d.__name__ for d in DEFAULT_SITE_TYPES)}")
    skip: list[str] = []
    out: list[str] = []
    for name, module in model.named_modules():
        if name == "" or any(name.startswith(p + ".") for p in skip):
            continue
        if isinstance(module, (BaseSSFSite, nn.MultiheadAttention)):
            skip.append(name)
            continue
        if not isinstance(module, tuple(types)):
            continue
        if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        out.append(name)
    return out


def find_ssf_sites(model: nn.Module) -> list[str]:
    """Names of the SSF sites (:class:`SSFSite` and pool sites) in ``model``."""
    return [name for name, m in model.named_modules() if isinstance(m, BaseSSFSite)]


def resolve_sites(
    model: nn.Module, sites: Sequence[str] | None, types: Sequence[type[nn.Module]],
    include: Sequence[str] | None, exclude: Sequence[str],
) -> list[str]:
    """Explicit ``sites``, or :func:`find_sites` ``(model, types, include, exclude)``, validated:
    non-empty, no duplicates, every one a supported type, and ``model`` has no SSF yet."""
    if find_ssf_sites(model):
        raise ValueError("model already has SSF sites; fold it (or use the plain backbone) first")
    names = find_sites(model, types=types, include=include, exclude=exclude) if sites is None \
        else list(sites)
    if not names:
        raise ValueError("no SSF site selected (check sites / types / include / exclude)")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate SSF sites in {names}")
    for name in names:
        channel_dim(model.get_submodule(name))  # raises TypeError for unsupported modules
    return names


def inject_ssf(
    model: nn.Module, sites: Sequence[str] | None = None, *, generator: torch.Generator | None,
    types: Sequence[type[nn.Module]] = DEFAULT_SITE_TYPES, include: Sequence[str] | None = None,
    exclude: Sequence[str] = (), std: float = 0.02, freeze: bool = False,
    trainable: Sequence[str] = (),
) -> nn.Module:
    """A copy of ``model`` with an SSF after each site; ``model`` itself is not modified.

    Parameters
    ----------
    model : nn.Module
        Any torch model.
    sites : sequence of str, optional
        Qualified module names to follow with SSF; ``None`` selects them with :func:`find_sites`
        (``types``, ``include``, ``exclude``).
    generator : torch.Generator or None
        Draws ``γ ~ N(1, std²)`` then ``β ~ N(0, std²)`` site by site, in ``sites`` order. ``None``
        initialises every SSF to the identity.
    freeze : bool
        Set ``requires_grad=False`` on every parameter except the SSF ones and those whose name
        matches a ``trainable`` glob (e.g. ``"head.*"``), the SSF fine-tuning recipe.

    Returns
    -------
    nn.Module
        The copy, with each site ``s`` replaced by ``SSFSite(base=s, ssf=SSF(C))``.
    """
    out = copy.deepcopy(model)
    for name in resolve_sites(out, sites, types, include, exclude):
        base = out.get_submodule(name)
        c, dim = channel_dim(base)
        ssf = SSF(c, dim, generator=generator, std=std, **_tensor_kwargs(base))
        out.set_submodule(name, SSFSite(base, ssf))
    if freeze:
        keep = {id(p) for _, p in ssf_named_parameters(out)}
        for pname, p in out.named_parameters():
            p.requires_grad_(id(p) in keep or any(fnmatch.fnmatchcase(pname, t) for t in trainable))
    return out


def ssf_named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` for every SSF ``scale`` / ``shift`` in ``model`` (pool sites included)."""
    for site in find_ssf_sites(model):
        module = model.get_submodule(site)
        sub = module.ssf if isinstance(module, SSFSite) else module
        for pname in ("scale", "shift"):
            suffix = f"ssf.{pname}" if isinstance(module, SSFSite) else pname
            yield f"{site}.{suffix}", getattr(sub, pname)


def fold_site(base: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> nn.Module:
    """A copy of ``base`` whose output equals ``γ ⊙ base(x) + β``.

    Linear / Conv: ``W' = γ[:, None, …] W``, ``b' = γ ⊙ b + β`` (``b = 0`` if absent; a bias is
    added). LayerNorm: ``w' = γ ⊙ w``, ``b' = γ ⊙ b + β`` (``w = 1``, ``b = 0`` if absent; the affine
    is added). ``scale``, ``shift``: ``(C,)``. New parameters keep ``base.weight``'s ``requires_grad``
    (``False`` when the norm had no affine).
    """
    out = copy.deepcopy(base)
    c, _ = channel_dim(out)
    if scale.shape != (c,) or shift.shape != (c,):
        raise ValueError(f"scale and shift must have shape ({c},), got {tuple(scale.shape)}, "
                         f"{tuple(shift.shape)}")
    kw = _tensor_kwargs(out) or {"dtype": scale.dtype, "device": scale.device}
    # LayerNorm parameters have the normalized shape (…, C); γ, β broadcast along the last dim.
    affine_shape = tuple(out.normalized_shape) if isinstance(out, nn.LayerNorm) else (c,)
    grad = out.weight.requires_grad if out.weight is not None else False
    with torch.no_grad():
        g = scale.detach().to(**kw)
        w = out.weight if out.weight is not None else torch.ones(affine_shape, **kw)
        b = out.bias if out.bias is not None else torch.zeros(affine_shape, **kw)
        if isinstance(out, nn.LayerNorm):
            out.weight = nn.Parameter(w * g, requires_grad=grad)
            out.elementwise_affine = True
        else:  # Linear (C, in) / Conv (C, in/groups, k…): scale output channel c by γ_c
            out.weight = nn.Parameter(w * g.reshape((-1,) + (1,) * (w.ndim - 1)), requires_grad=grad)
        out.bias = nn.Parameter(b * g + shift.detach().to(**kw), requires_grad=grad)
    return out


def fold(model: nn.Module) -> nn.Module:
    """A plain model (no SSF modules) with the same outputs; ``model`` itself is not modified.

    Every :class:`SSFSite` ``(base, γ, β)`` is replaced by :func:`fold_site` ``(base, γ, β)``, so the
    result has the original architecture and parameter names. Per-instance pool sites cannot be
    folded (the SSF differs per input): a model with pool sites raises ``ValueError``.

    Example
    -------
    >>> lin = nn.Linear(2, 2)
    >>> with torch.no_grad():
    ...     _ = lin.weight.copy_(torch.eye(2)); _ = lin.bias.zero_()
    >>> m = inject_ssf(nn.Sequential(lin), generator=None)
    >>> with torch.no_grad():
    ...     _ = m[0].ssf.scale.copy_(torch.tensor([2., 3.])); _ = m[0].ssf.shift.fill_(1.)
    >>> f = fold(m)
    >>> f[0].weight.tolist(), f[0].bias.tolist()
    ([[2.0, 0.0], [0.0, 3.0]], [1.0, 1.0])
    """
    out = copy.deepcopy(model)
    for name in find_ssf_sites(out):
        site = out.get_submodule(name)
        if not isinstance(site, SSFSite):
            raise ValueError(f"{name}: per-instance pool SSF cannot be folded into a single model")
        folded = fold_site(site.base, site.ssf.scale, site.ssf.shift)
        if name == "":
            return folded
        out.set_submodule(name, folded)
    return out
