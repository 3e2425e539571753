"""FedIns SSF pools: key matching, per-instance slot selection, the surrogate loss and a model wrapper.

FedIns (Feng et al., "Towards Instance-adaptive Inference for Federated Learning", ICCV 2023,
arXiv 2308.06051) replaces each SSF vector (:mod:`fedagg.ssf.layers`) by a pool of ``N`` slots and the
classifier by a pool of ``N`` heads, and picks slots per input by matching a query against ``N``
learnable keys. With the frozen backbone's pre-logit feature ``q(x) ∈ R^D`` (computed without SSF):

.. math::

    s_{b,n} &= \\cos(q_b, k_n) = \\frac{q_b^\\top k_n}{\\lVert q_b\\rVert \\lVert k_n\\rVert},
        \\qquad I_b = \\operatorname{top-k}_n\\, s_{b,n} \\\\
    \\gamma^{site}_b &= \\frac1k \\sum_{j \\in I_b} P^{site}_{\\gamma}[j], \\qquad
    \\beta^{site}_b = \\frac1k \\sum_{j \\in I_b} P^{site}_{\\beta}[j] \\\\
    \\mathrm{logits}_b &= \\frac1k \\sum_{j \\in I_b} \\left(W_j f_b + c_j\\right)
        = \\bar W_b f_b + \\bar c_b \\\\
    \\mathcal{L} &= (1-\\lambda)\\, \\mathrm{CE}(\\mathrm{logits}, y)
        + \\lambda \\Big(1 - \\frac1B \\sum_b \\sum_{j \\in I_b} s_{b,j}\\Big)

where ``f_b`` is the pre-logit feature of the backbone run with the adapted SSF of sample ``b``.
The combination is a plain mean over the ``k`` selected slots (similarities are not weights), the
cosine term is **summed over the k selected keys and averaged over the batch** (``reduced_sim``, in
``[-k, k]``; λ = 0.1 in the official code), exactly as in the reference (``fedins_merging.md`` §2.2–2.3).
Top-k is not differentiable: keys get gradient only from the surrogate term; SSF and head slots get
cross-entropy gradient only when selected.

Selection modes (``fedins_merging.md`` §2.2, §8.4):

- ``"instance"`` (default): each sample uses the mean of *its own* top-k slots, a vectorised gather;
  equal to the reference run one instance at a time (its 2025 code, B = 1).
- ``"batch"``: the original 2023 reference behaviour, where ``get_top_ssf`` / ``forward_head`` also
  average over the batch, so every sample of a batch gets the mean of all ``B·k`` selected slots.
  Kept only to reproduce that code; it makes predictions depend on the rest of the batch.

Differences from the official code, all deliberate:

- per-instance selection is the default (above);
- one frozen backbone copy serves both passes: the query pass runs it with every SSF switched off,
  which is what the reference's separate query model (the same pretrained weights) computes;
- the backbone is always in eval mode (no BatchNorm statistics drift, no dropout);
- a batch loss is the mean of the per-instance (B = 1) reference losses (CE and ``reduced_sim`` are
  both batch means), so one step on a batch averages the per-instance gradients instead of taking B
  sequential batch-1 steps as the 2025 reference does; the training loop is the caller's choice;
- ``head_init="backbone"`` (copy the backbone's head into every slot) is an extra option.

Example
-------
>>> keys = torch.tensor([[1., 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, -1]])
>>> m = match_keys(torch.tensor([[2., 1, 0]]), keys, top_k=2)
>>> m.idx.tolist(), round(m.reduced_sim.item(), 6)
([[2, 0]], 1.84311)
>>> pool = torch.tensor([[1., 1], [1.2, .8], [.9, 1.1], [2, 2]], dtype=torch.float64)
>>> select_slots(pool, m.idx).tolist()
[[0.95, 1.05]]
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedagg.errors import ConfigError, unknown_name
from fedagg.ssf.layers import (
    DEFAULT_SITE_TYPES,
    BaseSSFSite,
    _tensor_kwargs,
    channel_dim,
    init_scale_shift,
    resolve_sites,
    ssf_apply,
)

__all__ = [
    "FeatureFn",
    "HeadInput",
    "Match",
    "PoolSSFSite",
    "SSFPoolModel",
    "SelectionMode",
    "fedins_loss",
    "features_method",
    "match_keys",
    "pool_head",
    "resolve_feature_fn",
    "select_slots",
]

SelectionMode = Literal["instance", "batch"]
SELECTION_MODES: tuple[str, ...] = ("instance", "batch")

FeatureFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]
"""``feature_fn(module, x) -> (B, D)``: pre-logit features of ``module`` on the batch ``x``."""


# ----------------------------------------------------------------------------------- pure functions
@dataclasses.dataclass(frozen=True)
class Match:
    """Result of :func:`match_keys`.

    Attributes
    ----------
    idx : (B, k) int64 tensor
        Top-k key indices per sample, by decreasing similarity.
    sim : (B, N) tensor
        Cosine similarities ``s_{b,n}`` (differentiable w.r.t. the keys).
    reduced_sim : () tensor
        ``(1/B) Σ_b Σ_{j∈I_b} s_{b,j}``, in ``[-k, k]`` (differentiable w.r.t. the keys).
    """

    idx: torch.Tensor
    sim: torch.Tensor
    reduced_sim: torch.Tensor


def match_keys(query: torch.Tensor, keys: torch.Tensor, top_k: int) -> Match:
    """Cosine similarity of queries to keys, top-k per query, and FedIns's ``reduced_sim``.

    ``s = normalize(q) normalize(K)ᵀ`` (L2 norms, eps 1e-12), ``I_b = top-k_n s_{b,n}``,
    ``reduced_sim = (1/B) Σ_b Σ_{j∈I_b} s_{b,j}``.

    Parameters
    ----------
    query : (B, D) tensor
        Query features (the frozen backbone's pre-logit features).
    keys : (N, D) tensor
    top_k : int
        ``1 <= k <= N``. Ties are broken by ``torch.topk`` (unspecified order).

    Returns
    -------
    Match
        ``idx (B, k)``, ``sim (B, N)``, ``reduced_sim ()``.

    Example
    -------
    With ``K = [[1,0,0],[0,1,0],[1,1,0],[0,0,-1]]`` and ``q = [2,1,0]``:
    ``sim = [0.894427, 0.447214, 0.948683, 0]``, ``idx = [2, 0]``, ``reduced_sim = 1.843110``.
    """
    if query.ndim != 2 or keys.ndim != 2 or query.shape[1] != keys.shape[1]:
        raise ValueError(f"query (B, D) and keys (N, D) expected, got {tuple(query.shape)} and "
                         f"{tuple(keys.shape)}")
    if not 1 <= top_k <= keys.shape[0]:
        raise ValueError(f"top_k must be in [1, {keys.shape[0]}], got {top_k}")
    sim = F.normalize(query, dim=1) @ F.normalize(keys, dim=1).T
    idx = sim.detach().topk(top_k, dim=1, largest=True, sorted=True).indices
    reduced_sim = sim.gather(1, idx).sum() / query.shape[0]
    return Match(idx=idx, sim=sim, reduced_sim=reduced_sim)


def select_slots(
    pool: torch.Tensor, idx: torch.Tensor, mode: SelectionMode = "instance"
) -> torch.Tensor:
    """Mean of the selected pool slots, per sample (``"instance"``) or over the batch (``"batch"``).

    ``instance``: ``out_b = (1/k) Σ_{j∈I_b} pool[j]``. ``batch`` (the 2023 reference):
    ``out_b = (1/(B·k)) Σ_{b'} Σ_{j∈I_{b'}} pool[j]`` for every ``b``.

    Parameters
    ----------
    pool : (N, *S) tensor
        Slots (``S = (C,)`` for an SSF site, ``(K, D)`` for a head weight).
    idx : (B, k) int64 tensor
        Selected slots per sample.
    mode : {"instance", "batch"}

    Returns
    -------
    (B, *S) tensor
        In ``batch`` mode all ``B`` rows are the same (an expanded view).

    Example
    -------
    ``G = [[1,1],[1.2,.8],[.9,1.1],[2,2]]`` and ``idx = [[2,0],[3,0]]`` give
    ``[[0.95,1.05],[1.5,1.5]]`` per instance and ``[[1.225,1.275]]*2`` batch-averaged.
    """
    per_instance = pool[idx].mean(dim=1)  # (B, k, *S) -> (B, *S)
    if mode == "instance":
        return per_instance
    if mode == "batch":
        return per_instance.mean(dim=0, keepdim=True).expand_as(per_instance)
    raise unknown_name("selection", mode, SELECTION_MODES)


def pool_head(
    features: torch.Tensor, weight_pool: torch.Tensor, bias_pool: torch.Tensor, idx: torch.Tensor,
    mode: SelectionMode = "instance",
) -> torch.Tensor:
    """Logits of the adaptive head: ``logits_b = W̄_b f_b + c̄_b`` with slot means from :func:`select_slots`.

    Because the head is linear this equals the mean of the ``k`` selected heads' logits.

    Parameters
    ----------
    features : (B, D) tensor
    weight_pool : (N, K, D) tensor
    bias_pool : (N, K) tensor
    idx : (B, k) int64 tensor
    mode : {"instance", "batch"}

    Returns
    -------
    (B, K) tensor
    """
    weight = select_slots(weight_pool, idx, mode)  # (B, K, D)
    bias = select_slots(bias_pool, idx, mode)  # (B, K)
    return torch.einsum("bd,bkd->bk", features, weight) + bias


def fedins_loss(
    logits: torch.Tensor, target: torch.Tensor, reduced_sim: torch.Tensor, lam: float = 0.1
) -> torch.Tensor:
    """FedIns training loss ``(1 − λ)·CE(logits, y) + λ·(1 − reduced_sim)``.

    ``CE`` is the batch-mean cross-entropy; ``reduced_sim`` is :attr:`Match.reduced_sim` (sum over the
    k selected cosines, mean over the batch), so the surrogate term lies in ``[λ(1 − k), λ(1 + k)]``.

    Parameters
    ----------
    logits : (B, K) tensor
    target : (B,) int64 tensor
    reduced_sim : () tensor
    lam : float
        λ in ``[0, 1]``; the reference uses 0.1.

    Returns
    -------
    () tensor

    Example
    -------
    ``reduced_sim = 1.843110`` and ``λ = 0.1`` give a surrogate term ``0.1·(1 − 1.843110) = −0.084311``.
    """
    return (1.0 - lam) * F.cross_entropy(logits, target) + lam * (1.0 - reduced_sim)


# ------------------------------------------------------------------------------ backbone adapters
def features_method(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Feature function calling ``module.features(x)`` (the convention of ``fedagg.models``)."""
    return module.features(x)


