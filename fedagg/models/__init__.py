"""Small reference models, built deterministically from a ``torch.Generator``.

Registered in :data:`MODELS`; ``build_model(name, input_shape, num_classes, seed, **params)``.
Models are constructed on the ``meta`` device and then initialised with PyTorch's default scheme
(Kaiming-uniform weights, fan-in uniform biases) drawn from an explicit generator, so building a model
never touches torch's global RNG. No dropout anywhere: local training is deterministic given the
client's generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from fedagg.registry import Param, Registry
from fedagg.rng import torch_generator

MODELS: Registry[nn.Module] = Registry("model")


def reset_parameters(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Re-initialise every Linear/Conv/LayerNorm of ``model`` in place from ``generator``.

    Same distributions as PyTorch's defaults: weights ``kaiming_uniform_(a=√5)`` (i.e.
    U(±1/√fan_in)), biases U(±1/√fan_in); LayerNorm weight 1, bias 0. Other parameters
    (e.g. positional embeddings) are drawn N(0, 0.02²).
    """
    done: set[int] = set()
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
            done.add(id(module.weight))
            if module.bias is not None:
                fan_in = module.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                nn.init.uniform_(module.bias, -bound, bound, generator=generator)
                done.add(id(module.bias))
        elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
            done.update({id(module.weight), id(module.bias)})
    for p in model.parameters():
        if id(p) not in done:
            nn.init.normal_(p, 0.0, 0.02, generator=generator)
    return model


def to_empty(model: nn.Module, device: str | torch.device = "cpu") -> nn.Module:
    """``model.to_empty(device=device)`` (uninitialised tensors of the same shapes and dtypes) for a
    model built on the ``meta`` device, allocating each tensor with ``torch.empty`` (contiguous, as
    meta-built tensors are) instead of ``torch.empty_like``: on meta tensors the latter runs torch's
    Python reference kernels, whose first call imports sympy (0.3–0.5 s of a process's start-up)."""
    return model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))


def _materialise(make: Callable[[], nn.Module], generator: torch.Generator) -> nn.Module:
    with torch.device("meta"):
        model = make()
    model = to_empty(model, "cpu")
    for buf_name, buf in list(model.named_buffers()):
        buf.zero_()  # no model here has meaningful buffers; keep them defined
        del buf_name
    return reset_parameters(model, generator)


class MLP(nn.Module):
    """``input → [Linear → ReLU] × len(hidden) → Linear(num_classes)`` on flattened inputs."""

    def __init__(self, input_dim: int, num_classes: int, hidden: tuple[int, ...] = (128, 64)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = input_dim
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU()]
            prev = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(prev, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-logit features, ``(B, hidden[-1])``."""
        return self.body(x.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class CNN1D(nn.Module):
    """1-D CNN for MNIST-1D-like signals ``(B, L)``: three strided conv blocks, then a linear head.

    Conv(1→c, k5, s2) → ReLU → Conv(c→c, k3, s2) → ReLU → Conv(c→c, k3, s2) → ReLU → flatten →
    Linear(num_classes). The MNIST-1D paper's CNN is this with c = 25.
    """

    def __init__(self, length: int, num_classes: int, channels: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv1d(1, channels, 5, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
        )
        out_len = length
        for k, s, p in ((5, 2, 1), (3, 2, 1), (3, 2, 1)):
            out_len = (out_len + 2 * p - k) // s + 1
        self.head = nn.Linear(channels * out_len, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened conv features, ``(B, channels · L')``."""
        return self.body(x.reshape(len(x), 1, -1)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _flat_dim(input_shape: tuple[int, ...]) -> int:
    return int(math.prod(input_shape))


@MODELS.register(
    "mlp",
    params=[Param("hidden", list, [128, 64], "hidden layer widths")],
    doc="Multi-layer perceptron on flattened inputs.",
)
def build_mlp(input_shape: tuple[int, ...], num_classes: int, generator: torch.Generator,
              hidden: list[int] | None = None) -> nn.Module:
    dims = tuple(int(h) for h in (hidden if hidden is not None else [128, 64]))
    return _materialise(lambda: MLP(_flat_dim(input_shape), num_classes, dims), generator)


@MODELS.register(
    "cnn",
    params=[Param("channels", int, 32, "channels of every conv layer", low=1)],
    doc="1-D CNN (three strided conv layers + linear head) for MNIST-1D-like signals.",
)
def build_cnn(input_shape: tuple[int, ...], num_classes: int, generator: torch.Generator,
              channels: int = 32) -> nn.Module:
    return _materialise(lambda: CNN1D(_flat_dim(input_shape), num_classes, channels), generator)


def model_names() -> list[str]:
    """Registered model names."""
    return MODELS.names()


def build_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, seed: int,
    params: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Model ``name`` for inputs of ``input_shape``, initialised from ``(seed, "model-init")``."""
    entry = MODELS.entry(name, field="model")
    kwargs = entry.resolve(dict(params or {}), where="model_args")
    gen = torch_generator(seed, "model-init")
    return entry.factory(tuple(input_shape), int(num_classes), gen, **kwargs)


def _register_transformer() -> None:
    from fedagg.models.transformer import TRANSFORMER_PARAMS, build_transformer_model

    MODELS.add("transformer", build_transformer_model, params=TRANSFORMER_PARAMS,
               doc="Small transformer over 1-D signal patches (FedIns backbone; pre-logit `features`).")


_register_transformer()


def _register_pretrained_kinds() -> None:
    # fedins, ssf, head-only, finetune: frozen-backbone model kinds (fedagg/models/fedins.py)
    from fedagg.models import fedins as _fedins  # noqa: F401


_register_pretrained_kinds()
