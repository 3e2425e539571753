"""Merging strategies (fisher, uniform-soup, temporal-soup, greedy-soup, learned-soup).

Synthetic replies check the server math against hand-computed numbers (reference vectors of
fedins_merging.md §8.1/§8.3); inline runs check the ClientApp ``fisher`` task end to end and the
greedy soup's guarantee at the strategy level.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

import strategies
from fedagg.errors import ConfigError
from strategies.arrays import to_numpy, to_record
from strategies.flower_compat import ensure_task_identity
from strategies.merging import apply_merge, held_out_loss

ensure_task_identity()

NAMES = ("fisher", "uniform-soup", "temporal-soup", "greedy-soup", "learned-soup")


# ----------------------------------------------------------------------------- helpers
class Nodes:
    """A minimal grid: every node is available."""

    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self):
        return list(range(self.n))


def reply(cid: int, arrays: dict, *, fisher: dict | None = None, n: int = 10,
          fisher_record: ArrayRecord | None = None) -> Message:
    request = Message(RecordDict(), dst_node_id=cid, message_type="train")
    content = {"arrays": to_record({k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}),
               "metrics": MetricRecord({"num-examples": n, "train_loss": 1.0, "client-id": cid})}
    if fisher is not None:
        content["fisher"] = to_record({k: np.asarray(v, dtype=np.float32) for k, v in fisher.items()})
    if fisher_record is not None:
        content["fisher"] = fisher_record
    return Message(RecordDict(content), reply_to=request)


def start(strategy, global_: dict, n_clients: int = 4, server_round: int = 1) -> list[Message]:
    g = to_record({k: np.asarray(v, dtype=np.float32) for k, v in global_.items()})
    return list(strategy.configure_train(server_round, g, ConfigRecord({"lr": 0.1}), Nodes(n_clients)))


def w(record: ArrayRecord | None, key: str = "w") -> np.ndarray:
    assert record is not None
    return to_numpy(record)[key]


@dataclasses.dataclass
class ScalarValidation:
    """acc(θ) = −|θ| (reference §8.3 toy), loss = θ²."""

    x: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((1, 1), np.float32))
    y: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(1, np.int64))
    calls: int = 0

    def score(self, arrays):
        self.calls += 1
        return -abs(float(np.asarray(arrays["w"]).reshape(-1)[0]))

    def loss(self, arrays):
        return float(np.asarray(arrays["w"]).reshape(-1)[0]) ** 2

    def model(self):
        raise NotImplementedError


# ----------------------------------------------------------------------------- registry
def test_registered_with_declared_params():
    for name in NAMES:
        assert name in strategies.names()
    entry = strategies.REGISTRY.entry("fisher")
    assert entry.param("normalize").default is False
    assert entry.param("estimator").choices == ("true", "sampled", "empirical")
    assert entry.param("weighting").choices == ("num_examples", "uniform")
    for name in ("greedy-soup", "learned-soup"):
        assert strategies.REGISTRY.entry(name).param("validation") is not None
        with pytest.raises(ConfigError, match="validation"):
            strategies.build(name)
    with pytest.raises(ConfigError, match="strategy_args.estimator"):
        strategies.REGISTRY.entry("fisher").resolve({"estimator": "exact"}, where="strategy_args")


def test_apply_merge_delta_convention():
    g = {"w": np.array([1.0, 2.0], np.float32)}
    m = {"w": np.array([3.0, -2.0], np.float32)}
    np.testing.assert_array_equal(apply_merge(g, m, 0.5)["w"], [2.0, 0.0])
    np.testing.assert_array_equal(apply_merge(g, m, 0.0)["w"], g["w"])
    out = apply_merge(g, {"w": np.array([0.1, 1 / 3], np.float64)}, 1.0)["w"]
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.array([0.1, 1 / 3], np.float32))


# ----------------------------------------------------------------------------- fisher
def test_fisher_configures_the_fisher_task():
    s = strategies.build("fisher", estimator="sampled", max_examples=64, fisher_batch_size=8)
    msgs = start(s, {"w": [0.0]}, n_clients=3)
    assert len(msgs) == 3
    cfg = msgs[0].content.config_records["config"]
    assert (cfg["task"], cfg["fisher-estimator"], cfg["fisher-max-examples"],
            cfg["fisher-batch-size"]) == ("fisher", "sampled", 64, 8)
    assert cfg["server-round"] == 1 and cfg["lr"] == pytest.approx(0.1)


def test_fisher_merge_m3_and_fallback_to_global():
    # §8.1 M3 (no normalisation, equal λ): θ = [2.0, 1.5, 2.5]; floor 0 makes it exact.
    s = strategies.build("fisher", floor=0.0, weighting="uniform")
    start(s, {"w": [0.0, 0.0, 0.0]})
    arrays, metrics = s.aggregate_train(1, [
        reply(0, {"w": [1, 1, 1]}, fisher={"w": [1, 3, 0.5]}, n=5),
        reply(1, {"w": [3, 3, 3]}, fisher={"w": [1, 1, 1.5]}, n=50),
    ])
    np.testing.assert_allclose(w(arrays), [2.0, 1.5, 2.5], rtol=1e-7)
    assert metrics["clients"] == 2 and metrics["fisher_fallback_frac"] == 0.0
    # Where every client Fisher is 0 the previous global (here 7) is kept; ε = 1e-6 elsewhere
    # pulls each coordinate by ε/(ε + ΣλF) towards it.
    s = strategies.build("fisher")
    start(s, {"w": [7.0, 7.0, 7.0]})
    arrays, metrics = s.aggregate_train(1, [
        reply(0, {"w": [1, 1, 1]}, fisher={"w": [0, 3, 0.5]}, n=1),
        reply(1, {"w": [3, 3, 3]}, fisher={"w": [0, 1, 0]}, n=3),
    ])
    # λ = [0.25, 0.75]: coord 1 (0.25·3·1 + 0.75·1·3)/(0.25·3 + 0.75) = 2; coord 2 → client 0.
    eps = 1e-6
    expect = [7.0, (eps * 7 + 0.75 + 2.25) / (eps + 1.5), (eps * 7 + 0.125) / (eps + 0.125)]
    np.testing.assert_allclose(w(arrays), expect, rtol=1e-6)
    assert w(arrays)[0] == 7.0
    assert metrics["fisher_fallback_frac"] == pytest.approx(1 / 3)


def test_fisher_normalize_and_server_lr():
    # normalize: λ_k ∝ n_k / ‖F_k‖; F0 = [3, 4] (norm 5), F1 = [1, 0] (norm 1), n = [5, 1]
    s = strategies.build("fisher", floor=0.0, normalize=True, server_lr=0.5)
    start(s, {"w": [0.0, 0.0]})
    arrays, _ = s.aggregate_train(1, [
        reply(0, {"w": [1, 1]}, fisher={"w": [3, 4]}, n=5),
        reply(1, {"w": [5, 5]}, fisher={"w": [1, 0]}, n=1),
    ])
    lam = np.array([5 / 5, 1 / 1])  # equal after normalisation
    merged = [(lam[0] * 3 * 1 + lam[1] * 1 * 5) / (lam[0] * 3 + lam[1] * 1), 1.0]
    np.testing.assert_allclose(w(arrays), 0.5 * np.array(merged), rtol=1e-6)


def test_fisher_all_zero_keeps_global():
    s = strategies.build("fisher")
    start(s, {"w": [7.0, 7.0]})
    arrays, metrics = s.aggregate_train(1, [reply(0, {"w": [1, 1]}, fisher={"w": [0, 0]})])
    assert arrays is None and metrics["fisher_fallback_frac"] == 1.0


def test_fisher_rejects_bad_fisher_records():
    s = strategies.build("fisher", floor=0.0)
    start(s, {"w": [0.0, 0.0]})
    good = reply(0, {"w": [1, 1]}, fisher={"w": [1, 1]})
    bad = [
        reply(1, {"w": [9, 9]}, fisher={"w": [1, np.nan]}),
        reply(2, {"w": [9, 9]}, fisher={"w": [1, -0.5]}),
        reply(3, {"w": [9, 9]}, fisher={"w": [1, 1, 1]}),
        reply(4, {"w": [9, 9]}, fisher={"v": [1, 1]}),
        reply(5, {"w": [9, 9]}),  # no fisher record
        reply(6, {"w": [9, 9]}, fisher_record=to_record({"w": np.array([1, 1], np.int32)})),
        reply(7, {"w": [np.inf, 9]}, fisher={"w": [1, 1]}),  # the shared check on arrays
    ]
    arrays, metrics = s.aggregate_train(1, [*bad, good])
    assert metrics["rejected"] == 7 and metrics["clients"] == 1
    assert s.last_report.rejected_ids == [1, 2, 3, 4, 5, 6, 7]
    np.testing.assert_array_equal(w(arrays), [1.0, 1.0])


# ----------------------------------------------------------------------------- soups
def test_uniform_soup_ignores_example_counts_and_is_exact_on_equal_models():
    s = strategies.build("uniform-soup")
    start(s, {"w": [0.0]})
    arrays, _ = s.aggregate_train(1, [reply(0, {"w": [1.0]}, n=1), reply(1, {"w": [4.0]}, n=99)])
    assert w(arrays)[0] == pytest.approx(2.5)
    v = np.float32(0.1234567)
    start(s, {"w": [0.0]})
    arrays, _ = s.aggregate_train(1, [reply(c, {"w": [v]}) for c in range(3)])
    assert w(arrays)[0] == v  # bit for bit


def test_greedy_soup_reference_toy_and_tie_rule():
    val = ScalarValidation()
    s = strategies.build("greedy-soup", validation=val)
    start(s, {"w": [9.0]})
    thetas = [0.2, -0.3, 1.5, -0.1]
    arrays, m = s.aggregate_train(1, [reply(c, {"w": [t]}) for c, t in enumerate(thetas)])
    assert w(arrays)[0] == pytest.approx(0.05, abs=1e-7)  # soup {−0.1, 0.2}
    assert m["soup_size"] == 2 and m["best_client_val_accuracy"] == pytest.approx(-0.1)
    assert m["soup_val_accuracy"] == pytest.approx(-0.05, abs=1e-7)
    assert val.calls == 4 + 3  # K scores + K − 1 candidates
    for strict, expect in ((True, 0.5), (False, -0.5)):
        s = strategies.build("greedy-soup", validation=ScalarValidation(), strict=strict)
        start(s, {"w": [9.0]})
        arrays, _ = s.aggregate_train(1, [reply(0, {"w": [0.5]}), reply(1, {"w": [-1.5]})])
        assert w(arrays)[0] == expect
    # include_global: the previous global (0.0 here) beats every client and is kept alone
    s = strategies.build("greedy-soup", validation=ScalarValidation(), include_global=True)
    start(s, {"w": [0.0]})
    arrays, m = s.aggregate_train(1, [reply(0, {"w": [1.0]}), reply(1, {"w": [-3.0]})])
    assert w(arrays)[0] == 0.0 and m["global_in_soup"] == 1


class LinearValidation:
    """Softmax regression on 2-D points: class = sign of x₀; a real model for learned soups."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.x = rng.normal(size=(64, 2)).astype(np.float32)
        self.y = (self.x[:, 0] > 0).astype(np.int64)
        self.net = torch.nn.Linear(2, 2)

    def model(self):
        return self.net

    def _eval(self, arrays):
        from fedagg.training import evaluate, load_numpy_state

        load_numpy_state(self.net, arrays)
        return evaluate(self.net, torch.as_tensor(self.x), torch.as_tensor(self.y))

    def score(self, arrays):
        return self._eval(arrays)[1]

    def loss(self, arrays):
        return self._eval(arrays)[0]


