"""Model kinds over a frozen pretrained backbone: ``fedins``, ``ssf``, ``head-only``, ``finetune``.

Each kind loads a backbone with :func:`fedagg.models.backbone.load_backbone` (``model_args.backbone``,
default the project's pretrained ``mnist1d-transformer``) and decides what trains and what travels.
What travels is ``federated_state_dict()`` (see :func:`fedagg.training.federated_state`): tensors that
share storage with the model, so a client loads the broadcast in place and the frozen backbone never
leaves the process.

========== ============================================== =========================================
kind       trains (and sends)                             per-round payload, default backbone
========== ============================================== =========================================
fedins     SSF pools at every site, keys, head pool       N·(2·1,280 + 64 + 650) = 81,850 (N = 25)
           (FedIns, Feng et al., arXiv 2308.06051)
ssf        one SSF (γ, β) at every site + the head        2·1,280 + 650 = 3,210
           (SSF, Lian et al., arXiv 2210.08823)
head-only  the classifier head                            650
finetune   everything (full fine-tuning from pretrained)  68,810
========== ============================================== =========================================

(numbers of float32 scalars for the 68,810-parameter ``mnist1d-transformer``, whose 14 SSF sites
have 1,280 channels in total). The frozen parts stay in eval mode.

Example
-------
>>> from fedagg.models import build_model
>>> m = build_model("ssf", (40,), 10, seed=0, params={"backbone": "mnist1d-transformer-quick"})
>>> sorted(m.federated_state_dict())[:2]
['net.blocks.0.attn.proj.ssf.scale', 'net.blocks.0.attn.proj.ssf.shift']
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fedagg.errors import ConfigError
from fedagg.models import MODELS
from fedagg.models.backbone import Backbone, load_backbone
from fedagg.registry import Param
from fedagg.ssf.layers import inject_ssf, ssf_named_parameters
from fedagg.ssf.pool import FeatureFn, SSFPoolModel

__all__ = [
    "BACKBONE_PARAMS",
    "FedInsModel",
    "FrozenBackboneModel",
    "build_fedins_model",
    "build_finetune_model",
    "build_head_only_model",
    "build_ssf_model",
    "federated_sizes",
    "frozen_state",
]

BACKBONE_PARAMS: tuple[Param, ...] = (
    Param("backbone", str, "mnist1d-transformer",
          "registered backbone (fedagg.models.backbone), or 'pkg.module:name'"),
    Param("weights", str, None, "safetensors state_dict loaded into the backbone instead of its "
          "registered weights", nullable=True),
)
_SITES = Param("sites", list, None, "glob patterns of the modules followed by SSF, e.g. "
               "['blocks.*.mlp.fc1'] (null: every Linear/LayerNorm/Conv except the head)",
               nullable=True)


class FedInsModel(SSFPoolModel):
    """:class:`~fedagg.ssf.pool.SSFPoolModel` whose federated state is exactly its pool tensors
    (``net.<site>.scale|shift`` ``(N, C)``, ``keys`` ``(N, D)``, ``head_weight`` ``(N, K, D)``,
    ``head_bias`` ``(N, K)``), as views of the parameters."""

    def federated_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.named_pool_parameters()}


class FrozenBackboneModel(nn.Module):
    """``net`` with only the parameters matching ``trainable`` (exact names or globs) trainable.

    ``forward(x) = net(x)``; ``features(x) = feature_fn(net, x)``; ``federated_state_dict()`` returns
    the trainable parameters (names ``net.<name>``, views). ``net`` stays in eval mode.
    """

    def __init__(self, net: nn.Module, trainable: Sequence[str], feature_fn: FeatureFn) -> None:
        super().__init__()
        self.net = net
        self.feature_fn = feature_fn
        names = [n for n, _ in net.named_parameters()
                 if any(n == t or fnmatch.fnmatchcase(n, t) for t in trainable)]
        if not names:
            raise ConfigError("model_args", f"no parameter matches {list(trainable)}")
        keep = set(names)
        for n, p in net.named_parameters():
            p.requires_grad_(n in keep)
        self._federated: tuple[str, ...] = tuple(f"net.{n}" for n in names)
        self.net.eval()

    def train(self, mode: bool = True) -> FrozenBackboneModel:
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_fn(self.net, x)

    def federated_state_dict(self) -> dict[str, torch.Tensor]:
        params = dict(self.named_parameters())
        return {name: params[name].detach() for name in self._federated}


def _load(input_shape: tuple[int, ...], num_classes: int, backbone: str,
          weights: str | None) -> Backbone:
    return load_backbone(backbone, input_shape=input_shape, num_classes=num_classes, weights=weights)


def _need_head(bb: Backbone, kind: str) -> str:
    if bb.head is None:
        raise ConfigError("model_args.backbone", f"model {kind!r} needs a backbone with a "
                          f"classifier head (backbone {bb.name!r} was registered with head=None)")
    return bb.head


@MODELS.register(
    "fedins",
    params=[
        *BACKBONE_PARAMS,
        Param("pool_size", int, 25, "N: slots per SSF pool, keys and heads (reference 25)", low=1),
        Param("top_k", int, 3, "k: slots selected per instance (reference 3)", low=1),
        _SITES,
        Param("head_init", str, "backbone", "head pool init: copies of the pretrained head, or "
              "the reference's kaiming_normal", choices=("backbone", "reference")),
        Param("selection", str, "instance", "per-instance slot means, or the 2023 reference's "
              "batch average", choices=("instance", "batch")),
    ],
    doc="FedIns: frozen pretrained backbone + instance-adaptive SSF pool (only the pool travels).",
)
def build_fedins_model(
    input_shape: tuple[int, ...], num_classes: int, generator: torch.Generator, *,
    backbone: str = "mnist1d-transformer", weights: str | None = None, pool_size: int = 25,
    top_k: int = 3, sites: list[str] | None = None, head_init: str = "backbone",
    selection: str = "instance",
) -> FedInsModel:
    """:class:`FedInsModel` over the frozen backbone; the pools are drawn from ``generator``."""
    if top_k > pool_size:
        raise ConfigError("model_args.top_k", f"must be <= pool_size={pool_size}, got {top_k}")
    bb = _load(input_shape, num_classes, backbone, weights)
    kwargs: dict[str, Any] = {}
    if bb.head is None:
        with torch.no_grad():
            dim = bb.feature_fn(bb.module, torch.zeros(1, *input_shape)).shape[-1]
        kwargs = {"num_classes": num_classes, "feature_dim": int(dim)}
    return FedInsModel(bb.module, bb.feature_fn, pool_size=pool_size, top_k=top_k,
                       generator=generator, head=bb.head, include=sites, head_init=head_init,  # type: ignore[arg-type]
                       selection=selection, **kwargs)  # type: ignore[arg-type]


@MODELS.register(
    "ssf",
    params=[*BACKBONE_PARAMS, _SITES,
            Param("train_head", bool, True, "also train (and send) the classifier head")],
    doc="Federated SSF: frozen pretrained backbone + one shared SSF at every site (+ head).",
)
def build_ssf_model(
    input_shape: tuple[int, ...], num_classes: int, generator: torch.Generator, *,
    backbone: str = "mnist1d-transformer", weights: str | None = None,
    sites: list[str] | None = None, train_head: bool = True,
) -> FrozenBackboneModel:
    """``inject_ssf`` (γ ~ N(1, .02²), β ~ N(0, .02²) from ``generator``) on the frozen backbone."""
    bb = _load(input_shape, num_classes, backbone, weights)
    head = _need_head(bb, "ssf")
    net = inject_ssf(bb.module, generator=generator, include=sites, exclude=[head, f"{head}.*"])
    trainable = [n for n, _ in ssf_named_parameters(net)]
    if train_head:
        trainable.append(f"{head}.*")
    return FrozenBackboneModel(net, trainable, bb.feature_fn)


@MODELS.register(
    "head-only", params=list(BACKBONE_PARAMS),
    doc="Frozen pretrained backbone; only the classifier head trains and travels.",
)
def build_head_only_model(
    input_shape: tuple[int, ...], num_classes: int, generator: torch.Generator, *,
    backbone: str = "mnist1d-transformer", weights: str | None = None,
) -> FrozenBackboneModel:
    del generator  # nothing random: the head starts from the pretrained one
    bb = _load(input_shape, num_classes, backbone, weights)
    return FrozenBackboneModel(bb.module, [f"{_need_head(bb, 'head-only')}.*"], bb.feature_fn)


@MODELS.register(
    "finetune", params=list(BACKBONE_PARAMS),
    doc="Full fine-tuning: the pretrained backbone, every parameter trains and travels.",
)
def build_finetune_model(
    input_shape: tuple[int, ...], num_classes: int, generator: torch.Generator, *,
    backbone: str = "mnist1d-transformer", weights: str | None = None,
) -> nn.Module:
    del generator
    bb = _load(input_shape, num_classes, backbone, weights)
    _need_head(bb, "finetune")
    return bb.module.requires_grad_(True)


def frozen_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every parameter and buffer of ``model`` that is *not* in its federated state
    (empty for a model that sends everything)."""
    from fedagg.training import federated_state

    fed = set(federated_state(model))
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k not in fed}


def federated_sizes(model: nn.Module) -> Mapping[str, int]:
    """Scalars in the federated state vs the whole model: ``{"federated": ..., "total": ...}``."""
    from fedagg.training import federated_state

    fed = sum(v.numel() for v in federated_state(model).values())
    total = sum(v.numel() for v in model.state_dict().values())
    return {"federated": int(fed), "total": int(total)}
