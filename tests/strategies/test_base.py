"""The shared strategy machinery: seeded selection, validation step, delta convention."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord

import strategies
from fedagg.errors import ConfigError
from strategies.arrays import Layout, to_numpy, to_record
from strategies.testing import FakeGrid, run_round

G = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}


def local(value: float) -> dict[str, np.ndarray]:
    return {"w": np.full((2, 3), value, np.float32), "b": np.full(3, value, np.float32)}


def test_fedavg_is_the_example_weighted_mean_of_deltas_times_server_lr() -> None:
    s = strategies.build("fedavg", num_clients=3, server_lr=0.5)
    arrays, metrics = run_round(s, 1, G, {0: local(1.0), 1: local(4.0), 2: local(10.0)},
                                num_examples={0: 1, 1: 2, 2: 1})
    out = to_numpy(arrays)
    expected = 0.5 * (1 * 1 + 2 * 4 + 1 * 10) / 4
    assert np.allclose(out["w"], expected) and out["w"].dtype == np.float32
    assert metrics["clients"] == 3 and metrics["failures"] == 0 and metrics["rejected"] == 0


def test_nonfinite_wrong_shape_and_failed_replies_never_reach_the_model() -> None:
    s = strategies.build("fedavg", num_clients=5)
    bad_shape = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(3, np.float32)}
    nan = local(1.0)
    nan["w"][0, 0] = np.nan
    inf = local(np.inf)
    ints = {"w": np.zeros((2, 3), np.int64), "b": np.zeros(3, np.int64)}
    arrays, metrics = run_round(s, 1, G, {0: local(2.0), 1: nan, 2: inf, 3: bad_shape, 4: None})
    assert np.allclose(to_numpy(arrays)["w"], 2.0)
    assert metrics["rejected"] == 3 and metrics["failures"] == 1 and metrics["clients"] == 1
    arrays, metrics = run_round(s, 2, G, {0: ints})
    assert arrays is None and metrics["rejected"] == 1


def test_max_update_norm_rejects_absurd_updates() -> None:
    s = strategies.build("fedavg", num_clients=2, max_update_norm=10.0)
    arrays, metrics = run_round(s, 1, G, {0: local(1.0), 1: local(1e6)})
    assert metrics["rejected"] == 1 and np.allclose(to_numpy(arrays)["b"], 1.0)


def test_min_replies_keeps_the_global_model() -> None:
    s = strategies.build("fedavg", num_clients=3, min_replies=2)
    arrays, metrics = run_round(s, 1, G, {0: local(1.0), 1: None, 2: None})
    assert arrays is None and metrics["failures"] == 2


def test_seeded_selection_depends_on_seed_and_round_only() -> None:
    grid = FakeGrid(range(100))
    a = strategies.build("fedavg", num_clients=100, clients_per_round=10, seed=1)
    b = strategies.build("fedavg", num_clients=100, clients_per_round=10, seed=1)
    c = strategies.build("fedavg", num_clients=100, clients_per_round=10, seed=2)
    assert a.select_clients(3, grid) == b.select_clients(3, grid)
    assert a.select_clients(3, grid) != c.select_clients(3, grid)
    assert a.select_clients(3, grid) != a.select_clients(4, grid)
    assert len(a.select_clients(3, grid)) == 10
    assert a.select_clients(1, FakeGrid([5, 7])) == [5, 7]  # fewer available than asked: all
    assert a.select_clients(1, FakeGrid([])) == []


def test_flower_builtins_are_wrapped_with_the_validation_step() -> None:
    s = strategies.build("fedmedian", num_clients=3)
    nan = local(0.0)
    nan["b"][:] = np.nan
    arrays, metrics = run_round(s, 1, G, {0: local(1.0), 1: local(3.0), 2: nan})
    assert np.allclose(to_numpy(arrays)["w"], 2.0)  # median of the two valid models
    assert metrics["rejected"] == 1
    prox = strategies.build("fedprox", num_clients=2, proximal_mu=0.1)
    msgs = list(prox.configure_train(1, to_record(G), ConfigRecord(), FakeGrid([0, 1])))
    assert msgs[0].content["config"]["proximal-mu"] == 0.1


def test_registry_validates_strategy_params() -> None:
    with pytest.raises(ConfigError, match="strategy"):
        strategies.build("fedsgd")
    with pytest.raises(ConfigError, match="fedprox.proximal_mu"):
        strategies.build("fedprox", proximal_mu=-1.0)
    with pytest.raises(ConfigError, match="unknown parameter"):
        strategies.build("fedavg", mu=1.0)
    assert {"fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm", "fedmedian",
            "fedtrimmedavg", "flwr-krum", "flwr-multikrum", "flwr-bulyan"} <= set(strategies.names())


def test_layout_roundtrip_preserves_dtypes() -> None:
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, np.float64)}
    lay = Layout.of(arrays)
    back = lay.unflatten(lay.flatten(arrays))
    assert lay.dim == 8 and back["a"].dtype == np.float32 and np.array_equal(back["a"], arrays["a"])
    assert lay.mismatch({"a": arrays["a"]}) is not None


def test_screened_deltas_feed_the_aggregate_bit_for_bit() -> None:
    """Screening keeps each accepted reply's delta as a row of one matrix and the aggregation reads
    it; the aggregate equals stacking the flat replies again, bit for bit, with rejected and
    failed replies in between."""
    rng = np.random.default_rng(0)
    g = {"w": rng.standard_normal((4, 5)).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32)}
    locals_ = {c: {k: (v + rng.standard_normal(v.shape)).astype(np.float32) for k, v in g.items()}
               for c in range(6)}
    locals_[2]["w"][1, 1] = np.nan  # rejected
    locals_[4] = None  # failed
    s = strategies.build("fedavg", num_clients=6, server_lr=0.7)
    arrays, metrics = run_round(s, 1, g, locals_, num_examples={c: c + 1 for c in range(6)})
    assert metrics["clients"] == 4 and metrics["rejected"] == 1 and metrics["failures"] == 1
    layout = Layout.of(g)
    ok = [0, 1, 3, 5]
    flat_g = layout.flatten(g)
    deltas = np.stack([layout.flatten(locals_[c]) for c in ok]) - flat_g
    w = np.array([c + 1.0 for c in ok])
    expected = layout.unflatten(flat_g + 0.7 * ((w / w.sum()) @ deltas))
    for k, v in to_numpy(arrays).items():
        assert v.tobytes() == expected[k].tobytes()
