"""Byzantine-robust strategies: any :mod:`fedagg.aggregators` pipeline applied to client deltas.

One class, :class:`RobustStrategy`, registered under

- ``robust`` — the rule is chosen by the ``aggregator`` key (top-level config key / ``--aggregator``),
  any registered rule or ``+``-chain (``nnm+trimmed-mean``, ``bucketing+krum``, ...);
- one name per final rule with the rule fixed: ``mean``, ``median``, ``trimmed-mean``, ``meamed``,
  ``phocas``, ``krum``, ``multikrum``, ``bulyan``, ``geomedian``, ``centered-clipping``, ``flag``.
  These names mean **our** implementations (reference semantics in ``docs/robust.md``); Flower's stay
  reachable as ``flwr-krum``, ``flwr-multikrum``, ``flwr-bulyan``, ``fedmedian``, ``fedtrimmedavg``.

A client update is ``Δ_k = local_k − global`` (clients reply with their local model; the strategy
subtracts the model it broadcast); the rule maps the ``(n, d)`` matrix of the deltas that passed the
shared validation step (non-finite, wrong-shape and absurd updates are rejected there, logged with the
client id and counted in ``rejected``) to one ``(d,)`` aggregate, and the server applies
``global += server_lr · aggregate`` (or a step of the server optimiser of :class:`DeltaStrategy`:
momentum, weight decay, step decay of ``server_lr``). A non-finite aggregate is refused by
:class:`DeltaStrategy`, so NaN/Inf never reach the global model.

How ``strategy_args`` map to the rule:

- ``f`` (Byzantine clients to tolerate) defaults to the run's ``num_byzantine`` (the runner passes
  it); it goes to every stage that declares ``f``. With ``discount_rejected`` (default on), the
  updates the validation step rejected this round count against that budget:
  ``f_used = max(0, f − rejected)`` (a rejected reply was removed, whoever sent it).
- the rule's own knobs are flat keys (``tau``, ``m``, ``lam``, ``variant``, ``iterations``, ...);
  in a chain a flat key goes to every stage that declares it;
- ``aggregator_args`` (a mapping) reaches anything else, e.g. ``{"clipping.tau": 5}`` for one stage
  of a chain or ``{"flag.seed": 3}`` (``seed`` itself is the run seed; ``bucketing`` is seeded from
  it unless ``bucketing.seed`` is given).
- ``weighted`` (default on): rules with ``supports_weights`` (``mean``, ``multikrum``,
  ``geomedian``, ``centered-clipping``) weight deltas by the clients' ``num-examples``; the other
  rules are unweighted. Byzantine clients could report a large count; turn it off to ignore counts.

When a round has too few updates for the rule (e.g. Bulyan needs ``n ≥ 4f + 3``) the global model is
kept, a warning is logged and the round's metrics hold ``infeasible = 1``. Stateful rules
(``centered-clipping``'s momentum, ``bucketing``'s generator) expose their state through
:meth:`RobustStrategy.state_dict` / :meth:`RobustStrategy.load_state_dict`.

Example
-------
>>> s = build("robust", num_clients=5, aggregator="nnm+trimmed-mean", f=1)   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.supercore import log

import fedagg.aggregators as agg
from fedagg.errors import ConfigError
from fedagg.registry import Param
from strategies.base import DeltaStrategy
from strategies.registry import COMMON_NAMES, register

#: Aggregator parameters that are not flat strategy keys (run seed clash, or not config values).
_NOT_FLAT = frozenset({"seed", "rng", "y0"})
#: Strategy-level keys of every robust strategy (never forwarded as aggregator params).
_OWN = frozenset({"aggregator", "f", "num_byzantine", "weighted", "discount_rejected",
                  "aggregator_args"})

_F = Param("f", int, None, "Byzantine clients to tolerate (null: the run's num_byzantine)", low=0,
           nullable=True)
_SHARED = (
    Param("num_byzantine", int, 0, "the run's number of Byzantine clients (set by the runner); "
          "default for f", low=0),
    Param("weighted", bool, True, "weight deltas by num-examples where the rule supports weights"),
    Param("discount_rejected", bool, True, "f_used = max(0, f − updates rejected this round)"),
    Param("aggregator_args", dict, {}, "extra aggregator parameters, e.g. {'clipping.tau': 5}"),
)


def _final(rule: Any) -> Any:
    return rule.final if isinstance(rule, agg.Pipeline) else rule


class RobustStrategy(DeltaStrategy):
    """Apply a :mod:`fedagg.aggregators` rule (or chain) to the client deltas.

    ``global += server_lr · rule(Δ_1..Δ_n)`` with ``Δ_k = local_k − global``; see the module
    docstring for how ``f``, the rule's knobs, weights and infeasible rounds are handled.

    Parameters
    ----------
    aggregator : str
        Rule name or ``+``-chain (:func:`fedagg.aggregators.build`).
    aggregator_params : mapping
        Keyword arguments of :func:`fedagg.aggregators.build` other than ``f``.
    f : int or None
        Byzantine clients to tolerate (None: ``num_byzantine``); only passed to stages that
        declare ``f``.
    num_byzantine : int
        The run's number of Byzantine clients.
    weighted, discount_rejected : bool
        See the module docstring.
    expected_clients : int or None
        Updates expected per round; if given, a rule that can never run with that many (e.g.
        Bulyan with ``n < 4f + 3``) is a ConfigError at construction.
    from_args : frozenset of str
        Which ``aggregator_params`` keys came from ``strategy_args.aggregator_args`` (for error
        messages only).
    **kwargs
        :class:`~strategies.base.DeltaStrategy` parameters (``server_lr``, ``seed``, ...).
    """

    def __init__(self, *, aggregator: str = "mean", aggregator_params: Mapping[str, Any] | None = None,
                 f: int | None = None, num_byzantine: int = 0, weighted: bool = True,
                 discount_rejected: bool = True, expected_clients: int | None = None,
                 from_args: frozenset[str] = frozenset(), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.aggregator = aggregator
        self.f = int(num_byzantine if f is None else f)
        self.f_source = "num_byzantine" if f is None else "strategy_args.f"
        self.weighted = bool(weighted)
        self.discount_rejected = bool(discount_rejected)
        params = dict(aggregator_params or {})
        self._from_args = set(from_args)
        self._declares_f = "f" in agg.declared_params(aggregator)
        stages = [s.strip() for s in aggregator.split("+")]
        if "bucketing" in stages and not any(k in params for k in ("seed", "bucketing.seed")):
            params["bucketing.seed" if len(stages) > 1 else "seed"] = self.seed
        self._params = params
        self.rule = self._build(self.f)
        if not isinstance(self.rule, agg.Aggregator):
            raise ConfigError("aggregator", f"{aggregator!r} is a pre-aggregator; end the chain "
                              f"with a rule, e.g. {aggregator}+median")
        self.f_used = self.f
        self.infeasible = 0
        if expected_clients is not None:
            self._check_feasible(expected_clients)

    # ------------------------------------------------------------------ construction
    def _build(self, f: int) -> Any:
        params = dict(self._params)
        if self._declares_f:
            params["f"] = f
        try:
            return agg.build(self.aggregator, **params)
        except ConfigError as exc:
            raise self._config_error(exc) from None

    def _config_error(self, exc: ConfigError) -> ConfigError:
        """``exc`` with its field named as the user wrote it (``strategy_args.<key>``, ...)."""
        if exc.field == "aggregator":
            return exc
        key = exc.field.rsplit(".", 1)[-1]
        directed = ".".join(exc.field.split(".")[-2:])  # "<stage>.<param>"
        if directed in self._params:
            prefix = "strategy_args.aggregator_args." if directed in self._from_args else "strategy_args."
            return ConfigError(prefix + directed, exc.message)
        if key == "f":
            return ConfigError(self.f_source, exc.message)
        for given in self._params:
            if given == key or given.endswith("." + key):
                prefix = "strategy_args.aggregator_args." if given in self._from_args else "strategy_args."
                return ConfigError(prefix + given, exc.message)
        return ConfigError(f"strategy_args ({exc.field})", exc.message)

    def _check_feasible(self, n: int) -> None:
        """Raise a ConfigError now if ``n`` clients per round can never satisfy the rule."""
        probe = self._build(self.f)  # a fresh instance: the strategy's rule keeps no trace
        try:
            probe(np.random.default_rng(0).normal(size=(n, 3)))
        except ConfigError as exc:
            err = self._config_error(exc)
            raise ConfigError(err.field, f"{err.message} (with {n} clients per round)") from None

    def _rule_for(self, f: int) -> Any:
        """The rule for this round's ``f``: the main instance, or (for a discounted ``f``) a
        fresh one that starts from the main instance's state (see :meth:`aggregate_deltas`)."""
        if f == self.f or not self._declares_f:
            return self.rule
        rule = self._build(f)
        state = self.rule.state_dict()
        if state:
            rule.load_state_dict(state)
        return rule

    # ------------------------------------------------------------------ aggregation
    def aggregate_deltas(self, server_round: int, deltas: np.ndarray, num_examples: np.ndarray,
                         client_ids: list[int]) -> np.ndarray:
        """``rule(deltas (n, d), weights) -> (d,)``; NaN (global model kept) if infeasible."""
        rejected = self.last_report.rejected if self.last_report is not None else 0
        f = max(0, self.f - rejected) if self.discount_rejected else self.f
        self.f_used, self.infeasible = f, 0
        rule = self._rule_for(f)
        weights = None
        if self.weighted and _final(rule).supports_weights and num_examples.sum() > 0:
            weights = num_examples
        try:
            out = rule(deltas, weights=weights)
        except ConfigError as exc:
            log(WARNING, "round %d: %s cannot aggregate %d updates with f=%d (%s); "
                "global model kept", server_round, self.aggregator, len(deltas), f, exc.message)
            self.infeasible = 1
            return np.full(deltas.shape[1], np.nan)
        if rule is not self.rule:  # carry the state forward (centered clipping, bucketing)
            state = rule.state_dict()
            if state:
                self.rule.load_state_dict(state)
        return np.asarray(out, dtype=np.float64)

    def aggregate_accepted(self, server_round: int, replies: list[Message]
                           ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_accepted(server_round, replies)
        if self.infeasible and metrics is not None and "aggregate_nonfinite" in metrics:
            metrics = MetricRecord({k: v for k, v in metrics.items() if k != "aggregate_nonfinite"})
        return arrays, metrics

    def round_metrics(self) -> dict[str, float]:
        """``f_used`` and ``infeasible`` (0/1) every round; ``flag_objective`` for FA."""
        out: dict[str, float] = {"f_used": float(self.f_used), "infeasible": float(self.infeasible)}
        trace = getattr(_final(self.rule), "objective_trace", None)
        if trace:
            out["flag_objective"] = float(trace[-1])
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, np.ndarray]:
        """The rule's state (``{}`` for stateless rules), e.g. ``{"v": (d,)}`` for centered
        clipping or ``{"0:bucketing.rng": ...}`` in a chain (see ``Pipeline.state_dict``), plus
        the server optimiser's ``server_opt.momentum``."""
        out = super().state_dict()
        out.update({k: np.asarray(v) for k, v in self.rule.state_dict().items()})
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore :meth:`state_dict` output."""
        self.rule.load_state_dict(self.load_base_state(dict(state)))

    def summary(self) -> None:  # pragma: no cover - logging only
        log(INFO, "\t├──> RobustStrategy: %s, f=%d, %s", self.rule.summary(), self.f,
            self.describe_server_step())


# ---------------------------------------------------------------------------------- registration
def _flat_params() -> list[Param]:
    """Every flat aggregator parameter (union over the registry), default None = rule default."""
    seen: dict[str, Param] = {}
    for name in agg.names():
        for p in agg.REGISTRY.entry(name).params:
            if p.name in _NOT_FLAT or p.name in _OWN or p.name in COMMON_NAMES or p.name in seen:
                continue
            users = [n for n in agg.names() if any(q.name == p.name
                                                   for q in agg.REGISTRY.entry(n).params)]
            seen[p.name] = Param(p.name, p.type, None,
                                 f"aggregator parameter ({', '.join(users)}); null: the rule's default",
                                 nullable=True)
    return [seen[k] for k in sorted(seen)]


def _split(aggregator: str, kw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(strategy kwargs, aggregator params)`` from a factory's keyword arguments."""
    extra = dict(kw.pop("aggregator_args", None) or {})
    params = {k: kw.pop(k) for k in list(kw) if k not in COMMON_NAMES and k not in _OWN}
    params = {k: v for k, v in params.items() if v is not None}
    clash = sorted(set(params) & set(extra))
    if clash:
        raise ConfigError(f"strategy_args.aggregator_args.{clash[0]}",
                          f"also set as strategy_args.{clash[0]}; set it once")
    params.update(extra)
    kw["from_args"] = frozenset(extra)
    return kw, params


