"""The batched client path inside the engines: chunk planning, and equality with the per-client path."""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from simulations.core.config import load_config
from simulations.core.engine.executors import Job, plan_chunks
from simulations.core.runner import Simulation
from strategies.flower_compat import ensure_task_identity

ensure_task_identity()


def _jobs(cids, content=None, kind=MessageType.TRAIN) -> list[Job]:
    content = content if content is not None else RecordDict({"config": ConfigRecord({"server-round": 1})})
    return [Job(f"m{c}", c, Message(content, c, kind)) for c in cids]


def test_chunks_are_cut_by_client_id_into_near_equal_parts() -> None:
    jobs = _jobs([9, 3, 7, 1, 5, 0, 2])
    chunks = plan_chunks(jobs, batch_limit=3)
    assert [[j.client_id for j in c] for c in chunks] == [[0, 1, 2], [3, 5], [7, 9]]
    # the cut depends on the set of jobs only, not on their order
    again = plan_chunks(list(reversed(jobs)), batch_limit=3)
    assert [[j.client_id for j in c] for c in again] == [[0, 1, 2], [3, 5], [7, 9]]
    assert [[j.client_id for j in c] for c in plan_chunks(jobs, batch_limit=100)] == [[0, 1, 2, 3, 5, 7, 9]]


def test_other_messages_pools_and_isolated_clients_get_chunks_of_their_own() -> None:
    train = _jobs([0, 1, 2, 3])
    other = _jobs([4], kind=MessageType.EVALUATE)
    second = _jobs([5, 6])  # another broadcast content: never batched with the first
    chunks = plan_chunks([*train, *other, *second], batch_limit=10, pool_of=lambda c: c % 2,
                         alone=lambda j: j.client_id == 2)
    got = sorted(sorted(j.client_id for j in c) for c in chunks)
    assert got == [[0], [1, 3], [2], [4], [5], [6]]
    assert all(len(c) == 1 for c in plan_chunks(train, batch_limit=None))


def _run(tmp_path, name: str, **over):
    cfg = load_config(None, {"engine": "inline", "rounds": 3, "num_clients": 8, "model": "mlp",
                             "local_steps": 4, "batch_size": 16, "momentum": 0.9, "weight_decay": 1e-3,
                             "partition": "dirichlet", "alpha": 0.3, "dataset_args": {"num_samples": 800},
                             "participation": {"process": "bernoulli", "probabilities": {
                                 "kind": "constant", "p": 0.6}},
                             "strategy": "fedau", "out": str(tmp_path / name), **over})
    return Simulation(cfg).run()


def test_batched_engine_equals_the_per_client_path_and_is_deterministic(tmp_path) -> None:
    batched = _run(tmp_path, "batched")
    again = _run(tmp_path, "again")
    plain = _run(tmp_path, "plain", batched_clients=False)
    for k in plain.arrays:
        np.testing.assert_allclose(batched.arrays[k], plain.arrays[k], rtol=0, atol=1e-5)
        assert batched.arrays[k].tobytes() == again.arrays[k].tobytes()
    assert [r["clients"] for r in batched.rows] == [r["clients"] for r in plain.rows]
    losses = [(a["train_loss"], b["train_loss"]) for a, b in zip(batched.rows[1:], plain.rows[1:], strict=True)]
    np.testing.assert_allclose(*zip(*losses, strict=True), rtol=1e-5)


def test_tiny_memory_budget_cuts_rounds_into_several_batches(tmp_path) -> None:
    """batch_memory_mb bounds the clients per batched call; the results do not change beyond rounding."""
    whole = _run(tmp_path, "whole")
    sim_cfg = {"batch_memory_mb": 0.2}
    cut = _run(tmp_path, "cut", **sim_cfg)
    from simulations.core.client_app import ClientRuntime

    rt = ClientRuntime(load_config(None, {"model": "mlp", "num_clients": 8, "dataset_args": {"num_samples": 800},
                                          **sim_cfg}))
    assert rt.batch_limit() < 8
    for k in whole.arrays:
        np.testing.assert_allclose(cut.arrays[k], whole.arrays[k], rtol=0, atol=1e-5)
