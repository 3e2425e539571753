"""Merge-method registry, mergekit style: each method declares its parameters once.

A method has **per-model** parameters (``models[i].parameters`` in the YAML, e.g. ``weight``,
``density``) and **global** ones (``parameters``, e.g. ``normalize``, ``lambda``). As in mergekit,
a per-model parameter may also be given in the global block, where it is the fallback for models
that do not set it (per-model values take precedence). The same declarations validate configs
(a typo raises :class:`~fedagg.errors.ConfigError` naming ``models[i].parameters.<key>`` or
``parameters.<key>``), fill defaults and render docs (:func:`describe`).

Methods: ``linear``, ``uniform_soup``, ``task_arithmetic``, ``ties`` (mergekit semantics),
``fisher`` (Fisher merging), ``greedy_soup`` and ``learned_soup`` (model soups; they need held-out
data as an ``evaluate`` / ``loss_fn`` callable).

Example (what ``python -m simulations.merge config.yaml`` does with a loaded config)
------------------------------------------------------------------------------------
>>> import numpy as np
>>> base = {"w": np.zeros(2)}
>>> ms = [{"w": np.array([1.0, -1.0])}, {"w": np.array([3.0, 1.0])}]
>>> per_model = [{"weight": 1.0}, {"weight": 0.5}]
>>> merge("task_arithmetic", ms, per_model, {"lambda": 2.0}, base=base)["w"]
array([ 5., -1.])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from fedagg.errors import ConfigError
from fedagg.merging._tensors import Array, StateDict
from fedagg.merging.arithmetic import task_arithmetic, ties
from fedagg.merging.fisher_merging import fisher_merge
from fedagg.merging.soups import greedy_soup, learned_soup, linear, uniform_soup
from fedagg.registry import Entry, Param, Registry

__all__ = ["MERGE_METHODS", "MergeMethod", "Merger", "build", "describe", "merge", "names", "spec"]


@dataclasses.dataclass(frozen=True)
class MergeMethod:
    """Declaration of a merge method: parameters, requirements and the function that runs it.

    ``run(models, per_model, params, base=, fishers=, evaluate=, loss_fn=)`` receives validated
    per-model parameter dicts (one per model, defaults filled) and validated global parameters.
    """

    name: str
    run: Callable[..., dict[str, Array]]
    per_model: tuple[Param, ...] = ()
    global_params: tuple[Param, ...] = ()
    needs_base: bool = False
    needs_fishers: bool = False
    needs: tuple[str, ...] = ()  # "evaluate" and/or "loss_fn"
    doc: str = ""

    def per_model_param(self, name: str) -> Param | None:
        return next((p for p in self.per_model if p.name == name), None)


@dataclasses.dataclass(frozen=True)
class Merger:
    """A merge method bound to validated global parameters (what :func:`build` returns).

    ``catch_all`` holds per-model parameters given in the global block (fallbacks).
    """

    method: MergeMethod
    params: dict[str, Any]
    catch_all: dict[str, Any]

    def __call__(
        self,
        models: Sequence[StateDict],
        per_model_params: Sequence[Mapping[str, Any]] | None = None,
        *,
        base: StateDict | None = None,
        fishers: Sequence[StateDict] | None = None,
        evaluate: Callable[[dict[str, Array]], float] | None = None,
        loss_fn: Callable[..., torch.Tensor] | None = None,
    ) -> dict[str, Array]:
        m = self.method
        if not models:
            raise ConfigError("models", "at least one model is required")
        if per_model_params is None:
            per_model_params = [{} for _ in models]
        if len(per_model_params) != len(models):
            raise ConfigError(
                "models", f"{len(per_model_params)} parameter blocks for {len(models)} models"
            )
        checker = Entry(m.name, _no_factory, m.per_model)
        per_model = [
            checker.resolve({**self.catch_all, **dict(p)}, where=f"models[{i}].parameters")
            for i, p in enumerate(per_model_params)
        ]
        if m.needs_base and base is None:
            raise ConfigError("base_model", f"required by {m.name!r}")
        if not m.needs_base and base is not None:
            raise ConfigError("base_model", f"not used by {m.name!r}")
        if m.needs_fishers and fishers is None:
            raise ConfigError("fishers", f"{m.name!r} needs one Fisher per model")
        if not m.needs_fishers and fishers is not None:
            raise ValueError(f"{m.name!r} does not use Fishers")
        for need, value in (("evaluate", evaluate), ("loss_fn", loss_fn)):
            if need in m.needs and value is None:
                raise ConfigError(
                    "merge_method", f"{m.name!r} needs held-out data (a {need} function)"
                )
        return m.run(
            models, per_model, self.params,
            base=base, fishers=fishers, evaluate=evaluate, loss_fn=loss_fn,
        )


def _no_factory(**_: Any) -> None:  # Entry wants a factory; per-model checks never call it
    return None


MERGE_METHODS: Registry[Merger] = Registry("merge_method")
_SPECS: dict[str, MergeMethod] = {}


def _add(method: MergeMethod) -> None:
    def factory(**params: Any) -> Merger:
        return Merger(method, dict(params), {})

    MERGE_METHODS.add(method.name, factory, params=method.global_params, doc=method.doc)
    _SPECS[method.name] = method


def names() -> list[str]:
    """Registered merge-method names, sorted."""
    return MERGE_METHODS.names()


def spec(name: str) -> MergeMethod:
    """The declaration of method ``name``; ConfigError on ``merge_method`` listing the names."""
    MERGE_METHODS.entry(name, field="merge_method")
    return _SPECS[name]


def build(name: str, /, **params: Any) -> Merger:
    """Validate global ``params`` (per-model ones allowed as fallbacks) and bind them.

    Raises ConfigError naming ``merge_method`` or ``parameters.<key>``.
    """
    method = spec(name)
    declared = {p.name for p in method.global_params}
    catch_all: dict[str, Any] = {}
    global_params: dict[str, Any] = {}
    for key, value in params.items():
        per_model = method.per_model_param(key)
        if key in declared:
            global_params[key] = value
        elif per_model is not None:
            catch_all[key] = per_model.check(value, "parameters")
        else:
            allowed = sorted(declared | {p.name for p in method.per_model}) or ["(none)"]
            raise ConfigError(
                f"parameters.{key}",
                f"unknown parameter for {name!r}; allowed: {', '.join(allowed)}",
            )
    entry = MERGE_METHODS.entry(name, field="merge_method")
    resolved = entry.resolve(global_params, where="parameters")
    return Merger(method, resolved, catch_all)


def merge(
    method_name: str,
    models: Sequence[StateDict],
    per_model_params: Sequence[Mapping[str, Any]],
    global_params: Mapping[str, Any],
    base: StateDict | None = None,
    fishers: Sequence[StateDict] | None = None,
    *,
    evaluate: Callable[[dict[str, Array]], float] | None = None,
    loss_fn: Callable[..., torch.Tensor] | None = None,
) -> dict[str, Array]:
    """Validate a mergekit-style config and run the method.

    Parameters
    ----------
    method_name : registry key (``merge_method`` in the YAML); see :func:`names`.
    models : K dicts ``{name: array}`` (numpy or torch); the base model is *not* among them.
    per_model_params : K dicts, ``models[i].parameters`` (e.g. ``{"weight": 0.5}``).
    global_params : the ``parameters`` block (e.g. ``{"normalize": True, "lambda": 1.0}``).
    base : the ``base_model`` state dict (task_arithmetic, ties).
    fishers : K Fisher dicts (fisher).
    evaluate : held-out score ``params -> float`` (greedy_soup).
    loss_fn : held-out loss ``params -> scalar tensor`` (learned_soup).

    Returns
    -------
    The merged dict, of the kind of ``models[0]`` (of ``base`` for task-vector methods).
    """
    return build(method_name, **dict(global_params))(
        models, per_model_params, base=base, fishers=fishers, evaluate=evaluate, loss_fn=loss_fn
    )


def describe(name: str) -> str:
    """Docs/``--help`` text for method ``name``: one line each for global and per-model params."""
    m = spec(name)
    lines = [f"{m.name}: {m.doc}"]
    needs = (["base_model"] if m.needs_base else []) + (["fishers"] if m.needs_fishers else [])
    needs += list(m.needs)
    if needs:
        lines.append(f"  needs: {', '.join(needs)}")
    for title, params in (("parameters (global)", m.global_params), ("per-model", m.per_model)):
        if params:
            lines.append(f"  {title}:")
            lines += [f"    {p.describe()}" for p in params]
    return "\n".join(lines)


# --------------------------------------------------------------------------- declarations

_WEIGHT = Param("weight", float, doc="weight w_i of this model")
_NORMALIZE_DOC = "divide by the sum of the weights"


def _weights(per_model: list[dict[str, Any]]) -> list[float]:
    return [p["weight"] for p in per_model]


def _run_linear(models, per_model, params, **_: Any):
    return linear(models, _weights(per_model), normalize=params["normalize"])


def _run_uniform(models, per_model, params, **_: Any):
    weights = _weights(per_model)
    if not any(w > 0 for w in weights):
        raise ConfigError("models", "uniform_soup needs at least one positive weight")
    return uniform_soup(models, None if len(set(weights)) == 1 else weights)


def _run_task_arithmetic(models, per_model, params, *, base, **_: Any):
    return task_arithmetic(
        base, models, _weights(per_model), lambda_=params["lambda"], normalize=params["normalize"]
    )


def _run_ties(models, per_model, params, *, base, **_: Any):
    return ties(
        base, models, _weights(per_model), [p["density"] for p in per_model],
        lambda_=params["lambda"], normalize=params["normalize"],
    )


def _run_fisher(models, per_model, params, *, fishers, **_: Any):
    if len(fishers) != len(models):
        raise ConfigError("fishers", f"{len(fishers)} Fishers for {len(models)} models")
    weights = _weights(per_model)
    if not any(w > 0 for w in weights):
        raise ConfigError("models", "fisher needs at least one positive weight")
    return fisher_merge(
        models, fishers, weights,
        normalize=params["normalize"], floor=params["floor"], favor_target=params["favor_target"],
    )


def _run_greedy(models, per_model, params, *, evaluate, **_: Any):
    return greedy_soup(models, evaluate, strict=params["strict"]).soup


def _run_learned(models, per_model, params, *, loss_fn, **_: Any):
    return learned_soup(models, loss_fn, **params).soup


_LAMBDA = Param("lambda", float, 1.0, "scale λ of the merged task vector")
# mergekit stores its sign masks as int8 when asked; it saves memory and changes no number.
_INT8_MASK = Param("int8_mask", bool, False, "accepted for mergekit configs; no effect here")

for _method in (
    MergeMethod(
        "linear", _run_linear, per_model=(_WEIGHT,),
        global_params=(Param("normalize", bool, True, _NORMALIZE_DOC),),
        doc="Weighted average Σ w_i θ_i / Σ w_i (mergekit linear; Wortsman et al. 2022).",
    ),
    MergeMethod(
        "uniform_soup", _run_uniform,
        per_model=(Param("weight", float, 1.0, "soup weight (≥ 0)", low=0.0),),
        doc="Uniform soup (1/K) Σ θ_i, or weighted by per-model weights (arXiv 2203.05482).",
    ),
    MergeMethod(
        "task_arithmetic", _run_task_arithmetic, per_model=(_WEIGHT,),
        global_params=(_LAMBDA, Param("normalize", bool, False, _NORMALIZE_DOC), _INT8_MASK),
        needs_base=True,
        doc="θ_base + λ Σ w_i (θ_i − θ_base) (mergekit task_arithmetic; arXiv 2212.04089).",
    ),
    MergeMethod(
        "ties", _run_ties,
        per_model=(
            _WEIGHT,
            Param("density", float, 1.0, "fraction of task-vector entries kept (by magnitude)",
                  low=0.0, high=1.0, low_open=True),
        ),
        global_params=(_LAMBDA, Param("normalize", bool, True, _NORMALIZE_DOC), _INT8_MASK),
        needs_base=True,
        doc="Trim, elect sign, disjoint merge (mergekit ties; arXiv 2306.01708).",
    ),
    MergeMethod(
        "fisher", _run_fisher,
        per_model=(Param("weight", float, 1.0, "coefficient λ_i (≥ 0)", low=0.0),),
        global_params=(
            Param("normalize", bool, True, "divide λ_i by the global L2 norm of F_i"),
            Param("floor", float, 1e-6, "Fisher floor max(F, floor)", low=0.0),
            Param("favor_target", bool, True,
                  "floor only model 0's Fisher (fallback to model 0 where all F≈0)"),
        ),
        needs_fishers=True,
        doc="Fisher-weighted average Σ λ'_i F_i θ_i / Σ λ'_i F_i (arXiv 2111.09832).",
    ),
    MergeMethod(
        "greedy_soup", _run_greedy,
        global_params=(
            Param("strict", bool, True, "accept on > (True, code) or ≥ (False, paper)"),
        ),
        needs=("evaluate",),
        doc="Greedy soup: add ingredients by held-out score iff the soup improves "
        "(arXiv 2203.05482).",
    ),
    MergeMethod(
        "learned_soup", _run_learned,
        global_params=(
            Param("granularity", str, "model", "one α per model or per tensor",
                  choices=("model", "tensor")),
            Param("steps", int, 100, "AdamW steps on the held-out loss", low=0),
            Param("lr", float, 0.05, "AdamW learning rate", low=0.0, low_open=True),
            Param("weight_decay", float, 0.0, "AdamW weight decay", low=0.0),
            Param("learn_temperature", bool, False, "also learn a logit scale β"),
        ),
        needs=("loss_fn",),
        doc="Softmax mixing coefficients trained on held-out data (arXiv 2203.05482 App. I).",
    ),
):
    _add(_method)