def test_learned_soup_moves_weight_to_the_good_client():
    val = LinearValidation()
    good = {"weight": [[-4.0, 0.0], [4.0, 0.0]], "bias": [0.0, 0.0]}
    bad = {"weight": [[4.0, 0.0], [-4.0, 0.0]], "bias": [0.0, 0.0]}
    noise = {"weight": [[0.0, 3.0], [0.0, -3.0]], "bias": [0.0, 0.0]}
    s = strategies.build("learned-soup", validation=val, steps=60, lr=0.1)
    start(s, {"weight": np.zeros((2, 2)), "bias": np.zeros(2)})
    arrays, m = s.aggregate_train(1, [reply(0, bad), reply(1, good), reply(2, noise)])
    uniform_loss = val.loss({k: np.mean([np.float32(c[k]) for c in (good, bad, noise)], 0)
                             for k in good})
    assert m["soup_max_weight"] > 0.6
    assert m["soup_val_loss"] < uniform_loss - 0.1
    assert m["soup_val_loss"] == pytest.approx(val.loss(to_numpy(arrays)), rel=1e-6)
    assert m["soup_val_accuracy"] > 0.9
    # the loss the soup minimises is the server model's cross-entropy, via functional_call
    loss = held_out_loss(val.net, val.x, val.y)
    params = {k: torch.tensor(v, dtype=torch.float32) for k, v in good.items()}
    assert float(loss(params)) == pytest.approx(val.loss({k: np.float32(v) for k, v in good.items()}),
                                                rel=1e-6)


