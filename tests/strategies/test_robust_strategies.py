"""Robust strategies: the rule is applied to client deltas, f defaults, weights, state, errors."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.serverapp.strategy import Krum as FlowerKrum

import fedagg.aggregators as agg
import strategies
from fedagg.errors import ConfigError
from simulations.core.config import load_config
from strategies.arrays import Layout, to_numpy
from strategies.robust import RULE_STRATEGIES, RobustStrategy
from strategies.testing import run_round

G = {"w": np.full((2, 3), 0.5, np.float32), "b": np.zeros(3, np.float32)}
LAYOUT = Layout.of(G)
GFLAT = LAYOUT.flatten(G)


def locals_from(deltas: np.ndarray) -> dict[int, dict[str, np.ndarray]]:
    """Client k replies global + deltas[k] (float32, like a model)."""
    return {k: LAYOUT.unflatten(GFLAT + d) for k, d in enumerate(deltas)}


def delta_of(arrays) -> np.ndarray:
    return LAYOUT.flatten(to_numpy(arrays)) - GFLAT


def sample_deltas(n: int = 7, seed: int = 0) -> np.ndarray:
    """Deltas exactly as the strategy will see them (after the float32 model round trip)."""
    rng = np.random.default_rng(seed)
    D = rng.normal(0.0, 0.1, size=(n, LAYOUT.dim)) + 0.2
    D[-1] = 40.0  # one outlier
    return np.stack([LAYOUT.flatten(m) - GFLAT for m in locals_from(D).values()])


def test_every_final_rule_is_a_strategy_named_after_it() -> None:
    finals = {n for n in agg.names() if n not in ("nnm", "bucketing", "clipping")}
    assert set(RULE_STRATEGIES) == finals
    assert finals <= set(strategies.names()) and "robust" in strategies.names()
    # Flower's own rules stay reachable under flwr-* names; ours are RobustStrategy
    assert isinstance(strategies.build("flwr-krum", num_clients=5), FlowerKrum)
    assert isinstance(strategies.build("krum", num_clients=5), RobustStrategy)
    assert not isinstance(strategies.build("krum", num_clients=5), FlowerKrum)


@pytest.mark.parametrize("name", sorted(RULE_STRATEGIES))
def test_rule_strategy_applies_the_rule_to_the_deltas(name: str) -> None:
    D = sample_deltas()
    kw = {"f": 1} if "f" in agg.declared_params(name) else {}
    s = strategies.build(name, num_clients=7, server_lr=0.5, **kw)
    arrays, metrics = run_round(s, 1, G, locals_from(D))
    expected = agg.build(name, **kw)(D)
    got = delta_of(arrays)
    assert np.allclose(got, 0.5 * expected, atol=1e-6), name
    assert metrics["clients"] == 7 and metrics["f_used"] == kw.get("f", 0)
    if name not in ("mean", "centered-clipping"):
        assert np.abs(got).max() < 1.0  # the outlier (40) is filtered
    assert metrics["infeasible"] == 0


def test_robust_strategy_runs_any_chain_and_routes_params() -> None:
    D = sample_deltas(n=9, seed=1)
    s = strategies.build("robust", num_clients=9, aggregator="clipping+nnm+trimmed-mean", f=2,
                         tau=0.5)
    arrays, _ = run_round(s, 1, G, locals_from(D))
    expected = agg.build("clipping+nnm+trimmed-mean", f=2, tau=0.5)(D)
    assert np.allclose(delta_of(arrays), expected, atol=1e-6)
    # a stage-directed key through aggregator_args; the flat key reaches the other stage
    s = strategies.build("robust", num_clients=9, aggregator="clipping+centered-clipping",
                         tau=3.0, aggregator_args={"clipping.tau": 0.25})
    assert s.rule.summary() == "clipping(tau=0.25) + centered-clipping(tau=3.0, iterations=1)"


def test_f_defaults_to_num_byzantine_through_the_runner_config() -> None:
    cfg = load_config(None, {"strategy": "robust", "aggregator": "nnm+krum", "num_clients": 15,
                             "num_byzantine": 3, "attack": "alie"})
    params = strategies.run_params(cfg)
    assert params["aggregator"] == "nnm+krum" and "num_byzantine" not in params
    assert strategies.run_params(cfg, num_byzantine=cfg.num_byzantine)["num_byzantine"] == 3
    s = strategies.build_run(cfg, num_byzantine=cfg.num_byzantine)
    assert s.f == 3 and s.rule.summary().startswith("nnm(f=3) + krum(f=3")
    s = strategies.build("krum", num_clients=15, num_byzantine=3, f=1)  # explicit f wins
    assert s.f == 1
    with pytest.raises(ConfigError) as exc:
        load_config(None, {"strategy": "krum", "aggregator": "median"})
    assert exc.value.field == "aggregator"


def test_config_errors_name_the_field_the_user_wrote() -> None:
    cases = [
        (dict(name="bulyan", num_byzantine=4), "num_byzantine"),      # 15 < 4·4 + 3
        (dict(name="bulyan", f=4), "strategy_args.f"),
        (dict(name="robust", aggregator="nnm+krum", variant="nope"), "strategy_args.variant"),
        (dict(name="robust", aggregator="krum", tau=1.0), "strategy_args.tau"),
        (dict(name="robust", aggregator="nnm+krm"), "aggregator"),
        (dict(name="multikrum", f=1, m=20), "strategy_args.m"),
        (dict(name="robust", aggregator="nnm+trimmed-mean", aggregator_args={"nnm.f": 20}),
         "strategy_args.aggregator_args.nnm.f"),
    ]
    for kw, field in cases:
        name = kw.pop("name")
        with pytest.raises(ConfigError) as exc:
            strategies.build(name, num_clients=15, **kw)
        assert exc.value.field == field, (name, kw, exc.value)


def test_nonfinite_updates_never_reach_the_model_and_discount_f() -> None:
    D = sample_deltas(n=7)
    models = locals_from(D)
    models[5] = {k: np.full_like(v, np.inf) for k, v in G.items()}
    models[6] = {k: np.full_like(v, np.nan) for k, v in G.items()}
    bad_shape = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(3, np.float32)}
    models[7] = bad_shape
    for name in ("mean", "bulyan", "flag", "krum"):
        s = strategies.build(name, num_clients=8, num_byzantine=1)
        arrays, metrics = run_round(s, 1, G, models)
        out = to_numpy(arrays)
        assert all(np.isfinite(v).all() for v in out.values()), name
        assert metrics["rejected"] == 3 and metrics["clients"] == 5
        # the 3 rejected updates use up the budget: f_used = max(0, 1 − 3) = 0, so bulyan(f=1),
        # which would need 7 updates, still aggregates the 5 finite ones
        assert metrics["f_used"] == 0 and metrics["infeasible"] == 0
    s = strategies.build("krum", num_clients=8, f=2, discount_rejected=False)
    _, metrics = run_round(s, 1, G, models)
    assert metrics["f_used"] == 2


def test_infeasible_round_keeps_the_global_model() -> None:
    s = strategies.build("bulyan", num_clients=7, f=1)
    D = sample_deltas(n=7)
    models: dict[int, dict[str, np.ndarray] | None] = dict(locals_from(D))
    models[5] = models[6] = None  # two failures: 5 < 4f + 3 updates
    arrays, metrics = run_round(s, 1, G, models)
    assert arrays is None and metrics["infeasible"] == 1 and metrics["failures"] == 2
    assert "aggregate_nonfinite" not in metrics


def test_weights_only_where_the_rule_supports_them() -> None:
    D = sample_deltas(n=5)[:4]
    n_ex = {0: 1, 1: 1, 2: 1, 3: 5}
    arrays, _ = run_round(strategies.build("mean", num_clients=4), 1, G, locals_from(D), n_ex)
    w = np.array([1, 1, 1, 5]) / 8
    assert np.allclose(delta_of(arrays), w @ D, atol=1e-6)
    arrays, _ = run_round(strategies.build("mean", num_clients=4, weighted=False), 1, G,
                          locals_from(D), n_ex)
    assert np.allclose(delta_of(arrays), D.mean(axis=0), atol=1e-6)
    # median does not support weights: non-uniform counts are ignored, not an error
    arrays, _ = run_round(strategies.build("median", num_clients=4), 1, G, locals_from(D), n_ex)
    assert np.allclose(delta_of(arrays), np.median(D, axis=0), atol=1e-6)


def test_flag_median_norm_scale_gives_update_units() -> None:
    D = np.tile(sample_deltas(n=2)[0], (6, 1))  # identical updates: FA returns them
    ref = strategies.build("flag", num_clients=6)
    med = strategies.build("flag", num_clients=6, scale="median-norm")
    a_ref, _ = run_round(ref, 1, G, locals_from(D))
    a_med, m = run_round(med, 1, G, locals_from(D))
    assert np.allclose(delta_of(a_med), D[0], atol=1e-5)
    assert np.isclose(np.linalg.norm(delta_of(a_ref)), 6 / 3, rtol=1e-4)  # p / m, m = (p+1)//2
    assert "flag_objective" in m


def test_stateful_rule_state_round_trips_for_checkpoints() -> None:
    rng = np.random.default_rng(3)
    rounds = [rng.normal(0.2, 0.3, size=(6, LAYOUT.dim)) for _ in range(3)]
    a = strategies.build("centered-clipping", num_clients=6, tau=0.5)
    assert a.state_dict() == {}
    run_round(a, 1, G, locals_from(rounds[0]))
    state = a.state_dict()
    assert set(state) == {"v"} and state["v"].shape == (LAYOUT.dim,)
    b = strategies.build("centered-clipping", num_clients=6, tau=0.5)
    b.load_state_dict(state)
    out_a, _ = run_round(a, 2, G, locals_from(rounds[1]))
    out_b, _ = run_round(b, 2, G, locals_from(rounds[1]))
    assert np.array_equal(delta_of(out_a), delta_of(out_b))
    fresh, _ = run_round(strategies.build("centered-clipping", num_clients=6, tau=0.5), 2, G,
                         locals_from(rounds[1]))
    assert not np.allclose(delta_of(fresh), delta_of(out_a))  # the state matters
    # bucketing's generator: restoring it replays the same permutation
    c = strategies.build("robust", num_clients=6, aggregator="bucketing+median", seed=4)
    saved = c.state_dict()
    assert set(saved) == {"0:bucketing.rng"}
    first, _ = run_round(c, 1, G, locals_from(rounds[2]))
    c.load_state_dict(saved)
    again, _ = run_round(c, 1, G, locals_from(rounds[2]))
    assert np.array_equal(delta_of(first), delta_of(again))
