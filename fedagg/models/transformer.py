"""A small pre-norm vision-transformer-style classifier for 1-D signals (MNIST-1D).

Layout, following ViT (Dosovitskiy et al., arXiv 2010.11929) on a 1-D signal of length ``L``:

.. math::

    z_0 &= [c;\\ \\mathrm{Conv1d}_{p,p}(x)^\\top] + E_{pos}
        \\qquad (B, 1 + L/p, d) \\\\
    z'_\\ell &= z_{\\ell-1} + \\mathrm{proj}(\\mathrm{Attn}(\\mathrm{qkv}(\\mathrm{LN}_1(z_{\\ell-1})))) \\\\
    z_\\ell &= z'_\\ell + \\mathrm{fc2}(\\mathrm{GELU}(\\mathrm{fc1}(\\mathrm{LN}_2(z'_\\ell)))) \\\\
    f(x) &= \\mathrm{LN}(z_D)[:, 0] \\ \\text{(class token)} \\quad\\text{or}\\quad
        \\mathrm{mean}_t\\, \\mathrm{LN}(z_D)[:, 1:] \\ \\text{(mean pooling)} \\\\
    \\mathrm{logits} &= \\mathrm{head}(f(x)) \\qquad (B, K)

The patch embedding is a ``Conv1d`` with kernel = stride = ``patch`` (as ViT's patch conv), and every
other affine op is an explicit ``nn.Linear`` (``qkv``, ``proj``, ``fc1``, ``fc2``) or ``nn.LayerNorm``
(``norm1``, ``norm2``, final ``norm``), so SSF (:mod:`fedagg.ssf`) attaches at exactly the sites the SSF
paper uses in a ViT (Lian et al., arXiv 2210.08823, see the site table in ``fedins_merging.md`` §1).
There is no dropout and no drop-path: given its parameters the model is a deterministic function.

Initialisation (timm ViT scheme, drawn from an explicit ``torch.Generator``; torch's global RNG is never
touched because modules are built on the ``meta`` device first): Linear/Conv weights
``trunc_normal(0, 0.02)`` on ``[-2, 2]``, biases 0, LayerNorm weight 1 / bias 0, class token and
positional embedding ``trunc_normal(0, 0.02)``.

Example
-------
>>> import torch
>>> model = build_transformer(generator=torch.Generator().manual_seed(0))
>>> model(torch.zeros(5, 40)).shape, model.features(torch.zeros(5, 40)).shape
(torch.Size([5, 10]), torch.Size([5, 64]))
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from fedagg.errors import ConfigError
from fedagg.models import to_empty
from fedagg.registry import Param

__all__ = [
    "TRANSFORMER_PARAMS",
    "Attention",
    "Block",
    "Mlp",
    "TransformerClassifier",
    "build_transformer",
    "build_transformer_model",
    "init_transformer",
]

Pooling = Literal["cls", "mean"]


class Attention(nn.Module):
    """Multi-head self-attention with explicit ``qkv`` and ``proj`` Linear layers.

    ``(B, T, d) → qkv → (3, B, h, T, d/h) → softmax(q kᵀ / √(d/h)) v → (B, T, d) → proj``.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, h, T, d/h)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    """``fc2(GELU(fc1(x)))``: ``(B, T, d) → (B, T, hidden) → (B, T, d)``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm block: ``z + attn(norm1(z))``, then ``z + mlp(norm2(z))``."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TransformerClassifier(nn.Module):
    """Patch-embedded pre-norm transformer on ``(B, L)`` or ``(B, 1, L)`` signals → ``(B, K)`` logits.

    Parameters
    ----------
    input_dim : int
        Signal length ``L`` (40 for MNIST-1D); must be a multiple of ``patch``.
    num_classes : int
        ``K``.
    dim : int
        Token width ``d``; must be a multiple of ``heads``.
    depth : int
        Number of blocks.
    heads : int
        Attention heads.
    patch : int
        Patch length ``p``; the sequence has ``L / p`` patch tokens (plus the class token).
    mlp_ratio : float
        MLP hidden width is ``round(mlp_ratio · d)``.
    pool : {"cls", "mean"}
        Pre-logit feature: the class token after the final LayerNorm, or the mean of the patch tokens.
    """

    def __init__(
        self, input_dim: int = 40, num_classes: int = 10, dim: int = 64, depth: int = 2,
        heads: int = 4, patch: int = 4, mlp_ratio: float = 2.0, pool: Pooling = "cls",
    ) -> None:
        super().__init__()
        _check_config(input_dim, num_classes, dim, depth, heads, patch, mlp_ratio, pool)
        self.input_dim = input_dim
        self.patch = patch
        self.pool = pool
        self.num_tokens = input_dim // patch
        self.patch_embed = nn.Conv1d(1, dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.empty(1, 1 + self.num_tokens, dim))
        hidden = max(1, round(mlp_ratio * dim))
        self.blocks = nn.Sequential(*(Block(dim, heads, hidden) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-logit feature ``f(x)``: ``(B, L)`` or ``(B, 1, L)`` → ``(B, d)``."""
        tokens = self.patch_embed(x.reshape(len(x), 1, -1)).transpose(1, 2)  # (B, L/p, d)
        cls = self.cls_token.expand(len(x), -1, -1)
        z = self.blocks(torch.cat([cls, tokens], dim=1) + self.pos_embed)
        z = self.norm(z)
        return z[:, 0] if self.pool == "cls" else z[:, 1:].mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K)``."""
        return self.head(self.features(x))


def _check_config(
    input_dim: int, num_classes: int, dim: int, depth: int, heads: int, patch: int,
    mlp_ratio: float, pool: str,
) -> None:
    for field, value in (("input_dim", input_dim), ("num_classes", num_classes), ("dim", dim),
                         ("depth", depth), ("heads", heads), ("patch", patch)):
        if value < 1:
            raise ConfigError(field, f"must be >= 1, got {value}")
    if input_dim % patch:
        raise ConfigError("patch", f"must divide input_dim={input_dim}, got {patch}")
    if dim % heads:
        raise ConfigError("heads", f"must divide dim={dim}, got {heads}")
    if mlp_ratio <= 0:
        raise ConfigError("mlp_ratio", f"must be > 0, got {mlp_ratio}")
    if pool not in ("cls", "mean"):
        raise ConfigError("pool", f"unknown value {pool!r}; allowed: cls, mean")


def init_transformer(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Initialise ``model`` in place with the timm ViT scheme, every draw from ``generator``.

    Linear and Conv weights and every other parameter that is not a LayerNorm affine or a bias
    (class token, positional embedding) ``~ trunc_normal(0, 0.02)`` on ``[-2, 2]``; biases 0;
    LayerNorm weight 1, bias 0. Modules are visited in ``named_modules()`` order, so the draws are a
    function of the architecture and the generator state only.
    """
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if isinstance(module, nn.LayerNorm) and name == "weight":
                    nn.init.ones_(p)
                elif name == "bias":
                    nn.init.zeros_(p)
                else:
                    nn.init.trunc_normal_(p, std=0.02, generator=generator)
    return model


