"""FedAU weight estimator, server update and baselines (fedagg.fedau, fedagg.fedau_baselines).

Reference: ../shared/reference/fedau_flag.md §1.1 (per-round bookkeeping), §1.2 (lazy form),
§1.3 (baselines), §5.2 (weight table).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedagg.fedau import FedAUWeights, fedau_update
from fedagg.fedau_baselines import (
    FedVarpMemory,
    MIFAMemory,
    average_all,
    average_participating,
    known_prob,
)

# ---------------------------------------------------------------------------------------------
# test oracle: the reference's direct per-round bookkeeping (§1.1), not the lazy form
# ---------------------------------------------------------------------------------------------


def direct_bookkeeping(trace: np.ndarray, cutoff: int | None):
    """Per-round loop over all clients with a counter and interval lists.

    trace: (T, N) 0/1. Returns ({round: {client: weight}}, final intervals per client).
    """
    rounds, n_clients = trace.shape
    cnt = [0] * n_clients
    intervals: list[list[int]] = [[] for _ in range(n_clients)]
    weights: dict[int, dict[int, float]] = {}
    for t in range(rounds):
        for n in range(n_clients):
            if trace[t, n]:
                w = sum(intervals[n]) / len(intervals[n]) if intervals[n] else 1.0
                weights.setdefault(t, {})[n] = w
                intervals[n].append(cnt[n] + 1)
                cnt[n] = 0
            else:
                cnt[n] += 1
                if cutoff is not None and cnt[n] >= cutoff:
                    intervals[n].append(cnt[n])
                    cnt[n] = 0
    return weights, intervals


def _participations(bits: str) -> list[int]:
    return [t for t, b in enumerate(bits) if b == "1"]


# ---------------------------------------------------------------------------------------------
# §5.2 weight table
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bits,cutoff,expected",
    [
        ("1001101", None, [1.0, 1.0, 2.0, 5 / 3]),  # None (= weight 1) first
        ("000101000001", None, [1.0, 4.0, 3.0]),
        ("000101000001", 3, [3.0, 2.0, 2.25]),
        ("000000011", 2, [2.0, 2.0]),
    ],
)
def test_reference_weight_table(bits, cutoff, expected):
    est = FedAUWeights(1, cutoff=cutoff)
    got = [est.step(t, [0])[0] for t in _participations(bits)]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert round(got[-1], 4) == round(expected[-1], 4)
    # the oracle agrees with the table too
    trace = np.array([[int(b)] for b in bits])
    ref, _ = direct_bookkeeping(trace, cutoff)
    assert [ref[t][0] for t in _participations(bits)] == got


# ---------------------------------------------------------------------------------------------
# lazy form == direct bookkeeping on many random traces
# ---------------------------------------------------------------------------------------------


def test_lazy_form_equals_direct_bookkeeping_on_random_traces():
    rng = np.random.default_rng(2024)
    checked = 0
    for _ in range(400):
        n_clients = int(rng.integers(1, 9))
        rounds = int(rng.integers(1, 70))
        cutoff = [None, 1, 2, 3, 5, 10, 40][int(rng.integers(7))]
        p = rng.uniform(0, 1, n_clients) ** rng.choice([1, 3])  # many small p too
        p[rng.random(n_clients) < 0.1] = 0.0
        trace = (rng.random((rounds, n_clients)) < p).astype(int)
        ref, intervals = direct_bookkeeping(trace, cutoff)

        est = FedAUWeights(n_clients, cutoff=cutoff)
        for t in range(rounds):
            ids = np.flatnonzero(trace[t])
            if ids.size == 0 and rng.random() < 0.5:
                continue  # rounds never passed to step() are rounds without participants
            ids = rng.permutation(ids)  # any order; weights come back in that order
            w = est.step(t, ids.tolist() if rng.random() < 0.3 else ids)
            assert w.dtype == np.float64 and w.shape == ids.shape
            assert w.tolist() == [ref[t][int(n)] for n in ids]  # exact equality
            checked += ids.size
        # the view at the next round equals the mean of the intervals recorded so far
        expected_view = [sum(iv) / len(iv) if iv else 1.0 for iv in intervals]
        assert est.weights(round=rounds).tolist() == expected_view
        # the lazy state plus the cut-offs still pending equals the recorded intervals
        state = est.state_dict()
        pending = (rounds - 1 - state["last_participation"]) // cutoff if cutoff else 0
        k = cutoff or 0
        assert (state["interval_sum"] + k * pending).tolist() == [sum(iv) for iv in intervals]
        assert (state["interval_count"] + pending).tolist() == [len(iv) for iv in intervals]
    assert checked > 3000


# ---------------------------------------------------------------------------------------------
# statistics: E[min(G, K)] and ω -> 1/p
# ---------------------------------------------------------------------------------------------


def test_cutoff_estimates_expected_truncated_interval():
    # §1.1 remark: under Bernoulli(p), E[min(G, K)] = (1 - (1 - p)^K) / p; p = 0.02, K = 50 -> 31.8
    p, k = 0.02, 50
    closed_form = (1 - (1 - p) ** k) / p
    assert abs(closed_form - 31.8) < 0.05
    rng = np.random.default_rng(0)
    n_clients, rounds = 1000, 5000
    est = FedAUWeights(n_clients, cutoff=k)
    for t in range(rounds):
        est.step(t, np.flatnonzero(rng.random(n_clients) < p))
    # pooled over clients, including cut-offs accrued up to the next round
    w = est.weights()
    state = est.state_dict()
    cuts = (rounds - state["last_participation"] - 1) // k
    pooled = (state["interval_sum"] + k * cuts).sum() / (state["interval_count"] + cuts).sum()
    assert abs(pooled - closed_form) < 0.3
    assert abs(w.mean() - closed_form) < 0.5
    assert w.mean() < 35  # far from 1/p = 50: the cut-off biases the weight down


def test_weights_converge_to_inverse_probability():
    rng = np.random.default_rng(1)
    n_clients, rounds = 100, 5000
    p = rng.uniform(0.05, 0.9, n_clients)
    est = FedAUWeights(n_clients)
    for t in range(rounds):
        est.step(t, np.flatnonzero(rng.random(n_clients) < p))
    w = est.weights()
    m = est.state_dict()["interval_count"]
    sigma = np.sqrt((1 - p) / p**2 / m)  # std of the mean of m geometric intervals
    assert np.all(np.abs(w - 1 / p) <= 4.5 * sigma)
    assert abs(np.mean(w * p) - 1) < 0.02


# ---------------------------------------------------------------------------------------------
# API contract
# ---------------------------------------------------------------------------------------------


def test_round_order_and_id_validation_leave_state_untouched():
    est = FedAUWeights(5, cutoff=4)
    est.step(2, [1, 3])
    before = est.state_dict()
    bad_calls = [
        (2, [0]),  # repeated round
        (1, [0]),  # decreasing round
        (3, [0, 0]),  # duplicate id
        (3, [0, 5]),  # out of range
        (3, [-1]),
        (3, [0.5]),  # not integers
        (3, [True]),
        (3, [[0, 1]]),  # not 1-D
        (3.5, [0]),
    ]
    for rnd, ids in bad_calls:
        with pytest.raises(ValueError):
            est.step(rnd, ids)
    after = est.state_dict()
    assert after["round"] == before["round"] == 2
    for key in ("interval_sum", "interval_count", "last_participation"):
        np.testing.assert_array_equal(after[key], before[key])
    assert est.step(3, []).shape == (0,)
    assert est.round == 3
    with pytest.raises(ValueError):
        est.weights(round=3)
    with pytest.raises(ValueError):
        FedAUWeights(3, cutoff=0)


def test_first_round_offsets_the_origin():
    a, b = FedAUWeights(2), FedAUWeights(2, first_round=1)
    for t, ids in [(0, [0]), (1, [0, 1]), (4, [1]), (5, [0, 1])]:
        np.testing.assert_array_equal(a.step(t, ids), b.step(t + 1, ids))
    with pytest.raises(ValueError):
        FedAUWeights(2, first_round=1).step(0, [0])


def test_state_dict_roundtrip_and_memory():
    rng = np.random.default_rng(3)
    p = rng.uniform(0.05, 0.5, 30)
    trace = rng.random((200, 30)) < p
    full = FedAUWeights(30, cutoff=7)
    expected = [full.step(t, np.flatnonzero(trace[t])) for t in range(200)]

    est = FedAUWeights(30, cutoff=7)
    got = [est.step(t, np.flatnonzero(trace[t])) for t in range(120)]
    state = est.state_dict()
    est.step(120, [0, 1, 2])  # the checkpoint holds copies
    resumed = FedAUWeights(30, cutoff=7)
    resumed.load_state_dict(state)
    got += [resumed.step(t, np.flatnonzero(trace[t])) for t in range(120, 200)]
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_array_equal(e, g)
    assert est.state_nbytes == 3 * 8 * 30
    with pytest.raises(ValueError, match="cutoff"):
        FedAUWeights(30, cutoff=None).load_state_dict(state)
    with pytest.raises(ValueError, match="clients"):
        FedAUWeights(31, cutoff=7).load_state_dict(state)


def test_step_does_not_mutate_inputs():
    ids = np.array([4, 0, 2])
    est = FedAUWeights(5)
    est.step(0, ids)
    est.step(3, ids)
    assert ids.tolist() == [4, 0, 2]
    np.testing.assert_array_equal(est.weights(), [2.0, 1.0, 2.0, 1.0, 2.0])


# ---------------------------------------------------------------------------------------------
# server updates
# ---------------------------------------------------------------------------------------------

DELTAS = np.array([[1.0, 2.0, 0.0], [3.0, -1.0, 4.0]])


def test_fedau_update_numbers_and_kinds():
    got = fedau_update(DELTAS, [2.0, 0.5], num_clients=10, lr=2.0)
    np.testing.assert_allclose(got, 2.0 / 10 * (2 * DELTAS[0] + 0.5 * DELTAS[1]))
    np.testing.assert_array_equal(fedau_update(np.zeros((0, 3)), [], 10), np.zeros(3))
    f32 = fedau_update(DELTAS.astype(np.float32), np.array([1.0, 1.0]), 4)
    assert f32.dtype == np.float32
    np.testing.assert_allclose(f32, DELTAS.sum(0) / 4, rtol=1e-6)
    t = fedau_update(torch.tensor(DELTAS, dtype=torch.float32), torch.tensor([1.0, 3.0]), 2)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    np.testing.assert_allclose(t.numpy(), (DELTAS[0] + 3 * DELTAS[1]) / 2, rtol=1e-6)
    assert fedau_update(np.array([[1, 2]]), [1.0], 1).dtype == np.float64
    with pytest.raises(ValueError):
        fedau_update(DELTAS, [1.0], 10)
    with pytest.raises(ValueError):
        fedau_update(DELTAS[0], [1.0], 10)


def test_fedau_update_is_unbiased_with_inverse_probability_weights():
    # E[Σ_{n∈S} (1/p_n) Δ_n / N] = mean_n Δ_n: exact expectation over all 2^3 subsets
    p = np.array([0.2, 0.5, 0.9])
    deltas = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    expect = np.zeros(2)
    for mask in range(8):
        s = np.array([(mask >> i) & 1 for i in range(3)], dtype=bool)
        prob = np.prod(np.where(s, p, 1 - p))
        expect += prob * fedau_update(deltas[s], 1 / p[s], num_clients=3)
    np.testing.assert_allclose(expect, deltas.mean(0), atol=1e-12)


def test_stateless_baselines():
    np.testing.assert_allclose(average_participating(DELTAS, lr=3.0), 3.0 * DELTAS.mean(0))
    np.testing.assert_array_equal(average_participating(np.zeros((0, 3))), np.zeros(3))
    np.testing.assert_allclose(average_all(DELTAS, num_clients=8), DELTAS.sum(0) / 8)
    np.testing.assert_allclose(
        known_prob(DELTAS, [0.25, 0.5], num_clients=4, lr=0.5),
        0.5 * (4 * DELTAS[0] + 2 * DELTAS[1]) / 4,
    )
    with pytest.raises(ValueError):
        known_prob(DELTAS, [0.0, 0.5], num_clients=4)
    t = average_participating(torch.tensor(DELTAS))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float64


def _random_rounds(rng, n_clients=6, dim=3, rounds=30):
    for _ in range(rounds):
        ids = rng.permutation(n_clients)[: int(rng.integers(0, n_clients + 1))]
        yield ids, rng.normal(size=(ids.size, dim))


def test_mifa_matches_direct_formula():
    rng = np.random.default_rng(4)
    mifa = MIFAMemory(6, 3)
    y = np.zeros((6, 3))
    for ids, deltas in _random_rounds(rng):
        step = mifa.step(ids, deltas, lr=0.7)
        if ids.size == 0:
            np.testing.assert_array_equal(step, 0.0)
            continue
        y[ids] = deltas
        np.testing.assert_allclose(step, 0.7 * y.sum(0) / 6, atol=1e-12)
    np.testing.assert_allclose(mifa.state_dict()["memory"], y)


def test_fedvarp_matches_direct_formula_and_resumes():
    rng = np.random.default_rng(5)
    varp = FedVarpMemory(6, 3)
    y = np.zeros((6, 3))
    for i, (ids, deltas) in enumerate(_random_rounds(rng)):
        if i == 15:
            restored = FedVarpMemory(6, 3)
            restored.load_state_dict(varp.state_dict())
            varp = restored
        step = varp.step(ids, deltas, lr=1.5)
        if ids.size == 0:
            np.testing.assert_array_equal(step, 0.0)
            continue
        expected = 1.5 * (sum(deltas[j] - y[n] for j, n in enumerate(ids)) / ids.size + y.mean(0))
        y[ids] = deltas
        np.testing.assert_allclose(step, expected, atol=1e-12)
    np.testing.assert_allclose(varp.state_dict()["memory"], y)
    with pytest.raises(ValueError):
        varp.step([0, 0], np.zeros((2, 3)))
    with pytest.raises(ValueError):
        varp.step([0], np.zeros((1, 4)))
    with pytest.raises(ValueError):
        FedVarpMemory(6, 4).load_state_dict(varp.state_dict())