def _make(aggregator: str, kw: dict[str, Any]) -> RobustStrategy:
    kw, params = _split(aggregator, kw)
    num_clients = kw.pop("num_clients")
    n = kw.get("clients_per_round") or num_clients
    return RobustStrategy(aggregator=aggregator, aggregator_params=params, expected_clients=n, **kw)


@register("robust", params=[Param("aggregator", str, "mean", "rule or +-chain, e.g. nnm+trimmed-mean"),
                            _F, *_SHARED, *_flat_params()],
          doc="Robust aggregation of client deltas with any fedagg aggregator pipeline "
              "(--aggregator nnm+trimmed-mean); f defaults to num_byzantine.")
def build_robust(aggregator: str, **kw: Any) -> RobustStrategy:
    return _make(aggregator, kw)


_DOCS = {
    "mean": "Plain / example-weighted mean of deltas (no robustness; = fedavg when weighted).",
    "median": "Coordinate-wise median of deltas (Yin et al. 2018).",
    "trimmed-mean": "Coordinate-wise trimmed mean of deltas, trimming f per side (Yin et al. 2018).",
    "meamed": "Per coordinate, mean of the n − f deltas closest to the median (Xie et al. 2018).",
    "phocas": "Per coordinate, mean of the n − f deltas closest to the trimmed mean (Xie et al. 2018).",
    "krum": "Krum (Blanchard et al. 2017), our implementation (variant paper|byzfl|garfield).",
    "multikrum": "Multi-Krum (Blanchard et al. 2017), our implementation (m, variant).",
    "bulyan": "Bulyan (El Mhamdi et al. 2018), our implementation (variant paper|flower|garfield).",
    "geomedian": "Geometric median of deltas by smoothed Weiszfeld (RFA, Pillutla et al.).",
    "centered-clipping": "Centered clipping (Karimireddy et al. 2021), stateful momentum.",
    "flag": "Flag Aggregator (Almasi et al. 2024): projection onto an IRLS flag-median subspace.",
}


def _register_rule(name: str) -> None:
    entry = agg.REGISTRY.entry(name)
    params: list[Param] = []
    for p in entry.params:
        if p.name in _NOT_FLAT:
            continue
        params.append(_F if p.name == "f" else p)

    def factory(**kw: Any) -> RobustStrategy:
        return _make(name, kw)

    factory.__name__ = f"build_{name.replace('-', '_')}"
    register(name, params=[*params, *_SHARED], doc=_DOCS.get(name, entry.doc))(factory)


#: The final rules registered as strategies of their own (pre-aggregators only appear in chains).
RULE_STRATEGIES: tuple[str, ...] = tuple(
    n for n in agg.names() if issubclass(agg.REGISTRY.entry(n).factory, agg.Aggregator)
)
for _name in RULE_STRATEGIES:
    _register_rule(_name)
