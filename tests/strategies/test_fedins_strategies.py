"""FedIns strategy: task config, slot-wise averaging (uniform / by examples), frozen tensors untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

import strategies
from fedagg.errors import ConfigError
from fedagg.models import build_model
from fedagg.models.fedins import frozen_state
from fedagg.training import load_numpy_state, state_to_numpy
from simulations.core.engine.sim_grid import SimGrid
from strategies.arrays import to_numpy, to_record
from strategies.flower_compat import ensure_task_identity

QUICK = {"backbone": "mnist1d-transformer-quick"}


class _NoExecutor:
    def submit(self, jobs):  # pragma: no cover - never called here
        raise AssertionError("no message is sent in these tests")


def _strategy(**kw):
    params = {"num_clients": 3, "seed": 0, **kw}
    return strategies.build("fedins", **params)


def _model(kind: str = "fedins", **extra):
    return build_model(kind, (40,), 10, seed=0, params={**QUICK, "pool_size": 4, "top_k": 2, **extra}
                       if kind == "fedins" else {**QUICK, **extra})


def _configure(strategy, arrays: dict[str, np.ndarray], n: int = 3, config=None):
    ensure_task_identity()
    grid = SimGrid(n, _NoExecutor())
    return list(strategy.configure_train(1, to_record(arrays), config or ConfigRecord({"lr": 0.1}),
                                         grid))


def _reply(msg: Message, arrays: dict[str, np.ndarray], n_ex: int) -> Message:
    content = RecordDict({"arrays": to_record(arrays),
                          "metrics": MetricRecord({"num-examples": n_ex, "train_loss": 1.0})})
    return Message(content, reply_to=msg)


def _perturbed(arrays, seed):
    rng = np.random.default_rng(seed)
    return {k: (v + rng.normal(0, 0.1, v.shape)).astype(v.dtype) for k, v in arrays.items()}


def test_configure_train_asks_clients_for_the_fedins_task():
    model = _model()
    msgs = _configure(_strategy(lam=0.3, optimizer="adam"), state_to_numpy(model))
    assert sorted(int(m.metadata.dst_node_id) for m in msgs) == [0, 1, 2]
    cfg = msgs[0].content.config_records["config"]
    assert cfg["task"] == "fedins" and cfg["optimizer"] == "adam" and cfg["lr"] == 0.1
    assert cfg["fedins-lambda"] == pytest.approx(0.3)
    sent = to_numpy(msgs[0].content.array_records["arrays"])
    # exactly the pool travels: 1 keys + 2 head pools + (scale, shift) per site
    assert set(sent) == {n for n, _ in model.named_pool_parameters()}
    assert len(sent) == 3 + 2 * len(model.sites)
    assert sent["keys"].shape == (4, 16) and sent["head_weight"].shape == (4, 10, 16)


def test_strategy_needs_the_fedins_model():
    arrays = state_to_numpy(_model("ssf"))
    with pytest.raises(ConfigError, match="model: fedins"):
        _configure(_strategy(), arrays)


@pytest.mark.parametrize("weighting", ["uniform", "num_examples"])
def test_slotwise_average(weighting):
    model = _model()
    g = state_to_numpy(model)
    strat = _strategy(weighting=weighting)
    msgs = _configure(strat, g)
    locals_ = [_perturbed(g, s) for s in range(3)]
    n_ex = [10, 20, 70]
    replies = [_reply(m, a, n) for m, a, n in zip(msgs, locals_, n_ex, strict=True)]
    new, metrics = strat.aggregate_train(1, replies)
    out = to_numpy(new)
    w = np.full(3, 1 / 3) if weighting == "uniform" else np.array(n_ex) / 100
    for name in g:
        expect = sum(wi * a[name].astype(np.float64) for wi, a in zip(w, locals_, strict=True))
        np.testing.assert_allclose(out[name], expect, rtol=0, atol=1e-6)
        assert out[name].dtype == np.float32
    # slot i of the result depends on slot i of the clients only: keys row 2
    expect_row = sum(wi * a["keys"][2].astype(np.float64) for wi, a in zip(w, locals_, strict=True))
    np.testing.assert_allclose(out["keys"][2], expect_row, atol=1e-6)
    assert metrics["clients"] == 3 and metrics["rejected"] == 0


def test_uniform_and_weighted_differ():
    g = state_to_numpy(_model())
    outs = []
    for weighting in ("uniform", "num_examples"):
        strat = _strategy(weighting=weighting)
        msgs = _configure(strat, g)
        new, _ = strat.aggregate_train(1, [_reply(m, _perturbed(g, s), n)
                                           for s, (m, n) in enumerate(zip(msgs, [1, 1, 8], strict=True))])
        outs.append(to_numpy(new)["keys"])
    assert np.abs(outs[0] - outs[1]).max() > 1e-3


@pytest.mark.parametrize("kind", ["fedins", "ssf", "head-only"])
def test_server_aggregation_leaves_frozen_tensors_untouched(kind):
    server = _model(kind)
    frozen_before = frozen_state(server)
    assert frozen_before, "a frozen backbone is expected"
    g = state_to_numpy(server)
    strat = _strategy() if kind == "fedins" else strategies.build("fedavg", num_clients=3, seed=0)
    msgs = _configure(strat, g)
    locals_ = [_perturbed(g, 10 + s) for s in range(3)]
    # a client that also sends (changed) backbone weights is rejected, not merged
    rogue = dict(locals_[2])
    bb_name, bb_value = next(iter(frozen_before.items()))
    rogue[bb_name] = bb_value.numpy() + 1.0
    replies = [_reply(msgs[0], locals_[0], 5), _reply(msgs[1], locals_[1], 5),
               _reply(msgs[2], rogue, 5)]
    new, metrics = strat.aggregate_train(1, replies)
    assert metrics["rejected"] == 1 and metrics["clients"] == 2
    out = to_numpy(new)
    assert set(out) == set(g)
    load_numpy_state(server, out)
    after = frozen_state(server)
    assert after.keys() == frozen_before.keys()
    for name, value in frozen_before.items():
        assert torch.equal(after[name], value), name
    fed = state_to_numpy(server)
    for name in g:
        np.testing.assert_allclose(fed[name], (locals_[0][name] + locals_[1][name]) / 2, atol=1e-6)
        assert np.abs(fed[name] - g[name]).max() > 0  # the federated part did move


def test_fedins_params_are_validated():
    with pytest.raises(ConfigError, match="weighting"):
        _strategy(weighting="median")
    with pytest.raises(ConfigError, match="lam"):
        _strategy(lam=1.5)
