"""Pretrained backbones that work offline: the project's MNIST-1D transformer, and your own.

FedIns and its baselines (``fedins_merging.md`` §2.1) start from a backbone pretrained on a source
domain and keep it frozen. This module provides it without any download:

- **Project backbones** are *recipes* (:class:`PretrainRecipe`): an architecture from
  :mod:`fedagg.models.transformer`, a source domain (canonical MNIST-1D generated with its own
  ``data_seed``, so it never overlaps the federated data, which uses ``data_seed = 42``) and an
  optimisation schedule. :func:`load_backbone` returns the cached weights, or pretrains them on the
  fly and caches them as ``<cache_dir()>/backbones/<name>-<hash>.safetensors`` (atomic write; the hash
  covers the whole recipe, so changing it never returns stale weights). Registered:
  ``mnist1d-transformer`` (the default; ``python -m simulations.pretrain`` builds it) and
  ``mnist1d-transformer-quick`` (tiny, a few seconds; for tests and smoke runs).
- **Your own backbone**: any ``nn.Module`` plus a feature function ``(module, x) -> (B, D)``
  registered with :func:`register_backbone` (architecture factory + optional safetensors weights),
  then selected by name in ``model_args.backbone``. A name ``"pkg.module:name"`` imports
  ``pkg.module`` first (so worker processes of the Ray engine register it too).

Pretraining: AdamW (β = (0.9, 0.999)), linear warm-up over 5 % of the steps then cosine decay to 0,
batch ``batch_size`` from permutations of the source training split (:func:`fedagg.training.minibatches`),
cross-entropy; init and batch order from generators keyed by ``(recipe.seed, "backbone-init" |
"backbone-batches")``. It runs with one torch thread so the cached weights are bit-reproducible on a
given machine and torch version.

Example
-------
>>> import torch
>>> from torch import nn
>>> class Tiny(nn.Module):
...     def __init__(self, d_in, k):
...         super().__init__()
...         self.body, self.head = nn.Linear(d_in, 8), nn.Linear(8, k)
...     def features(self, x):
...         return torch.relu(self.body(x))
...     def forward(self, x):
...         return self.head(self.features(x))
>>> _ = register_backbone("doc-tiny", lambda shape, k, gen: Tiny(shape[-1], k), overwrite=True)
>>> bb = load_backbone("doc-tiny", input_shape=(40,), num_classes=10)
>>> bb.feature_fn(bb.module, torch.zeros(2, 40)).shape
torch.Size([2, 8])
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedagg.errors import ConfigError, unknown_name
from fedagg.io import atomic_write_bytes
from fedagg.ssf.pool import FeatureFn, resolve_feature_fn

__all__ = [
    "Backbone",
    "BackboneEntry",
    "PretrainRecipe",
    "PretrainReport",
    "backbone_cache_path",
    "backbone_entry",
    "backbone_names",
    "load_backbone",
    "pretrain",
    "register_backbone",
]

#: ``build(input_shape, num_classes, generator) -> nn.Module`` (an untrained architecture).
BuildFn = Callable[[tuple[int, ...], int, torch.Generator], nn.Module]


@dataclasses.dataclass(frozen=True)
class PretrainRecipe:
    """How a project backbone is pretrained on the source domain.

    ``arch``: keyword arguments of :func:`fedagg.models.transformer.build_transformer`;
    ``num_samples``: canonical MNIST-1D samples generated with ``data_seed`` (80 % train, 20 % test);
    ``steps`` AdamW steps of ``batch_size`` at peak learning rate ``lr`` (warm-up 5 %, cosine decay),
    weight decay ``weight_decay``; ``seed`` keys the init and batch streams.
    """

    arch: Mapping[str, Any]
    steps: int = 1500
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    num_samples: int = 8000
    data_seed: int = 7
    seed: int = 0
    input_shape: tuple[int, ...] = (40,)
    num_classes: int = 10

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["arch"] = dict(sorted(self.arch.items()))
        d["input_shape"] = list(self.input_shape)
        return d

    def digest(self) -> str:
        """12 hex digits of the SHA-256 of the recipe (the cache key)."""
        blob = json.dumps(self.as_dict(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclasses.dataclass(frozen=True)
class BackboneEntry:
    """A registered backbone.

    ``build`` makes the architecture; its weights come from ``recipe`` (project pretraining, cached)
    or ``weights`` (a safetensors file of its ``state_dict``), or stay as built when both are None.
    ``feature_fn`` gives the ``(B, D)`` pre-logit feature (default: the module's ``features``
    method, else the input of ``head``); ``head`` names the classifier ``nn.Linear`` (or None).
    """

    name: str
    build: BuildFn
    feature_fn: FeatureFn | None = None
    head: str | None = "head"
    recipe: PretrainRecipe | None = None
    weights: str | None = None
    doc: str = ""


@dataclasses.dataclass
class Backbone:
    """A loaded backbone: a fresh module (all parameters trainable; callers freeze what they
    need), its feature function, the classifier's name, and where the weights came from."""

    name: str
    module: nn.Module
    feature_fn: FeatureFn
    head: str | None
    source: str