@dataclasses.dataclass(frozen=True)
class HeadInput:
    """Feature function returning the input of the submodule ``head`` during ``module(x)``.

    Works for any model whose classifier is a module called on the ``(B, D)`` pre-logit feature:
    ``HeadInput("fc")(resnet, x)`` is the pooled feature of a torchvision-style ResNet. The full
    forward (head included) runs; the head's output is discarded.
    """

    head: str

    def __call__(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        target = module.get_submodule(self.head)
        handle = target.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        try:
            module(x)
        finally:
            handle.remove()
        if len(captured) != 1 or captured[0].ndim != 2:
            raise ValueError(f"{self.head!r} must be called once on a (B, D) tensor per forward")
        return captured[0]


def resolve_feature_fn(backbone: nn.Module, feature_fn: FeatureFn | None, head: str | None) -> FeatureFn:
    """The feature function to use: ``feature_fn`` if given, else :func:`features_method` if the
    backbone has a ``features`` *method*, else :class:`HeadInput` ``(head)``."""
    if feature_fn is not None:
        return feature_fn
    # a bound method only: torchvision-style ``features`` submodules (VGG, DenseNet) are conv stacks
    if inspect.ismethod(getattr(backbone, "features", None)):
        return features_method
    if head is not None:
        return HeadInput(head)
    raise ConfigError("feature_fn", "required: the backbone has no features() method and no head")


# ------------------------------------------------------------------------------------- the model
class PoolSSFSite(BaseSSFSite):
    """``base`` followed by a per-instance SSF drawn from a pool of ``N`` slots.

    Parameters ``scale``, ``shift``: ``(N, C)``, each entry ``γ ~ N(1, std²)``, ``β ~ N(0, std²)``
    (the whole scale pool is drawn, then the shift pool). While :attr:`selection` is ``(idx, mode)``
    the forward is ``ssf_apply(base(x), select_slots(scale, idx, mode), select_slots(shift, idx,
    mode))``; while it is ``None`` the site is the identity on ``base``'s output (the query pass).
    """

    def __init__(
        self, base: nn.Module, pool_size: int, *, generator: torch.Generator | None,
        std: float = 0.02,
    ) -> None:
        super().__init__()
        c, self.dim = channel_dim(base)
        kw = _tensor_kwargs(base)
        self.base = base
        self.scale = nn.Parameter(torch.empty(pool_size, c, **kw))
        self.shift = nn.Parameter(torch.empty(pool_size, c, **kw))
        init_scale_shift(self.scale, self.shift, generator, std)
        self.selection: tuple[torch.Tensor, SelectionMode] | None = None

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        y = self.base(*args, **kwargs)
        if self.selection is None:
            return y
        idx, mode = self.selection
        return ssf_apply(y, select_slots(self.scale, idx, mode), select_slots(self.shift, idx, mode),
                         self.dim)

    def extra_repr(self) -> str:
        return f"pool={tuple(self.scale.shape)}, dim={self.dim}"


class SSFPoolModel(nn.Module):
    """FedIns model: a frozen backbone with SSF pools at chosen sites, keys and a head pool.

    ``forward(x)``: (1) query ``q = feature_fn(backbone, x)`` with every SSF off, under ``no_grad``;
    (2) :func:`match_keys` ``(q, keys, top_k)``; (3) ``f = feature_fn(backbone, x)`` with the selected
    SSF at every site; (4) :func:`pool_head` ``(f, head_weight, head_bias)``. See the module docstring
    for the formulas. The backbone is deep-copied (the argument is not modified), frozen
    (``requires_grad=False``) and always kept in eval mode (BatchNorm statistics never move, dropout
    is off), so with ``selection="instance"`` a sample's prediction does not depend on its batch.

    Parameters
    ----------
    backbone : nn.Module
        Any torch model; its own head, if any, is not used.
    feature_fn : callable ``(module, x) -> (B, D)``, optional
        Pre-logit features; default :func:`resolve_feature_fn` (``module.features`` or the input of
        ``head``). It is called on the SSF-wrapped copy, so it must reach submodules through their
        attributes (``module.blocks(...)``), not read their weights directly.
    sites : sequence of str, optional
        Qualified names of the modules to follow with an SSF pool; ``None`` selects them with
        :func:`~fedagg.ssf.layers.find_sites` (``types``, ``include``, ``exclude``; ``head`` and its
        children are always excluded).
    pool_size : int
        ``N`` (reference 25).
    top_k : int
        ``k`` (reference 3), ``1 <= k <= N``.
    generator : torch.Generator
        Draws, in order: each site's scale pool ``N(1, std²)`` then shift pool ``N(0, std²)`` (sites
        in ``named_modules()`` order), the keys ``trunc_normal(0, 0.02)`` on ``[-2, 2]``, then (with
        ``head_init="reference"``) the head-weight pool. Torch's global RNG is never used.
    head : str or None
        Name of the backbone's classifier ``nn.Linear``; gives the defaults of ``num_classes`` and
        ``feature_dim``, is excluded from the sites, and is copied by ``head_init="backbone"``.
    num_classes, feature_dim : int, optional
        ``K`` and ``D`` when there is no ``head``.
    selection : {"instance", "batch"}
        Per-instance slot means (default) or the 2023 reference's batch average.
    std : float
        SSF init std (0.02).
    head_init : {"reference", "backbone"}
        ``reference``: ``bias = 0`` and ``weight`` (N, K, D) drawn with ``kaiming_normal_`` on the 3-D
        tensor, whose fan-in is ``K·D``, i.e. ``N(0, 2/(K·D))`` as in the official code; ``backbone``:
        every slot is a copy of the backbone's head (useful when the backbone was trained with it).

    Example
    -------
    >>> from fedagg.models.transformer import build_transformer
    >>> net = build_transformer(dim=32, depth=1, heads=2)
    >>> pool = SSFPoolModel(net, pool_size=4, top_k=2, generator=torch.Generator().manual_seed(0))
    >>> pool(torch.randn(3, 40)).shape, sorted(pool.pool_state_dict())[:3]
    (torch.Size([3, 10]), ['head_bias', 'head_weight', 'keys'])
    """

    def __init__(
        self, backbone: nn.Module, feature_fn: FeatureFn | None = None,
        sites: Sequence[str] | None = None, pool_size: int = 25, top_k: int = 3, *,
        generator: torch.Generator, head: str | None = "head", num_classes: int | None = None,
        feature_dim: int | None = None, types: Sequence[type[nn.Module]] = DEFAULT_SITE_TYPES,
        include: Sequence[str] | None = None, exclude: Sequence[str] = (),
        selection: SelectionMode = "instance", std: float = 0.02,
        head_init: Literal["reference", "backbone"] = "reference",
    ) -> None:
        super().__init__()
        if pool_size < 1:
            raise ConfigError("pool_size", f"must be >= 1, got {pool_size}")
        if not 1 <= top_k <= pool_size:
            raise ConfigError("top_k", f"must be in [1, pool_size={pool_size}], got {top_k}")
        if selection not in SELECTION_MODES:
            raise unknown_name("selection", selection, SELECTION_MODES)
        if head_init not in ("reference", "backbone"):
            raise unknown_name("head_init", head_init, ("reference", "backbone"))
        head_module = _head_module(backbone, head)
        if head_module is None and head_init == "backbone":
            raise ConfigError("head_init", "'backbone' needs the backbone's head (head=None given)")
        num_classes = num_classes or (head_module.out_features if head_module is not None else None)
        feature_dim = feature_dim or (head_module.in_features if head_module is not None else None)
        if num_classes is None:
            raise ConfigError("num_classes", "required when head is None")
        if feature_dim is None:
            raise ConfigError("feature_dim", "required when head is None")
        if head_init == "backbone" and head_module is not None and (
                num_classes, feature_dim) != (head_module.out_features, head_module.in_features):
            raise ConfigError("head_init", f"'backbone' copies {head!r} of shape "
                              f"{tuple(head_module.weight.shape)}; num_classes={num_classes} and "
                              f"feature_dim={feature_dim} do not match it")

        self.feature_fn = resolve_feature_fn(backbone, feature_fn, head)
        self.top_k = top_k
        self.selection = selection
        net = copy.deepcopy(backbone).requires_grad_(False).eval()
        if head is not None:
            exclude = (*exclude, head, f"{head}.*")
        self.sites: tuple[str, ...] = tuple(resolve_sites(net, sites, types, include, exclude))
        for name in self.sites:
            net.set_submodule(name, PoolSSFSite(net.get_submodule(name), pool_size,
                                                generator=generator, std=std))
        self.net = net

        kw = _tensor_kwargs(backbone)
        self.keys = nn.Parameter(torch.zeros(pool_size, feature_dim, **kw))
        self.head_weight = nn.Parameter(torch.zeros(pool_size, num_classes, feature_dim, **kw))
        self.head_bias = nn.Parameter(torch.zeros(pool_size, num_classes, **kw))
        with torch.no_grad():
            nn.init.trunc_normal_(self.keys, std=0.02, generator=generator)
            if head_init == "reference":
                nn.init.kaiming_normal_(self.head_weight, generator=generator)
            else:
                assert head_module is not None
                self.head_weight.copy_(head_module.weight.expand_as(self.head_weight))
                if head_module.bias is not None:
                    self.head_bias.copy_(head_module.bias.expand_as(self.head_bias))
        self._pool_names: tuple[str, ...] = tuple(
            [f"net.{s}.{p}" for s in self.sites for p in ("scale", "shift")]
            + ["keys", "head_weight", "head_bias"]
        )

    # ---------------------------------------------------------------------------- mode handling
    def train(self, mode: bool = True) -> SSFPoolModel:
        """Sets the training flag; the frozen backbone stays in eval mode."""
        super().train(mode)
        self.net.eval()
        return self

    @contextlib.contextmanager
    def _adapted(self, idx: torch.Tensor, mode: SelectionMode) -> Iterator[None]:
        sites = [self.net.get_submodule(s) for s in self.sites]
        for site in sites:
            site.selection = (idx, mode)
        try:
            yield
        finally:
            for site in sites:
                site.selection = None

    # ---------------------------------------------------------------------------------- forward
    def query(self, x: torch.Tensor) -> torch.Tensor:
        """``q(x)``: the frozen backbone's pre-logit features without SSF, ``(B, D)``, no grad."""
        with torch.no_grad():
            return self.feature_fn(self.net, x)

    def match(self, x: torch.Tensor) -> Match:
        """:func:`match_keys` of ``q(x)`` against :attr:`keys`."""
        return match_keys(self.query(x), self.keys, self.top_k)

    def forward_with_match(
        self, x: torch.Tensor, selection: SelectionMode | None = None
    ) -> tuple[torch.Tensor, Match]:
        """Logits ``(B, K)`` of the adapted model and the :class:`Match` they used.

        ``selection`` overrides :attr:`selection` for this call.
        """
        return self.forward_from_query(x, self.query(x), selection)

    def forward_from_query(
        self, x: torch.Tensor, query: torch.Tensor, selection: SelectionMode | None = None
    ) -> tuple[torch.Tensor, Match]:
        """:meth:`forward_with_match` given the query features ``q(x)`` ``(B, D)`` (see :meth:`query`).

        Lets a caller compute the frozen query pass once for many parameter sets (batched training).
        """
        mode = selection or self.selection
        if mode not in SELECTION_MODES:
            raise unknown_name("selection", mode, SELECTION_MODES)
        m = match_keys(query, self.keys, self.top_k)
        with self._adapted(m.idx, mode):
            features = self.feature_fn(self.net, x)
        return pool_head(features, self.head_weight, self.head_bias, m.idx, mode), m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K)`` of the instance-adapted model."""
        return self.forward_with_match(x)[0]

    def loss(self, x: torch.Tensor, target: torch.Tensor, lam: float = 0.1) -> torch.Tensor:
        """:func:`fedins_loss` on the batch ``(x, target)``: ``(1−λ)·CE + λ·(1 − reduced_sim)``."""
        logits, m = self.forward_with_match(x)
        return fedins_loss(logits, target, m.reduced_sim, lam)

    # ------------------------------------------------------------------------------- pool state
    def named_pool_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of every trainable / communicated pool tensor, names as in
        ``state_dict()``: ``net.<site>.scale`` / ``.shift`` ``(N, C)``, ``keys`` ``(N, D)``,
        ``head_weight`` ``(N, K, D)``, ``head_bias`` ``(N, K)``."""
        params = dict(self.named_parameters())
        for name in self._pool_names:
            yield name, params[name]

    def pool_parameters(self) -> list[nn.Parameter]:
        """The pool tensors (what an optimizer should train)."""
        return [p for _, p in self.named_pool_parameters()]

    def pool_state_dict(self) -> dict[str, torch.Tensor]:
        """Detached copies of the pool tensors, keyed as in :meth:`named_pool_parameters`."""
        return {name: p.detach().clone() for name, p in self.named_pool_parameters()}

    def load_pool_state_dict(self, state: Mapping[str, torch.Tensor | np.ndarray]) -> None:
        """Copy ``state`` (tensors or numpy arrays, the exact key set of :meth:`pool_state_dict`)
        into the pool tensors in place. Raises ``KeyError`` on missing/unexpected keys and
        ``ValueError`` on a shape mismatch; nothing is written unless every entry is valid."""
        names = set(self._pool_names)
        missing, unexpected = sorted(names - set(state)), sorted(set(state) - names)
        if missing or unexpected:
            raise KeyError(f"pool state mismatch: missing {missing}, unexpected {unexpected}")
        params = dict(self.named_pool_parameters())
        values = {name: torch.as_tensor(state[name]) for name in self._pool_names}
        for name, value in values.items():
            if value.shape != params[name].shape:
                raise ValueError(f"{name}: expected shape {tuple(params[name].shape)}, "
                                 f"got {tuple(value.shape)}")
        with torch.no_grad():
            for name, value in values.items():
                params[name].copy_(value)


def _head_module(backbone: nn.Module, head: str | None) -> nn.Linear | None:
    if head is None:
        return None
    try:
        module = backbone.get_submodule(head)
    except AttributeError:
        raise ConfigError("head", f"the backbone has no submodule {head!r}") from None
    if not isinstance(module, nn.Linear):
        raise ConfigError("head", f"{head!r} must be an nn.Linear, got {type(module).__name__}")
    return module