def test_temporal_soup_running_mean_state_and_reporting():
    s = strategies.build("temporal-soup", start_round=2, every=2)
    g = {"w": [0.0]}
    globals_, soups = [], []
    for rnd, target in enumerate([1.0, 2.0, 4.0, 8.0, 16.0], start=1):
        start(s, g, server_round=rnd)
        arrays, m = s.aggregate_train(rnd, [reply(0, {"w": [target]})])
        g = {"w": w(arrays)}
        globals_.append(float(g["w"][0]))
        soups.append(float(w(s.server_model(arrays))[0]))
        assert m["soup_count"] == {1: 0, 2: 1, 3: 1, 4: 2, 5: 2}[rnd]
    # SWA: clients train from the last global (FedAvg of one client = its model)
    assert globals_ == [1.0, 2.0, 4.0, 8.0, 16.0]
    # the soup averages the globals of rounds 2 and 4 (start_round=2, every=2)
    assert soups == [1.0, 2.0, 2.0, 5.0, 5.0]
    state = s.state_dict()
    assert state["count"].tolist() == [2] and state["soup/w"].dtype == np.float64
    restored = strategies.build("temporal-soup")
    restored.load_state_dict(state)
    assert float(w(restored.server_model(arrays))[0]) == 5.0
    with pytest.raises(ValueError):
        restored.load_state_dict({"count": np.array([1])})
    # train_from=soup: the broadcast model is the soup
    s = strategies.build("temporal-soup", train_from="soup")
    for rnd, target in enumerate([2.0, 4.0], start=1):
        start(s, {"w": [0.0]}, server_round=rnd)
        arrays, _ = s.aggregate_train(rnd, [reply(0, {"w": [target]})])
    assert float(w(arrays)[0]) == 3.0