@dataclasses.dataclass(frozen=True)
class PretrainReport:
    """Outcome of :func:`pretrain`: source-domain accuracy in ``[0, 1]`` (train and held-out test),
    final training loss (mean of the last 100 steps), wall time in seconds, number of parameters."""

    source_train_accuracy: float
    source_test_accuracy: float
    final_loss: float
    seconds: float
    parameters: int

    def as_metadata(self) -> dict[str, str]:
        return {k: repr(v) for k, v in dataclasses.asdict(self).items()}


_BACKBONES: dict[str, BackboneEntry] = {}
_STATE_MEMO: dict[tuple[Any, ...], dict[str, torch.Tensor]] = {}


def register_backbone(
    name: str, build: BuildFn, *, feature_fn: FeatureFn | None = None, head: str | None = "head",
    weights: str | os.PathLike[str] | None = None, recipe: PretrainRecipe | None = None,
    doc: str = "", overwrite: bool = False,
) -> BackboneEntry:
    """Register a backbone under ``name`` (see :class:`BackboneEntry`); returns the entry.

    ``build(input_shape, num_classes, generator)`` must return the architecture; with ``weights``
    the file's tensors are loaded into it (``load_state_dict(strict=True)``).
    """
    if name in _BACKBONES and not overwrite:
        raise ValueError(f"backbone {name!r} is already registered (pass overwrite=True)")
    if weights is not None and recipe is not None:
        raise ValueError("give weights or a pretraining recipe, not both")
    entry = BackboneEntry(name, build, feature_fn, head, recipe,
                          None if weights is None else str(weights), doc)
    _BACKBONES[name] = entry
    for key in [k for k in _STATE_MEMO if k[0] == name]:
        del _STATE_MEMO[key]
    return entry


def backbone_names() -> list[str]:
    """Registered backbone names."""
    return sorted(_BACKBONES)


def backbone_entry(name: str, field: str = "model_args.backbone") -> BackboneEntry:
    """The entry for ``name``; ``"pkg.module:name"`` imports ``pkg.module`` first."""
    if ":" in name and name not in _BACKBONES:
        module_name, _, short = name.partition(":")
        try:
            importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(field, f"cannot import {module_name!r} ({exc})") from None
        if short in _BACKBONES and name not in _BACKBONES:
            return _BACKBONES[short]
    if name not in _BACKBONES:
        raise unknown_name(field, name, backbone_names())
    return _BACKBONES[name]


def backbone_cache_path(name: str, recipe: PretrainRecipe) -> Path:
    """``<cache_dir()>/backbones/<name>-<recipe digest>.safetensors``."""
    from fedagg.data import cache_dir

    return cache_dir() / "backbones" / f"{name}-{recipe.digest()}.safetensors"


