"""Model-merging strategies: Fisher merging and model soups as server aggregation rules.

Every strategy here forms a *merged model* ``θ̂`` from the round's accepted client models and keeps
the delta convention of all fedagg strategies: with ``Δ_k = θ_k − θ`` (clients reply with their
local model; the server subtracts the model it broadcast),

    θ ← θ + server_lr · (θ̂ − θ),

so ``server_lr = 1`` (the default) adopts the merge exactly (bit for bit), smaller values move only
part of the way. ``temporal-soup`` is the exception in what it *reports*: see its docstring.

Registered names (CLI name == registry key == section of ``docs/merging.md``):

- ``fisher`` — closed-form Fisher-weighted average of client models; clients send their diagonal
  Fisher as a second ArrayRecord (FedFish, Dhawan et al., arXiv 2311.10291; Fisher merging,
  Matena & Raffel, arXiv 2111.09832; one-shot: FedFisher, Jhunjhunwala et al., AISTATS 2024).
- ``uniform-soup`` — uniform mean of the client models (Wortsman et al., arXiv 2203.05482).
- ``temporal-soup`` — running mean of the global models over rounds (SWA, Izmailov et al.,
  arXiv 1803.05407; server-side SWA in FL: Caldarola et al., ECCV 2022).
- ``greedy-soup`` — greedy soup of the client models on a server validation split (Wortsman et
  al. 2022, Recipe 1).
- ``learned-soup`` — softmax mixing coefficients over the client models trained on the server
  validation split (Wortsman et al. 2022, App. I).

The soups that need held-out data declare a ``validation`` parameter: the runner passes a
:class:`simulations.core.runner.ServerValidation` (the union of the clients' held-out parts, never the
server test set). Any object with ``x``, ``y`` (numpy), ``score(arrays) -> accuracy``,
``loss(arrays) -> mean cross-entropy`` and ``model() -> nn.Module`` works, so the strategies can
be used in a plain Flower ``ServerApp`` too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from logging import INFO
from typing import Any, Protocol

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.supercore import log
from torch.func import functional_call
from torch.nn import functional as F

from fedagg.errors import ConfigError
from fedagg.merging import fisher_merge, fisher_norm, greedy_soup, learned_soup, uniform_soup
from fedagg.merging.fisher import FISHER_ESTIMATORS
from fedagg.registry import Param
from strategies.arrays import Layout, to_numpy, to_record
from strategies.base import DeltaStrategy, mean_metrics, reply_num_examples
from strategies.registry import register

__all__ = [
    "FisherMerge",
    "GreedySoup",
    "LearnedSoup",
    "MergeStrategy",
    "TemporalSoup",
    "UniformSoup",
    "Validation",
    "apply_merge",
    "fisher_problem",
    "held_out_loss",
]

FISHER_KEY = "fisher"


class Validation(Protocol):
    """What the soups need from a server validation split (``ServerValidation`` fits)."""

    x: np.ndarray
    y: np.ndarray

    def score(self, arrays: dict[str, np.ndarray]) -> float: ...
    def loss(self, arrays: dict[str, np.ndarray]) -> float: ...
    def model(self) -> torch.nn.Module: ...


def apply_merge(global_: dict[str, np.ndarray], merged: dict[str, np.ndarray],
                server_lr: float) -> dict[str, np.ndarray]:
    """``θ + η (θ̂ − θ)`` per tensor, in float64, cast back to each global tensor's dtype.

    With ``η = 1`` the merged tensors are returned as they are (cast to the global dtype), so the
    new global model *is* the merge, bit for bit.

    >>> apply_merge({"w": np.array([1.0])}, {"w": np.array([3.0])}, 0.5)["w"]
    array([2.])
    """
    out: dict[str, np.ndarray] = {}
    for name, g in global_.items():
        m = np.asarray(merged[name])
        if server_lr == 1.0:
            out[name] = m.astype(g.dtype, copy=True)
        else:
            g64 = g.astype(np.float64)
            out[name] = (g64 + server_lr * (m.astype(np.float64) - g64)).astype(g.dtype)
    return out


def fisher_problem(fisher: dict[str, np.ndarray], layout: Layout) -> str | None:
    """Why a reply's Fisher record is unusable (names/shapes, dtype, NaN/Inf, negative), or None."""
    why = layout.mismatch(fisher)
    if why is not None:
        return f"fisher: {why}"
    for name, arr in fisher.items():
        a = np.asarray(arr)
        if not np.issubdtype(a.dtype, np.floating):
            return f"fisher: tensor {name!r} has dtype {a.dtype}, expected floating point"
        if not np.all(np.isfinite(a)):
            return f"fisher: tensor {name!r} contains NaN or Inf"
        if np.any(a < 0):
            return f"fisher: tensor {name!r} has negative entries (min {float(a.min()):.3g})"
    return None