# ----------------------------------------------------------------------------- end to end
TINY = {"dataset": "mnist1d", "dataset_args": {"num_samples": 400}, "num_clients": 4,
        "partition": "dirichlet", "alpha": 0.3, "model": "cnn", "model_args": {"channels": 4},
        "local_steps": 3, "batch_size": 16, "lr": 0.1, "engine": "inline"}


def run_tiny(tmp_path, strategy: str, rounds: int = 2, capture: bool = False, **extra):
    from simulations.core.config import build_config
    from simulations.core.runner import Simulation

    cfg = build_config({**TINY, "strategy": strategy, "rounds": rounds, "out": str(tmp_path / strategy),
                        **extra})
    sim = Simulation(cfg)
    seen: list[tuple[ArrayRecord, list[Message], ArrayRecord | None]] = []
    if capture:
        original = sim.strategy.aggregate_accepted

        def spy(rnd, replies):
            out = original(rnd, replies)
            seen.append((sim.strategy.current_global, replies, out[0]))
            return out

        sim.strategy.aggregate_accepted = spy
    return sim, sim.run(), seen


def test_fisher_strategy_end_to_end(tmp_path):
    sim, result, seen = run_tiny(tmp_path, "fisher", capture=True,
                                 strategy_args={"max_examples": 16})
    rows = result.rows
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["bytes_up"] == 2 * r["bytes_down"] for r in rows[1:])  # model + Fisher
    assert all(0.0 <= r["fisher_fallback_frac"] < 0.5 and 0 < r["fisher_examples"] <= 16
               for r in rows[1:])
    for _, replies, _ in seen:
        assert len(replies) == 4
        for msg in replies:
            f = to_numpy(msg.content.array_records["fisher"])
            m = to_numpy(msg.content.array_records["arrays"])
            assert list(f) == list(m) and all(f[k].shape == m[k].shape for k in m)
            assert all(np.all(f[k] >= 0) for k in f) and sum(float(v.sum()) for v in f.values()) > 0
    np.testing.assert_array_equal(to_numpy(seen[-1][2])["head.bias"], result.arrays["head.bias"])


