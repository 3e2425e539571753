"""Model soups (Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models
improves accuracy without increasing inference time", ICML 2022, arXiv 2203.05482), as the
official code ``mlfoundations/model-soups`` defines them, plus mergekit's ``linear`` method.

- :func:`uniform_soup` — ``θ = Σ_i θ_i / K`` over every entry, classification head included.
- :func:`linear` — mergekit ``linear``: ``Σ_i w_i θ_i`` divided by ``Σ_i w_i`` if ``normalize``.
- :func:`greedy_soup` — sort ingredients by held-out score (descending), add each one iff the
  uniform soup with it scores better on held-out data; one pass.
- :func:`learned_soup` — softmax mixing coefficients per model (or per tensor and model) trained
  by AdamW on a held-out loss (the reference ``learned_bylayer.py``).

All models share the same init (the soups' premise); see
``../shared/reference/fedins_merging.md`` §5 and §8.3.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch

from fedagg.errors import ConfigError, unknown_name
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
    "GreedySoupResult",
    "LearnedSoupResult",
    "greedy_soup",
    "learned_soup",
    "linear",
    "uniform_soup",
]


def linear(
    models: Sequence[StateDict], weights: Sequence[float], normalize: bool = True
) -> dict[str, Array]:
    r"""Weighted sum of models (mergekit ``linear``; a weighted model soup).

    .. math:: θ = \frac{Σ_i w_i θ_i}{Σ_i w_i}\ \text{if normalize, else}\ Σ_i w_i θ_i.

    Parameters
    ----------
    models : list of K dicts ``{name: array}``, equally keyed and shaped (numpy or torch).
    weights : (K,) floats; with ``normalize`` their sum must not be 0.
    normalize : divide by ``Σ_i w_i`` (mergekit default True).

    Returns
    -------
    dict keyed like ``models[0]``, each entry of the kind/dtype/device of ``models[0]``'s. Where
    every model holds the same value and the effective total weight is exactly 1 (always when
    ``normalize``), that value is returned bit for bit. Non-floating entries (e.g. counters) are
    copied from ``models[0]``.

    >>> m = [{"w": np.array([1.0, 2.0])}, {"w": np.array([3.0, 6.0])}]
    >>> linear(m, [1.0, 3.0])["w"]
    array([2.5, 5. ])
    """
    k = len(models)
    keys = check_keys(models, "models")
    w = scalars(weights, k, "weights")
    total = math.fsum(w)
    if normalize and total == 0:
        raise ValueError(f"weights sum to 0; cannot normalize: {w}")
    coef = 1.0 if normalize else total  # effective weight on a value shared by every model
    out: dict[str, Array] = {}
    for name in keys:
        ref = models[0][name]
        if not is_float(ref):
            out[name] = copy_of(ref)
            continue
        t0 = as_torch(ref)
        ts = gather(models, name, t0.to(compute_dtype(t0)))
        acc = ts[0] * w[0]
        for t, wi in zip(ts[1:], w[1:], strict=True):
            acc = acc + t * wi
        if normalize:
            acc = acc / total
        if coef == 1.0:
            acc = torch.where(all_equal(ts), ts[0], acc)
        out[name] = to_kind(acc, ref)
    return out


def uniform_soup(
    models: Sequence[StateDict], weights: Sequence[float] | None = None
) -> dict[str, Array]:
    r"""Uniform soup ``θ = (1/K) Σ_i θ_i`` (Wortsman et al. 2022, arXiv 2203.05482), or the
    weighted mean ``Σ_i w_i θ_i / Σ_i w_i`` when ``weights`` (≥ 0, not all 0) are given.

    Every floating entry is averaged, classification head included (as the reference); shapes
    ``(…)`` are kept. Non-floating entries are copied from ``models[0]``. Where all models agree the
    result is their common value bit for bit, so ``uniform_soup([θ, θ]) == θ`` exactly.

    >>> uniform_soup([{"w": np.array([0.2])}, {"w": np.array([-0.1])}])["w"]
    array([0.05])
    """
    k = len(models)
    if weights is None:
        return linear(models, [1.0] * k, normalize=True)
    w = scalars(weights, k, "weights")
    if any(v < 0 for v in w) or not any(v > 0 for v in w):
        raise ValueError(f"soup weights must be >= 0 and not all 0, got {w}")
    return linear(models, w, normalize=True)


@dataclasses.dataclass
class GreedySoupResult:
    """Outcome of :func:`greedy_soup`.

    Attributes
    ----------
    soup : the uniform average of the chosen ingredients (kind of ``models[0]``).
    indices : chosen ingredient indices into ``models``, in the order they were added.
    score : held-out score of ``soup`` (``evaluate(soup)``).
    order : the order in which ingredients were visited.
    candidate_scores : ``candidate_scores[j]`` is the held-out score of the candidate soup formed
        when visiting ``order[j]`` (``j = 0``: the first ingredient alone).
    individual_scores : held-out score of every model alone, in input order (None when an explicit
        ``order`` was given, in which case models are not scored one by one).
    """

    soup: dict[str, Array]
    indices: list[int]
    score: float
    order: list[int]
    candidate_scores: list[float]
    individual_scores: list[float] | None


def greedy_soup(
    models: Sequence[StateDict],
    evaluate: Callable[[dict[str, Array]], float],
    order: Sequence[int] | None = None,
    strict: bool = True,
) -> GreedySoupResult:
    r"""Greedy soup (Wortsman et al. 2022, arXiv 2203.05482, Recipe 1; reference ``main.py``).

    1. Score every ingredient alone on held-out data, ``s_i = evaluate(θ_i)``, and visit them in
       order of decreasing score (stable: ties keep input order; NaN scores go last).
    2. ``S = {first}``, ``best = s_first``.
    3. For each next ingredient ``j``: ``c = evaluate(mean(S ∪ {j}))``; if ``c > best``
       (``strict=True``, as in the code) or ``c ≥ best`` (``strict=False``, as the paper's Recipe 1
       is written), then ``S ← S ∪ {j}`` and ``best ← c``.
    4. Return the uniform soup of ``S``.

    The running mean ``s·n/(n+1) + θ/(n+1)`` of the reference equals the batch mean; candidates
    here are built with :func:`uniform_soup`, so the returned soup is bit for bit the one that was
    scored. By construction ``score ≥ max_i s_i`` when ``order`` is None.

    Parameters
    ----------
    models : list of K dicts ``{name: array}`` (numpy or torch), equally keyed and shaped.
    evaluate : ``params -> float``, held-out score, higher is better; it receives fresh dicts
        (copies) of the same kind as ``models``. Called ``K`` times to rank plus ``K − 1`` times
        for candidates.
    order : optional visiting order (indices into ``models``, a permutation or a subset), e.g.
        from precomputed held-out scores; then models are not scored one by one.
    strict : ``>`` (True, reference code) or ``≥`` (False, paper text); matters only on ties.

    Examples
    --------
    Scalar "models" with ``acc(θ) = −|θ|`` (reference §8.3):

    >>> ms = [{"w": np.array(v)} for v in (0.2, -0.3, 1.5, -0.1)]
    >>> r = greedy_soup(ms, lambda p: -abs(float(p["w"])))
    >>> r.indices, float(r.soup["w"])
    ([3, 0], 0.05)
    """
    k = len(models)
    if k == 0:
        raise ValueError("models must not be empty")
    individual: list[float] | None = None
    if order is None:
        scores = [float(evaluate(_copy_dict(m))) for m in models]
        individual = scores
        visit = sorted(range(k), key=lambda i: _descending(scores[i]))
    else:
        visit = [int(i) for i in order]
        if not visit or len(set(visit)) != len(visit) or not all(0 <= i < k for i in visit):
            raise ValueError(f"order must hold distinct indices in [0, {k}), got {list(order)}")

    chosen = [visit[0]]
    soup = uniform_soup([models[visit[0]]])
    best = individual[visit[0]] if individual is not None else float(evaluate(_copy_dict(soup)))
    candidate_scores = [best]
    for j in visit[1:]:
        candidate = uniform_soup([models[i] for i in (*chosen, j)])
        score = float(evaluate(_copy_dict(candidate)))
        candidate_scores.append(score)
        if score > best or (not strict and score >= best):
            chosen.append(j)
            soup, best = candidate, score
    return GreedySoupResult(soup, chosen, best, visit, candidate_scores, individual)


def _descending(score: float) -> tuple[bool, float]:
    """Sort key: higher scores first, NaN last (``sorted`` is stable, so ties keep input order)."""
    return (True, 0.0) if math.isnan(score) else (False, -score)


def _copy_dict(model: StateDict) -> dict[str, Array]:
    """An independent copy of a state dict (so ``evaluate`` can never mutate an input)."""
    return {name: copy_of(v) for name, v in model.items()}


@dataclasses.dataclass
class LearnedSoupResult:
    """Outcome of :func:`learned_soup`.

    Attributes
    ----------
    soup : ``Σ_i α_{t,i} θ_{i,t}`` with the final coefficients (kind of ``models[0]``).
    coefficients : ``(K,)`` mixing weights (``granularity="model"``) or ``(T, K)`` with row ``t``
        for tensor ``tensor_names[t]`` (``"tensor"``); rows sum to 1.
    tensor_names : the floating entries that are mixed, in row order.
    losses : held-out loss before each optimisation step, ``(steps,)``.
    temperature : the learned logit scale β, or None when not learned.
    """

    soup: dict[str, Array]
    coefficients: np.ndarray
    tensor_names: list[str]
    losses: list[float]
    temperature: float | None


def learned_soup(
    models: Sequence[StateDict],
    loss_fn: Callable[..., torch.Tensor],
    *,
    granularity: Literal["model", "tensor"] = "model",
    steps: int = 100,
    lr: float = 0.05,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    learn_temperature: bool = False,
) -> LearnedSoupResult:
    r"""Learned soup (Wortsman et al. 2022, arXiv 2203.05482, App. I; ``learned_bylayer.py``).

    Mixing logits ``a`` (``(K,)`` or ``(T, K)``, initialised to 0, i.e. uniform weights) give

    .. math:: α = \mathrm{softmax}(a)\ \text{over models},\qquad
              θ_t(a) = Σ_i α_{t,i}\, θ_{i,t}

    (``α_{t,·}`` shared by all tensors when ``granularity="model"``), and ``a`` is trained with
    AdamW (reference: lr 0.05, weight decay 0) for ``steps`` full-batch steps on the held-out loss
    ``loss_fn(θ(a))``. With ``learn_temperature`` a scalar logit scale β (init 1, as in the
    reference) is trained too and the loss is called as ``loss_fn(θ(a), β)``; the caller applies
    it to the logits (``β · f(x; θ)``). Deterministic for a deterministic ``loss_fn``.

    Parameters
    ----------
    models : list of K dicts ``{name: array}`` (numpy or torch), equally keyed and shaped. All K
        are stacked in memory (``K ×`` model size), as in the reference.
    loss_fn : ``params -> scalar tensor`` (or ``(params, beta) -> scalar``), where ``params`` maps
        every name of ``models[0]`` to a torch tensor (e.g. for ``torch.func.functional_call``);
        mixed entries carry gradients. Non-floating entries are ``models[0]``'s.
    granularity : ``"model"`` (one α per model) or ``"tensor"`` (one α row per floating tensor).
    steps, lr, weight_decay, betas, eps : AdamW settings.

    Returns
    -------
    :class:`LearnedSoupResult`; ``soup`` has the kind/dtype/device of ``models[0]``. Where all
    models agree the soup holds their common value bit for bit.
    """
    if granularity not in ("model", "tensor"):
        raise unknown_name("granularity", granularity, ["model", "tensor"])
    if steps < 0:
        raise ConfigError("steps", f"must be >= 0, got {steps}")
    if not lr > 0:
        raise ConfigError("lr", f"must be > 0, got {lr}")
    k = len(models)
    keys = check_keys(models, "models")
    names = [n for n in keys if is_float(models[0][n])]
    if not names:
        raise ValueError("models have no floating-point entries to mix")
    mixed_names = set(names)

    fixed: dict[str, torch.Tensor] = {}
    stacks: dict[str, torch.Tensor] = {}
    agree: dict[str, torch.Tensor] = {}
    for name in keys:
        t0 = as_torch(models[0][name])
        if name not in mixed_names:
            fixed[name] = t0.clone()
            continue
        ts = gather(models, name, t0.to(compute_dtype(t0)))
        stacks[name] = torch.stack(ts)  # (K, *shape)
        agree[name] = all_equal(ts)
    first = stacks[names[0]]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    rows = 1 if granularity == "model" else len(names)
    logits = torch.zeros(rows, k, dtype=dtype, device=first.device, requires_grad=True)
    params = [logits]
    beta = None
    if learn_temperature:
        beta = torch.ones((), dtype=dtype, device=first.device, requires_grad=True)
        params.append(beta)
    opt = torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def mix(alpha: torch.Tensor) -> dict[str, torch.Tensor]:
        out = dict(fixed)
        for t, name in enumerate(names):
            stack = stacks[name]
            row = alpha[0 if rows == 1 else t].to(device=stack.device, dtype=stack.dtype)
            out[name] = torch.tensordot(row, stack, dims=1)
        return {n: out[n] for n in keys}

    losses: list[float] = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        mixed = mix(torch.softmax(logits, dim=-1))
        loss = loss_fn(mixed) if beta is None else loss_fn(mixed, beta)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError("loss_fn must return a scalar torch tensor")
        loss.backward()
        losses.append(float(loss.detach()))
        opt.step()

    with torch.no_grad():
        alpha = torch.softmax(logits, dim=-1)
        final = mix(alpha)
    soup: dict[str, Array] = {}
    for name in keys:
        ref = models[0][name]
        if name in stacks:
            value = torch.where(agree[name], stacks[name][0], final[name])
            soup[name] = to_kind(value, ref)
        else:
            soup[name] = copy_of(ref)
    coeffs = alpha.detach().cpu().to(torch.float64).numpy()
    return LearnedSoupResult(
        soup=soup,
        coefficients=coeffs[0] if rows == 1 else coeffs,
        tensor_names=names,
        losses=losses,
        temperature=None if beta is None else float(beta.detach()),
    )
