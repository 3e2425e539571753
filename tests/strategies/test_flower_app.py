"""Our per-client-state strategies inside a user's own Flower app (stock ``run_simulation``).

Flower gives nodes random 64-bit ids; the strategies must map them to their own rows. One
``run_simulation`` (one Ray start) runs a ServerApp whose ``main`` calls ``strategy.start`` for
each strategy in turn on the same grid; the ClientApp trains a softmax regression (numpy) on a
small linearly separable synthetic dataset of its partition. Each final model must classify a
held-out set well above chance (1/3).
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

import strategies
from strategies.arrays import to_numpy, to_record

NUM_NODES = 5
NUM_CLASSES = 3
DIM = 4
ROUNDS = 4
#: The per-client-state strategies (they must map Flower's node ids to their own rows).
NAMES = ("fedavg", "fedau", "known-p", "mifa", "fedvarp")
#: Every other strategy that needs nothing but replies of a plain train task: they must run in a
#: stock Flower app too (fedins and fisher ask clients for their own tasks; greedy/learned soups
#: need a server validation split).
OTHERS = tuple(n for n in strategies.names() if n not in (*NAMES, "fedins", "fisher", "greedy-soup",
                                                          "learned-soup"))
#: Class means, far apart relative to the unit noise: the classes are (almost) separable.
MEANS = 3.0 * np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])


def make_data(seed: int, n: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """``x: (n, DIM)`` float64, ``y: (n,)`` int: Gaussian blobs around :data:`MEANS`."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, NUM_CLASSES, size=n)
    return MEANS[y] + rng.normal(size=(n, DIM)), y


def softmax_grads(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Gradients of the mean cross-entropy of ``softmax(x @ w + b)`` w.r.t. ``w (DIM, K)``, ``b (K,)``."""
    z = x @ w + b
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    return x.T @ p / len(y), p.mean(axis=0)


def accuracy(arrays: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.argmax(x @ arrays["w"] + arrays["b"], axis=1) == y))


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Five full-batch gradient steps (lr 0.5) on this partition's data."""
    pid = int(context.node_config["partition-id"])
    x, y = make_data(seed=100 + pid)
    arrays = to_numpy(msg.content.array_records["arrays"])
    w, b = arrays["w"].copy(), arrays["b"].copy()
    for _ in range(5):
        gw, gb = softmax_grads(w, b, x, y)
        w -= 0.5 * gw
        b -= 0.5 * gb
    reply = RecordDict({"arrays": to_record({"w": w, "b": b}),
                        "metrics": MetricRecord({"num-examples": len(y)})})
    return Message(reply, reply_to=msg)


def build(name: str, node_ids: list[int]) -> Any:
    """The strategy as a user would build it; known-p gets its p_n in the order of ``node_ids``."""
    if name == "known-p":
        return strategies.build(name, num_clients=NUM_NODES, probabilities=[1.0] * NUM_NODES,
                                node_ids=node_ids)
    return strategies.build(name, num_clients=NUM_NODES)


@pytest.fixture(scope="module")
def finals() -> dict[str, Any]:
    """``{name: final arrays | exception}`` from one stock run_simulation."""
    for key, value in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}.items():
        os.environ.setdefault(key, value)
    from flwr.simulation import run_simulation

    out: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        initial = to_record({"w": np.zeros((DIM, NUM_CLASSES)), "b": np.zeros(NUM_CLASSES)})
        # Our strategies train the nodes the grid reports each round and do not wait for more
        # (Flower's sample_nodes does); wait until every supernode has registered.
        deadline = time.monotonic() + 300
        while len(list(grid.get_node_ids())) < NUM_NODES and time.monotonic() < deadline:
            time.sleep(0.1)
        node_ids = sorted(int(n) for n in grid.get_node_ids())
        out["node_ids"] = node_ids
        for name in (*NAMES, *OTHERS):
            try:
                result = build(name, node_ids).start(grid=grid, initial_arrays=initial,
                                                     num_rounds=ROUNDS)
                out[name] = to_numpy(result.arrays)
            except Exception as exc:  # recorded per strategy, asserted in the test
                out[name] = exc

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=NUM_NODES,
                   backend_config={"client_resources": {"num_cpus": 1},
                                   "init_args": {"include_dashboard": False,
                                                 "logging_level": "WARNING"}})
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_strategy_trains_a_linear_model_in_stock_run_simulation(finals, name):
    assert len(finals["node_ids"]) == NUM_NODES
    assert max(finals["node_ids"]) >= NUM_NODES  # Flower's ids, not 0..N-1
    final = finals[name]
    assert not isinstance(final, Exception), f"{name}: {type(final).__name__}: {final}"
    x, y = make_data(seed=999, n=300)
    assert accuracy(final, x, y) >= 0.8, name
    assert isinstance(final, dict) and set(final) == {"w", "b"}


@pytest.mark.slow
@pytest.mark.parametrize("name", OTHERS)
def test_every_other_strategy_runs_in_stock_run_simulation(finals, name):
    final = finals[name]
    assert not isinstance(final, Exception), f"{name}: {type(final).__name__}: {final}"
    assert set(final) == {"w", "b"} and all(np.all(np.isfinite(v)) for v in final.values())
    x, y = make_data(seed=999, n=300)
    assert accuracy(final, x, y) >= 0.6, name  # chance is 1/3; Flower's adaptive rules move slowly


def test_the_linear_client_learns_on_its_own():
    """Control for the test above: the local recipe is enough to learn the task."""
    x, y = make_data(seed=100)
    w, b = np.zeros((DIM, NUM_CLASSES)), np.zeros(NUM_CLASSES)
    for _ in range(5 * ROUNDS):
        gw, gb = softmax_grads(w, b, x, y)
        w, b = w - 0.5 * gw, b - 0.5 * gb
    xt, yt = make_data(seed=999, n=300)
    assert accuracy({"w": w, "b": b}, xt, yt) >= 0.8