def test_fisher_task_matches_diagonal_fisher_at_the_local_model(tmp_path):
    from fedagg.merging import diagonal_fisher
    from fedagg.training import load_numpy_state, local_sgd
    from simulations.core.tasks.merging import client_fisher

    sim, _, seen = run_tiny(tmp_path, "fisher", rounds=1, capture=True,
                            strategy_args={"max_examples": 1000})
    broadcast, replies, _ = seen[0]
    msg = replies[0]
    cid = int(msg.metadata.src_node_id)
    rt = sim.runtime
    model = rt.model()
    load_numpy_state(model, to_numpy(broadcast))
    t = rt.tensors(cid)
    local_sgd(model, t.x, t.y, rt.train_config(ConfigRecord()), rt.generator("local-train", 1, cid))
    local = to_numpy(msg.content.array_records["arrays"])
    for k, v in local.items():  # the task's local model is the client's local SGD result
        np.testing.assert_allclose(v, model.state_dict()[k].numpy(), rtol=1e-5, atol=1e-7)
    load_numpy_state(model, local)  # (bit for bit up to torch's thread count)
    expect = diagonal_fisher(model, t.x)  # all of the client's examples (max_examples ≥ n)
    got = to_numpy(msg.content.array_records["fisher"])
    for k in got:
        np.testing.assert_allclose(got[k], expect[k].numpy(), rtol=1e-5, atol=1e-9)
    # a subset is a seeded draw and buffers/frozen entries get a zero Fisher
    model.head.bias.requires_grad_(False)
    f1, used = client_fisher(model, t.x, t.y, estimator="true", max_examples=5, batch_size=4,
                             subset=rt.generator("fisher-subset", 1, cid),
                             labels=rt.generator("fisher-labels", 1, cid))
    f2, _ = client_fisher(model, t.x, t.y, estimator="true", max_examples=5, batch_size=2,
                          subset=rt.generator("fisher-subset", 1, cid),
                          labels=rt.generator("fisher-labels", 1, cid))
    model.head.bias.requires_grad_(True)
    assert used == 5 and np.all(f1["head.bias"] == 0) and f1["head.weight"].sum() > 0
    for k in f1:
        np.testing.assert_allclose(f1[k], f2[k], rtol=1e-5, atol=1e-10)


def test_greedy_soup_strategy_never_worse_than_best_client_on_validation(tmp_path):
    sim, result, seen = run_tiny(tmp_path, "greedy-soup", rounds=3, capture=True, local_steps=8)
    val = sim.strategy.validation
    assert len(val.y) > 0
    for (_, replies, new), row in zip(seen, result.rows[1:], strict=True):
        clients = [val.score(to_numpy(m.content.array_records["arrays"])) for m in replies]
        chosen = val.score(to_numpy(new))
        assert chosen >= max(clients)
        assert chosen == pytest.approx(row["soup_val_accuracy"])
        assert max(clients) == pytest.approx(row["best_client_val_accuracy"])
    # the validation split is the clients' held-out parts, not the server test set
    n_held_out = sum(len(t) for t in sim.data.client_test)
    assert len(val.y) == n_held_out


def test_temporal_soup_reports_and_saves_the_soup(tmp_path):
    from simulations.core.results import load_arrays

    sim, result, seen = run_tiny(tmp_path, "temporal-soup", rounds=3, capture=True)
    globals_ = [to_numpy(new) for _, _, new in seen]
    soup = {k: np.mean([g[k].astype(np.float64) for g in globals_], 0).astype(np.float32)
            for k in globals_[0]}
    saved = load_arrays(result.run_dir / "model.safetensors")
    for k in soup:
        np.testing.assert_allclose(saved[k], soup[k], rtol=1e-5, atol=1e-6)
    assert not np.array_equal(saved["head.weight"], globals_[-1]["head.weight"])
    state = load_arrays(result.run_dir / "strategy_state.safetensors")
    assert state["count"].tolist() == [3]
    restored = strategies.build("temporal-soup")
    restored.load_state_dict(state)  # from the file
    assert restored.count == 3 and np.array_equal(to_numpy(restored.server_model(seen[-1][2]))["head.bias"],
                                                  saved["head.bias"])
    loss, acc = sim.evaluate(to_record(saved))
    assert acc == pytest.approx(result.rows[-1]["test_accuracy"])


def test_temporal_soup_resumes_bit_for_bit_from_a_checkpoint(tmp_path):
    import shutil

    from simulations.core.config import build_config
    from simulations.core.runner import Simulation

    _, full, _ = run_tiny(tmp_path, "temporal-soup", rounds=4, checkpoint_every=2)
    part = tmp_path / "part"
    shutil.copytree(full.run_dir, part)
    (part / "summary.json").unlink()
    shutil.rmtree(part / "checkpoints" / "round-000004")
    (part / "checkpoints" / "latest").write_text("round-000002\n")
    cfg = build_config({**TINY, "strategy": "temporal-soup", "rounds": 4, "checkpoint_every": 2,
                        "out": str(part)})
    resumed = Simulation(cfg, resume=True)
    assert resumed.strategy.count == 2  # the running mean came back from the checkpoint
    result = resumed.run()
    for k, v in full.arrays.items():
        assert v.tobytes() == result.arrays[k].tobytes()
    assert [r["test_accuracy"] for r in result.rows] == [r["test_accuracy"] for r in full.rows]