# ------------------------------------------------------------------------------------ loading
def load_backbone(
    name: str = "mnist1d-transformer", *, input_shape: tuple[int, ...] | None = None,
    num_classes: int | None = None, weights: str | os.PathLike[str] | None = None,
    pretrain_if_missing: bool = True,
) -> Backbone:
    """A fresh module of backbone ``name`` with its pretrained weights, and its feature function.

    Parameters
    ----------
    name : str
        A registered backbone (:func:`backbone_names`), or ``"pkg.module:name"``.
    input_shape, num_classes : optional
        The task's input shape and classes; checked against a project recipe (which is pretrained
        for MNIST-1D, ``(40,)`` and 10) and passed to a user ``build``.
    weights : path, optional
        A safetensors ``state_dict`` to load instead of the entry's own weights.
    pretrain_if_missing : bool
        Project backbones only: pretrain and cache when the cache has no entry (else ConfigError).

    Returns
    -------
    Backbone
        A new module on the CPU in eval mode, ``requires_grad=True`` everywhere.
    """
    entry = backbone_entry(name)
    if entry.recipe is not None:
        r = entry.recipe
        shape = tuple(input_shape) if input_shape is not None else r.input_shape
        classes = int(num_classes) if num_classes is not None else r.num_classes
        if math.prod(shape) != math.prod(r.input_shape) or classes != r.num_classes:
            raise ConfigError(
                "model_args.backbone",
                f"{entry.name!r} is pretrained for inputs {r.input_shape} with {r.num_classes} "
                f"classes; this dataset has {shape} and {classes} (register your own backbone)")
    else:
        if input_shape is None or num_classes is None:
            raise ValueError(f"backbone {entry.name!r} needs input_shape and num_classes")
        shape, classes = tuple(input_shape), int(num_classes)
    from fedagg.rng import torch_generator

    seed = entry.recipe.seed if entry.recipe is not None else 0
    module = entry.build(shape, classes, torch_generator(seed, "backbone-init"))
    src = str(weights) if weights is not None else entry.weights
    where = src if src is not None else (
        str(backbone_cache_path(entry.name, entry.recipe)) if entry.recipe is not None else None)
    stamp = Path(where).stat().st_mtime_ns if where is not None and Path(where).is_file() else None
    key = (entry.name, where, stamp, shape, classes)
    if key not in _STATE_MEMO:
        if src is not None:
            _STATE_MEMO[key] = _read_state(Path(src), "model_args.weights")
        elif entry.recipe is not None:
            path = backbone_cache_path(entry.name, entry.recipe)
            state = None
            if path.is_file():
                try:
                    state = _read_state(path, "model_args.backbone")
                except ConfigError:
                    path.unlink(missing_ok=True)  # corrupt cache entry: pretrain again
            if state is None:
                if not pretrain_if_missing:
                    raise ConfigError("model_args.backbone", f"{path} is not cached; run "
                                      f"python -m simulations.pretrain --backbone {entry.name}")
                pretrained, report = pretrain(entry.recipe)
                save_backbone(path, pretrained, entry.recipe, report)
                state = _read_state(path, "model_args.backbone")
            _STATE_MEMO[key] = state
        else:
            _STATE_MEMO[key] = {}
    state = _STATE_MEMO[key]
    if src is not None:
        source = f"file {src}"
    elif entry.recipe is not None:
        source = f"cache {backbone_cache_path(entry.name, entry.recipe)}"
    else:
        source = "untrained (no weights registered)"
    if state:
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "mismatch"
            raise ConfigError("model_args.weights",
                              f"weights do not fit backbone {entry.name!r}: {first}") from None
    module.eval()
    feature_fn = resolve_feature_fn(module, entry.feature_fn, entry.head)
    return Backbone(entry.name, module, feature_fn, entry.head, source)


def _read_state(path: Path, field: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load as st_load

    if not path.is_file():
        raise ConfigError(field, f"file not found: {path}")
    try:
        return dict(st_load(path.read_bytes()))
    except Exception as exc:  # corrupt or not a safetensors file
        raise ConfigError(field, f"{path} is not a readable safetensors file ({exc})") from None


def save_backbone(path: str | os.PathLike[str], module: nn.Module, recipe: PretrainRecipe | None,
                  report: PretrainReport | None) -> Path:
    """Write ``module.state_dict()`` to ``path`` atomically (temp file + rename), with the recipe
    and the pretraining report as safetensors metadata."""
    from safetensors.torch import save as st_save

    meta: dict[str, str] = {}
    if recipe is not None:
        meta["recipe"] = json.dumps(recipe.as_dict(), sort_keys=True)
    if report is not None:
        meta.update(report.as_metadata())
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    return atomic_write_bytes(path, st_save(state, metadata=meta))


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The safetensors metadata of a cached backbone (recipe and pretraining report)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


# ---------------------------------------------------------------------------------- pretraining
@contextmanager
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _source_data(recipe: PretrainRecipe) -> tuple[torch.Tensor, ...]:
    from fedagg.data import load_central

    central = load_central("mnist1d", num_samples=recipe.num_samples, data_seed=recipe.data_seed)
    return (torch.as_tensor(central.train.x), torch.as_tensor(central.train.y),
            torch.as_tensor(central.test.x), torch.as_tensor(central.test.y))


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + 1024]).argmax(1) == y[i:i + 1024]).sum())
                  for i in range(0, len(y), 1024))
    return correct / max(len(y), 1)