class MergeStrategy(DeltaStrategy):
    """Base of the merging rules: ``θ ← θ + server_lr · (merge(θ_1..θ_K) − θ)``.

    Subclasses implement :meth:`merge_models`, which returns the merged model (or None to keep
    the global model this round) and round metrics. Non-finite merges are never applied. The
    server optimiser of :class:`~strategies.base.DeltaStrategy` (momentum, weight decay, step
    decay of ``server_lr``) applies to the aggregate ``θ̂ − θ``.
    """

    def merge_models(
        self, server_round: int, global_: dict[str, np.ndarray],
        models: list[dict[str, np.ndarray]], replies: list[Message],
    ) -> tuple[dict[str, np.ndarray] | None, dict[str, float]]:
        """``models``: the K accepted client models (record order = ``global_``'s)."""
        raise NotImplementedError

    def aggregate_accepted(self, server_round: int, replies: list[Message]
                           ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self.current_global is not None, "configure_train must run before aggregate_train"
        g = to_numpy(self.current_global)
        received = [to_numpy(m.content.array_records[self.arrayrecord_key]) for m in replies]
        models = [{k: m[k] for k in g} for m in received]  # in the global's tensor order
        merged, extra = self.merge_models(server_round, g, models, replies)
        metrics = mean_metrics(replies)
        metrics.update(extra)
        if merged is None:
            return None, MetricRecord(metrics)
        buffer = None
        if self.uses_server_optimizer:  # heavy ball / weight decay on the aggregate θ̂ − θ
            layout = Layout.of(g)
            flat = layout.flatten(g)
            step, buffer = self.server_step(server_round, flat, layout.flatten(merged) - flat)
            new = layout.unflatten(step)
        else:
            new = apply_merge(g, merged, self.server_lr_at(server_round))
        if not all(np.all(np.isfinite(v)) for v in new.values()):
            log(INFO, "round %d: merged model is not finite; global model kept", server_round)
            metrics["aggregate_nonfinite"] = 1
            return None, MetricRecord(metrics)
        self.commit_step(buffer)
        return to_record(new), MetricRecord(metrics)


def held_out_loss(model: torch.nn.Module, x: np.ndarray, y: np.ndarray
                  ) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """``params -> mean cross-entropy of model(x; params)`` on ``x: (n, ...)``, ``y: (n,)``.

    ``params`` maps (some of) the model's state names to tensors; the call goes through
    ``torch.func.functional_call`` (the model's own tensors are untouched), so gradients flow to
    ``params``. The model is put in eval mode. This is the loss a learned soup minimises.
    """
    model.eval()
    device = next(model.parameters()).device
    xt = torch.as_tensor(x, device=device)
    yt = torch.as_tensor(y, device=device)

    def loss(params: dict[str, torch.Tensor]) -> torch.Tensor:
        params = {k: v.to(device) for k, v in params.items()}
        return F.cross_entropy(functional_call(model, params, (xt,), strict=False), yt)

    return loss


def _needs_validation(name: str, validation: Any) -> Validation:
    if validation is None:
        raise ConfigError("validation", f"{name!r} needs a server validation split "
                          "(the runner passes one; in your own ServerApp pass validation=...)")
    return validation


# ----------------------------------------------------------------------------------- fisher
class FisherMerge(MergeStrategy):
    r"""Fisher merging of client models (FedFish / FedFisher; Matena & Raffel 2022).

    Clients run the ``fisher`` task (local SGD, then the diagonal Fisher ``F_k`` at their local
    model on their local data) and reply with their model under ``arrays`` and ``F_k`` under a
    second ArrayRecord ``fisher``. The server merges in closed form, per coordinate,

    .. math::

        θ̂ = \frac{ε\,θ + Σ_k λ_k F_k θ_k}{ε + Σ_k λ_k F_k},\qquad
        λ_k = \frac{w_k}{Σ_j w_j},\quad
        w_k = \begin{cases} n_k\ \text{or}\ 1 & \text{normalize = False}\\
                            (n_k\ \text{or}\ 1) / ‖F_k‖_2 & \text{normalize = True}\end{cases}

    where ``θ`` is the previous global model and ``ε = floor``. This is
    :func:`fedagg.merging.fisher_merge` with the previous global as the *target* model (index 0,
    Fisher 0, coefficient 1, ``favor_target=True``): where every client Fisher is ~0 the
    coordinate falls back to the previous global, and if all client Fishers are 0 the global model
    is kept. Then ``θ ← θ + server_lr · (θ̂ − θ)``.

    ``normalize`` defaults to **False** here, unlike the reference (True): dividing each
    coefficient by the global norm of that client's Fisher throws away how confident (how much
    data, how sharp a minimum) each client is, which in FL is exactly what the weighting should
    keep (reference notes §7: "for FL the per-client L2 normalization removes data-size
    information"). With ``normalize=False`` and ``weighting="num_examples"``, ``n_k F_k`` is the
    summed Fisher of client k, i.e. the precision of its Laplace posterior.

    Parameters
    ----------
    estimator : ``"true"`` (exact expectation over the model's predictions, the reference),
        ``"sampled"`` (one label drawn per example) or ``"empirical"`` (true labels).
    max_examples : examples per client used for the Fisher (a seeded subset when more).
    fisher_batch_size : vectorised chunk size of the Fisher computation (memory only).
    normalize : divide λ_k by ``‖F_k‖₂`` (see above).
    floor : ``ε`` ≥ 0, the weight of the previous global in every coordinate.
    weighting : ``"num_examples"`` (w_k = n_k) or ``"uniform"`` (w_k = 1).

    Metrics per round: ``fisher_fallback_frac`` (share of coordinates where ``Σ λ_k F_k < ε``,
    i.e. mostly kept from the previous global), ``fisher_mean`` (mean client Fisher).
    """

    def __init__(self, *, estimator: str = "true", max_examples: int = 256,
                 fisher_batch_size: int = 32, normalize: bool = False, floor: float = 1e-6,
                 weighting: str = "num_examples", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.estimator = estimator
        self.max_examples = max_examples
        self.fisher_batch_size = fisher_batch_size
        self.normalize = normalize
        self.floor = floor
        self.weighting = weighting

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        config = ConfigRecord(dict(config))
        config["task"] = "fisher"
        config["fisher-estimator"] = self.estimator
        config["fisher-max-examples"] = self.max_examples
        config["fisher-batch-size"] = self.fisher_batch_size
        return super().configure_train(server_round, arrays, config, grid)

    def reply_problem(self, msg: Message, layout: Layout | None,
                      global_flat: np.ndarray | None) -> str | None:
        why = super().reply_problem(msg, layout, global_flat)
        if why is not None:
            return why
        if FISHER_KEY not in msg.content.array_records:
            return f"no ArrayRecord under {FISHER_KEY!r}"
        if layout is None:
            return None
        try:
            fisher = to_numpy(msg.content.array_records[FISHER_KEY])
        except Exception as exc:  # malformed bytes
            return f"unreadable fisher ({exc})"
        return fisher_problem(fisher, layout)

    def merge_models(self, server_round, global_, models, replies):
        fishers = [to_numpy(m.content.array_records[FISHER_KEY]) for m in replies]
        fishers = [{k: f[k].astype(np.float64) for k in global_} for f in fishers]
        n = np.array([reply_num_examples(m) for m in replies], dtype=np.float64)
        w = n.copy() if self.weighting == "num_examples" and n.sum() > 0 else np.ones(len(n))
        norms = np.array([fisher_norm(f) for f in fishers])
        if self.normalize:
            w = np.where(norms > 0, w / np.where(norms > 0, norms, 1.0), 0.0)
        else:
            w = np.where(norms > 0, w, 0.0)
        metrics: dict[str, float] = {"fisher_mean": float(np.mean(
            [sum(float(v.sum()) for v in f.values()) / max(sum(v.size for v in f.values()), 1)
             for f in fishers]))}
        if not w.sum() > 0:
            log(INFO, "round %d: every client Fisher is 0; global model kept", server_round)
            metrics["fisher_fallback_frac"] = 1.0
            return None, metrics
        lam = w / w.sum()
        g64 = {k: v.astype(np.float64) for k, v in global_.items()}
        m64 = [{k: v.astype(np.float64) for k, v in m.items()} for m in models]
        zero = {k: np.zeros_like(v) for k, v in g64.items()}
        merged = fisher_merge([g64, *m64], [zero, *fishers], [1.0, *lam.tolist()],
                              normalize=False, floor=self.floor, favor_target=True)
        low = sum(int(np.sum(sum(lk * f[k] for lk, f in zip(lam, fishers, strict=True)) < self.floor))
                  for k in g64)
        metrics["fisher_fallback_frac"] = low / max(sum(v.size for v in g64.values()), 1)
        return merged, metrics

    def summary(self) -> None:
        log(INFO, "\t├──> fisher: estimator=%s, max_examples=%d, normalize=%s, floor=%g, "
            "weighting=%s, server_lr=%s", self.estimator, self.max_examples, self.normalize,
            self.floor, self.weighting, self.server_lr)


@register(
    "fisher",
    params=[
        Param("estimator", str, "true", "diagonal Fisher estimator", choices=FISHER_ESTIMATORS),
        Param("max_examples", int, 256, "examples per client for the Fisher", low=1),
        Param("fisher_batch_size", int, 32, "vectorised chunk of the Fisher (memory)", low=1),
        Param("normalize", bool, False, "divide λ_k by ‖F_k‖₂ (reference: True; FL: False)"),
        Param("floor", float, 1e-6, "ε: weight of the previous global in every coordinate", low=0.0),
        Param("weighting", str, "num_examples", "client coefficient before normalisation",
              choices=("num_examples", "uniform")),
    ],
    doc="Fisher merging (FedFish, arXiv 2311.10291): θ̂ = (εθ + Σλ_k F_k θ_k)/(ε + Σλ_k F_k).",
)
def build_fisher(**kw: Any) -> FisherMerge:
    kw.pop("num_clients")
    return FisherMerge(**kw)


# ----------------------------------------------------------------------------- uniform soup
class UniformSoup(MergeStrategy):
    r"""Uniform soup of the client models (Wortsman et al. 2022, arXiv 2203.05482).

    .. math:: θ̂ = \frac{1}{K} Σ_{k=1}^{K} θ_k,\qquad θ ← θ + \text{server\_lr}\,(θ̂ − θ)

    over every tensor (classification head included). This is FedAvg with uniform instead of
    example-count weights; with one round and clients fine-tuning a shared model it is the
    one-shot uniform soup. Merging identical client models returns them bit for bit.
    """

    def merge_models(self, server_round, global_, models, replies):
        return uniform_soup(models), {}


@register("uniform-soup",
          doc="Uniform soup: θ̂ = (1/K) Σ θ_k of the client models (arXiv 2203.05482).")
def build_uniform_soup(**kw: Any) -> UniformSoup:
    kw.pop("num_clients")
    return UniformSoup(**kw)


# ----------------------------------------------------------------------------- temporal soup
class TemporalSoup(DeltaStrategy):
    r"""Temporal soup: a running mean of the global models over rounds (server-side SWA).

    Each round the global model is updated by FedAvg, ``θ_t = θ_{t−1} + server_lr · Σ_k
    (n_k/Σn) Δ_k``; from round ``start_round`` on, every ``every``-th new global joins the soup

    .. math:: \bar θ_m = \bar θ_{m−1} + (θ_t − \bar θ_{m−1}) / m \quad (\text{float64}),

    i.e. ``θ̄ = (1/m) Σ`` of the averaged globals (SWA, Izmailov et al., arXiv 1803.05407;
    server-side SWA in FL, Caldarola et al., ECCV 2022).

    **What clients train from.** As in SWA, clients keep training from the *last global*
    ``θ_t`` (``train_from="global"``, default) and the average is only *reported*: the runner
    evaluates :meth:`server_model` (the soup, once it has an ingredient) and saves it as
    ``model.safetensors``. ``train_from="soup"`` broadcasts the soup instead (then the rule is
    FedAvg with a 1/m-damped server step, and the reported and broadcast models coincide).

    :meth:`state_dict` holds the running mean (``soup/<name>``, float64) and ``count`` for
    checkpoints.

    Parameters
    ----------
    start_round : first round whose global joins the soup (SWA burn-in).
    every : average every ``every``-th round from ``start_round`` (SWA cycle length).
    train_from : ``"global"`` (SWA) or ``"soup"``.
    """

    def __init__(self, *, start_round: int = 1, every: int = 1, train_from: str = "global",
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.start_round = start_round
        self.every = every
        self.train_from = train_from
        self.soup: dict[str, np.ndarray] | None = None
        self.count = 0

    def _soup_record(self, like: ArrayRecord) -> ArrayRecord:
        assert self.soup is not None
        ref = to_numpy(like)
        return to_record({k: self.soup[k].astype(ref[k].dtype) for k in ref})

    def aggregate_accepted(self, server_round: int, replies: list[Message]
                           ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_accepted(server_round, replies)
        out = dict(metrics.items()) if metrics is not None else {}
        due = server_round >= self.start_round and (server_round - self.start_round) % self.every == 0
        if arrays is not None and due:
            new = {k: v.astype(np.float64) for k, v in to_numpy(arrays).items()}
            if self.soup is None:
                self.soup, self.count = new, 1
            else:
                self.count += 1
                self.soup = {k: s + (new[k] - s) / self.count for k, s in self.soup.items()}
        out["soup_count"] = self.count
        if self.train_from == "soup" and self.soup is not None:
            arrays = self._soup_record(arrays if arrays is not None else self.current_global)
        return arrays, MetricRecord(out)

    def server_model(self, arrays: ArrayRecord) -> ArrayRecord:
        """The model the server reports (evaluates, saves): the soup once it has an ingredient."""
        if self.soup is None or set(self.soup) != set(arrays.keys()):
            return arrays
        return self._soup_record(arrays)

    def state_dict(self) -> dict[str, np.ndarray]:
        state = super().state_dict()  # the server optimiser's buffer, if any
        state["count"] = np.array([self.count], dtype=np.int64)  # (1,): safetensors-friendly
        if self.soup is not None:
            state.update({f"soup/{k}": v.copy() for k, v in self.soup.items()})
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        state = self.load_base_state(state)
        if "count" not in state:
            raise ValueError(f"temporal-soup state needs 'count', got keys {sorted(state)}")
        self.count = int(np.asarray(state["count"]).reshape(-1)[0])
        soup = {k[len("soup/"):]: np.asarray(v, dtype=np.float64).copy()
                for k, v in state.items() if k.startswith("soup/")}
        extra = sorted(k for k in state if k != "count" and not k.startswith("soup/"))
        if extra:
            raise ValueError(f"unexpected temporal-soup state keys {extra}")
        if (self.count > 0) != bool(soup):
            raise ValueError(f"count={self.count} but {len(soup)} soup tensors")
        self.soup = soup or None

    def summary(self) -> None:
        log(INFO, "\t├──> temporal-soup: start_round=%d, every=%d, train_from=%s, server_lr=%s",
            self.start_round, self.every, self.train_from, self.server_lr)


@register(
    "temporal-soup",
    params=[
        Param("start_round", int, 1, "first round whose global joins the soup", low=1),
        Param("every", int, 1, "average every k-th round", low=1),
        Param("train_from", str, "global", "what clients train from: the last global (SWA) or "
              "the soup", choices=("global", "soup")),
    ],
    doc="Temporal soup: running mean of the FedAvg globals over rounds (server-side SWA).",
)
def build_temporal_soup(**kw: Any) -> TemporalSoup:
    kw.pop("num_clients")
    return TemporalSoup(**kw)


# ------------------------------------------------------------------------------- greedy soup
class GreedySoup(MergeStrategy):
    r"""Greedy soup of the round's client models on a server validation split.

    Wortsman et al. 2022 (arXiv 2203.05482), Recipe 1, via :func:`fedagg.merging.greedy_soup`:
    score every accepted client model ``θ_k`` on the validation split, visit them by decreasing
    score, start the soup with the best and add ``θ_j`` iff
    ``acc(mean(S ∪ {θ_j})) > acc(mean(S))`` (``strict=True``, the reference code) or ``≥``
    (``strict=False``, the paper's text). ``θ̂ = mean(S)``; ``θ ← θ + server_lr · (θ̂ − θ)``.

    With ``server_lr = 1`` the new global scores at least as well on the validation split as the
    best single client model (and, with ``include_global``, as the previous global, which is then
    one more ingredient). Costs ``2K − 1`` validation passes per round.

    Metrics per round: ``soup_size``, ``soup_val_accuracy``, ``best_client_val_accuracy``.
    """

    def __init__(self, *, validation: Validation | None = None, strict: bool = True,
                 include_global: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.validation = _needs_validation("greedy-soup", validation)
        self.strict = strict
        self.include_global = include_global

    def merge_models(self, server_round, global_, models, replies):
        ingredients = [*models, global_] if self.include_global else list(models)
        res = greedy_soup(ingredients, self.validation.score, strict=self.strict)
        assert res.individual_scores is not None
        metrics = {"soup_size": len(res.indices), "soup_val_accuracy": res.score,
                   "best_client_val_accuracy": max(res.individual_scores[: len(models)])}
        if self.include_global:
            metrics["global_in_soup"] = int(len(models) in res.indices)
        return res.soup, metrics

    def summary(self) -> None:
        log(INFO, "\t├──> greedy-soup: strict=%s, include_global=%s, validation n=%d, server_lr=%s",
            self.strict, self.include_global, len(self.validation.y), self.server_lr)


_VALIDATION = Param("validation", object, None,
                    "server validation split (ServerValidation; filled in by the runner)")


@register(
    "greedy-soup",
    params=[
        _VALIDATION,
        Param("strict", bool, True, "add an ingredient on > (True, reference code) or ≥ (False)"),
        Param("include_global", bool, False, "the previous global is an ingredient too"),
    ],
    doc="Greedy soup of the client models on the server validation split (arXiv 2203.05482).",
)
def build_greedy_soup(**kw: Any) -> GreedySoup:
    kw.pop("num_clients")
    return GreedySoup(**kw)


# ------------------------------------------------------------------------------ learned soup
class LearnedSoup(MergeStrategy):
    r"""Learned soup: softmax mixing coefficients over the client models, trained on the server
    validation split (Wortsman et al. 2022, arXiv 2203.05482, App. I).

    .. math:: θ̂(a) = Σ_k \mathrm{softmax}(a)_k\, θ_k,\qquad
              a^* ≈ \arg\min_a \mathrm{CE}\big(f(x_{val}; θ̂(a)), y_{val}\big)

    ``a`` starts at 0 (the uniform soup) and takes ``steps`` full-batch AdamW steps (lr ``lr``,
    weight decay 0) through :func:`fedagg.merging.learned_soup`; the loss calls the server's model
    with ``torch.func.functional_call``. ``granularity="tensor"`` learns one coefficient row per
    tensor (the reference ``learned_bylayer.py``). ``θ ← θ + server_lr · (θ̂ − θ)``.

    Metrics per round: ``soup_val_loss`` (of the merged model), ``soup_val_accuracy``,
    ``soup_max_weight`` (largest mixing weight, model granularity: of the K clients).
    """

    def __init__(self, *, validation: Validation | None = None, granularity: str = "model",
                 steps: int = 50, lr: float = 0.05, include_global: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.validation = _needs_validation("learned-soup", validation)
        self.granularity = granularity
        self.steps = steps
        self.lr = lr
        self.include_global = include_global

    def loss_fn(self) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
        """``params -> mean cross-entropy`` of the server model on the validation split."""
        return held_out_loss(self.validation.model(), self.validation.x, self.validation.y)

    def merge_models(self, server_round, global_, models, replies):
        ingredients = [*models, global_] if self.include_global else list(models)
        res = learned_soup(ingredients, self.loss_fn(), granularity=self.granularity,  # type: ignore[arg-type]
                           steps=self.steps, lr=self.lr)
        soup = {k: np.asarray(v) for k, v in res.soup.items()}
        loss = self.validation.loss(soup)
        metrics = {"soup_val_loss": loss if math.isfinite(loss) else float("nan"),
                   "soup_val_accuracy": self.validation.score(soup),
                   "soup_max_weight": float(np.max(res.coefficients))}
        return soup, metrics

    def summary(self) -> None:
        log(INFO, "\t├──> learned-soup: granularity=%s, steps=%d, lr=%g, server_lr=%s",
            self.granularity, self.steps, self.lr, self.server_lr)


@register(
    "learned-soup",
    params=[
        _VALIDATION,
        Param("granularity", str, "model", "one coefficient per client, or per tensor and client",
              choices=("model", "tensor")),
        Param("steps", int, 50, "full-batch AdamW steps on the validation loss", low=0),
        Param("lr", float, 0.05, "AdamW learning rate (reference 0.05)", low=0.0, low_open=True),
        Param("include_global", bool, False, "the previous global is an ingredient too"),
    ],
    doc="Learned soup: softmax mixing weights over client models fit on the validation split.",
)
def build_learned_soup(**kw: Any) -> LearnedSoup:
    kw.pop("num_clients")
    return LearnedSoup(**kw)
