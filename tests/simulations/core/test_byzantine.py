"""Byzantine clients in the runner: ids, the corrupt hook, data attacks, config errors, runs."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
from flwr.app import ConfigRecord

import strategies
from fedagg.attacks import Attack
from fedagg.errors import ConfigError
from simulations import run as run_cli
from simulations.core.byzantine import Corruption, build_corruption, byzantine_ids, data_attack
from simulations.core.client_app import ClientRuntime
from simulations.core.config import load_config
from simulations.core.results import load_arrays, read_metrics
from simulations.core.runner import Simulation
from strategies.arrays import Layout, to_numpy, to_record
from strategies.testing import FakeGrid, reply

G = {"w": np.full((2, 3), 0.5, np.float32), "b": np.zeros(3, np.float32)}
LAYOUT = Layout.of(G)
GFLAT = LAYOUT.flatten(G)
SMALL = {"engine": "inline", "rounds": 2, "num_clients": 6, "model": "mlp", "local_steps": 2,
         "dataset_args": {"num_samples": 1000}}


def exchange(deltas: dict[int, np.ndarray | None]) -> tuple[list, object]:
    """Train messages for clients ``deltas`` and their replies ``global + Δ`` (None: error)."""
    s = strategies.build("fedavg", num_clients=len(deltas))
    msgs = list(s.configure_train(1, to_record(G), ConfigRecord(), FakeGrid(sorted(deltas))))
    replies = []
    for m in msgs:
        d = deltas[int(m.metadata.dst_node_id)]
        replies.append(reply(m, None if d is None else LAYOUT.unflatten(GFLAT + d)))
    return replies, msgs[0].content


def delta(msg) -> np.ndarray:
    return LAYOUT.flatten(to_numpy(msg.content["arrays"])) - GFLAT


class Spy(Attack):
    """Records what it was given; sends 7 + the mean of its ``honest`` argument."""

    name: ClassVar[str] = "spy"

    def __init__(self, omniscient: bool) -> None:
        self._omni = omniscient
        self.seen: dict[str, np.ndarray] = {}

    @property
    def omniscient(self) -> bool:
        return self._omni

    def _attack(self, H, f, rng, own):
        self.seen = {"honest": H.copy(), "own": own.copy()}
        return np.repeat(7.0 + H.mean(axis=0, keepdims=True), f, axis=0)


def test_byzantine_ids_are_deterministic_nested_and_seeded() -> None:
    a = byzantine_ids(0, 15, 3)
    assert a == byzantine_ids(0, 15, 3) and len(a) == 3 and a == sorted(a)
    assert all(0 <= c < 15 for c in a)
    assert set(byzantine_ids(0, 15, 2)) <= set(a) <= set(byzantine_ids(0, 15, 4))
    assert any(byzantine_ids(s, 15, 3) != a for s in range(1, 5))
    assert byzantine_ids(3, 15, 0) == [] and byzantine_ids(3, 4, 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        byzantine_ids(0, 3, 4)


def test_omniscient_attack_sees_the_honest_deltas_that_arrived() -> None:
    rng = np.random.default_rng(0)
    D = {k: rng.normal(size=LAYOUT.dim).astype(np.float32).astype(np.float64) for k in range(6)}
    D[4] = None  # an honest client that failed: not part of what the attacker sees
    replies, broadcast = exchange(D)
    spy = Spy(omniscient=True)
    hook = Corruption(spy, [1, 3], seed=0)
    out = hook(5, replies, broadcast)
    honest = np.stack([LAYOUT.flatten(LAYOUT.unflatten(GFLAT + D[k])) - GFLAT for k in (0, 2, 5)])
    assert np.allclose(spy.seen["honest"], honest)
    assert np.allclose(spy.seen["own"][0], D[1], atol=1e-6)
    assert np.allclose(spy.seen["own"][1], D[3], atol=1e-6)
    by_id = {int(m.metadata.src_node_id): m for m in out}
    for k in (1, 3):  # replaced by global + Δ_byz, cast back to float32
        assert np.allclose(delta(by_id[k]), 7.0 + honest.mean(axis=0), atol=1e-5)
        assert by_id[k].content["arrays"]["w"].numpy().dtype == np.float32
        assert by_id[k].content["metrics"]["num-examples"] == 1  # rest of the reply kept
    for k in (0, 2, 5):
        assert np.allclose(delta(by_id[k]), D[k], atol=1e-6)
    assert by_id[4].has_error() and hook.counts == {5: 2}


def test_non_omniscient_attack_sees_only_its_own_delta() -> None:
    rng = np.random.default_rng(1)
    D = {k: rng.normal(size=LAYOUT.dim) for k in range(5)}
    replies, broadcast = exchange(D)
    spy = Spy(omniscient=False)
    Corruption(spy, [2], seed=0)(1, replies, broadcast)
    assert spy.seen["honest"].shape == (4, LAYOUT.dim) and not spy.seen["honest"].any()
    assert np.allclose(spy.seen["own"][0], D[2], atol=1e-6)


def test_real_attacks_through_the_hook() -> None:
    rng = np.random.default_rng(2)
    D = {k: rng.normal(size=LAYOUT.dim).astype(np.float32).astype(np.float64) for k in range(6)}
    cfg = load_config(None, {"num_clients": 6, "attack": "ipm", "attack_args": {"epsilon": 2.0},
                             "num_byzantine": 2, "seed": 4})
    hook = build_corruption(cfg)
    ids = byzantine_ids(4, 6, 2)
    assert hook is not None and hook.ids == frozenset(ids)
    replies, broadcast = exchange(D)
    out = {int(m.metadata.src_node_id): m for m in hook(1, replies, broadcast)}
    mu = np.mean([D[k] for k in range(6) if k not in ids], axis=0)
    for k in ids:
        assert np.allclose(delta(out[k]), -2.0 * mu, atol=1e-5)
    # signflip (own): each attacker negates its own delta
    cfg = load_config(None, {"num_clients": 6, "attack": "signflip", "num_byzantine": 2, "seed": 4})
    replies, broadcast = exchange(D)
    out = {int(m.metadata.src_node_id): m for m in build_corruption(cfg)(1, replies, broadcast)}
    for k in ids:
        assert np.allclose(delta(out[k]), -D[k], atol=1e-5)
    # random: fresh draws keyed by (seed, "attack", round): same round same draw
    cfg = load_config(None, {"num_clients": 6, "attack": "random", "num_byzantine": 2, "seed": 4})
    draws = []
    for rnd in (1, 1, 2):
        replies, broadcast = exchange(D)
        out = {int(m.metadata.src_node_id): m for m in build_corruption(cfg)(rnd, replies, broadcast)}
        draws.append(delta(out[ids[0]]))
    assert np.array_equal(draws[0], draws[1]) and not np.allclose(draws[0], draws[2])
    assert ((draws[0] >= -1e-6) & (draws[0] < 1 + 1e-6)).all()


def test_labelflip_is_applied_client_side_only_to_byzantine_clients() -> None:
    cfg = load_config(None, {**SMALL, "attack": "labelflip", "num_byzantine": 2, "seed": 1})
    ids = byzantine_ids(1, 6, 2)
    y = np.array([0, 3, 9, 9])
    for cid in range(6):
        got = data_attack(cfg, cid, y, num_classes=10)
        assert np.array_equal(got, 9 - y if cid in ids else y), cid
    assert build_corruption(cfg)(1, [], None) == []  # model updates untouched
    rt = ClientRuntime(cfg)
    clean = ClientRuntime(load_config(None, {**SMALL, "seed": 1}))
    for cid in range(6):
        yb, yc = rt.tensors(cid).y.numpy(), clean.tensors(cid).y.numpy()
        assert np.array_equal(yb, 9 - yc if cid in ids else yc)
        assert np.array_equal(rt.tensors(cid).y_test.numpy(), clean.tensors(cid).y_test.numpy())


def test_attack_config_errors_exit_2_naming_the_field(capsys) -> None:
    cases = [({"attack": "nope"}, "attack"),
             ({"attack": "ipm", "attack_args": {"eps": 1}}, "attack_args.eps"),
             ({"attack": "ipm", "attack_args": {"epsilon": -1}}, "attack_args.epsilon"),
             ({"attack": "alie", "attack_args": {"z": "big"}}, "attack_args.z"),
             ({"attack": "alie", "attack_args": {"knowledge": "own"}, "num_byzantine": 1},
              "attack_args")]
    for over, field in cases:
        with pytest.raises(ConfigError) as exc:
            load_config(None, {"num_clients": 10, "num_byzantine": 2, **over})
        assert exc.value.field == field, (over, exc.value)
    code = run_cli.main(["--attack", "nope", "--num-byzantine", "1", "--engine", "inline"])
    assert code == 2 and "attack" in capsys.readouterr().err


@pytest.mark.parametrize("strategy", ["mean", "flag"])
def test_inf_attacker_never_yields_a_nonfinite_global_model(tmp_path, strategy) -> None:
    cfg = load_config(None, {**SMALL, "strategy": strategy, "attack": "inf", "num_byzantine": 2,
                             "out": str(tmp_path / strategy)})
    res = Simulation(cfg).run()
    assert all(np.isfinite(v).all() for v in res.arrays.values())
    model = load_arrays(res.run_dir / "model.safetensors")
    assert all(np.isfinite(v).all() for v in model.values())
    rows = [r for r in read_metrics(res.run_dir) if r["phase"] == "train"]
    assert [r["byzantine"] for r in rows] == [2, 2] and [r["rejected"] for r in rows] == [2, 2]
    assert [r["clients"] for r in rows] == [4, 4]
    assert all(np.isfinite(r["test_loss"]) for r in rows)