def pretrain(recipe: PretrainRecipe) -> tuple[nn.Module, PretrainReport]:
    """Train the recipe's transformer on the source domain (see the module docstring).

    Returns the trained module (eval mode) and a :class:`PretrainReport` with its source-domain
    accuracy. Deterministic given the recipe (one torch thread; explicit generators).
    """
    import time

    from fedagg.models.transformer import build_transformer
    from fedagg.rng import torch_generator
    from fedagg.training import minibatches

    t0 = time.perf_counter()
    with _one_thread():
        x, y, x_test, y_test = _source_data(recipe)
        model = build_transformer(math.prod(recipe.input_shape), recipe.num_classes,
                                  generator=torch_generator(recipe.seed, "backbone-init"),
                                  **dict(recipe.arch))
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n
                 and "token" not in n]
        no_decay = [p for n, p in model.named_parameters() if not any(p is q for q in decay)]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr)
        warmup = max(1, recipe.steps // 20)
        losses: list[float] = []
        model.train()
        batches = minibatches(len(y), recipe.batch_size, recipe.steps,
                              torch_generator(recipe.seed, "backbone-batches"))
        for step, idx in enumerate(batches):
            scale = (step + 1) / warmup if step < warmup else 0.5 * (
                1 + math.cos(math.pi * (step - warmup) / max(1, recipe.steps - warmup)))
            for group in opt.param_groups:
                group["lr"] = recipe.lr * scale
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        model.eval()
        report = PretrainReport(
            source_train_accuracy=_accuracy(model, x, y),
            source_test_accuracy=_accuracy(model, x_test, y_test),
            final_loss=float(sum(losses[-100:]) / max(1, len(losses[-100:]))),
            seconds=time.perf_counter() - t0,
            parameters=int(sum(p.numel() for p in model.parameters())),
        )
    return model, report


# ------------------------------------------------------------------------------ project entries
def _transformer_build(arch: Mapping[str, Any]) -> BuildFn:
    def build(input_shape: tuple[int, ...], num_classes: int, generator: torch.Generator) -> nn.Module:
        from fedagg.models.transformer import build_transformer

        return build_transformer(math.prod(input_shape), num_classes, generator=generator, **arch)

    return build


DEFAULT_RECIPE = PretrainRecipe(arch={"dim": 64, "depth": 2, "heads": 4, "patch": 4,
                                      "mlp_ratio": 2.0, "pool": "cls"}, steps=1500)
QUICK_RECIPE = PretrainRecipe(arch={"dim": 16, "depth": 1, "heads": 2, "patch": 8,
                                    "mlp_ratio": 2.0, "pool": "cls"},
                              steps=200, batch_size=64, lr=1e-2, num_samples=1000)

register_backbone(
    "mnist1d-transformer", _transformer_build(DEFAULT_RECIPE.arch), recipe=DEFAULT_RECIPE,
    doc="Transformer (d=64, 2 blocks, 4 heads, patch 4; 68,810 parameters) pretrained on "
        "canonical MNIST-1D (data_seed 7, 6,400 training signals).")
register_backbone(
    "mnist1d-transformer-quick", _transformer_build(QUICK_RECIPE.arch), recipe=QUICK_RECIPE,
    doc="Tiny transformer (d=16, 1 block, patch 8) pretrained for 200 steps on 800 signals: "
        "tests and smoke runs only (a few seconds, ~35 % source accuracy).")