def build_transformer(
    input_dim: int = 40, num_classes: int = 10, dim: int = 64, depth: int = 2, heads: int = 4,
    patch: int = 4, mlp_ratio: float = 2.0, pool: Pooling = "cls",
    generator: torch.Generator | None = None,
) -> TransformerClassifier:
    """A :class:`TransformerClassifier` initialised deterministically from ``generator``.

    The model is built on the ``meta`` device (so torch's global RNG is not touched), materialised on
    the CPU and initialised by :func:`init_transformer`. ``generator=None`` uses a fresh CPU generator
    seeded with 0. With the defaults (d=64, depth 2, 4 heads, patch 4, MLP 128) the model has 68,810
    parameters.
    """
    with torch.device("meta"):
        model = TransformerClassifier(input_dim, num_classes, dim, depth, heads, patch, mlp_ratio, pool)
    model = to_empty(model, "cpu")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    init_transformer(model, generator)
    return model


TRANSFORMER_PARAMS: tuple[Param, ...] = (
    Param("dim", int, 64, "token width d (a multiple of heads)", low=1),
    Param("depth", int, 2, "number of pre-norm blocks", low=1),
    Param("heads", int, 4, "attention heads", low=1),
    Param("patch", int, 4, "patch length (must divide the input length)", low=1),
    Param("mlp_ratio", float, 2.0, "MLP hidden width / d", low=0, low_open=True),
    Param("pool", str, "cls", "pre-logit feature: class token or mean of patch tokens",
          choices=("cls", "mean")),
)
"""Declared parameters for registering :func:`build_transformer_model` in ``fedagg.models.MODELS``."""


def build_transformer_model(
    input_shape: tuple[int, ...], num_classes: int, generator: torch.Generator, **params: Any,
) -> TransformerClassifier:
    """Registry adapter: ``(input_shape, num_classes, generator, **params)`` → transformer.

    ``input_shape`` is ``(L,)`` or ``(1, L)``; ``params`` are those of :data:`TRANSFORMER_PARAMS`.
    """
    length = 1
    for s in input_shape:
        length *= int(s)
    return build_transformer(length, num_classes, generator=generator, **params)
