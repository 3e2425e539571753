"""Availability processes and participation probabilities (fedagg.participation).

Reference vectors: ../shared/reference/fedau_flag.md §5.2 (IBM/fedau, legacy np.random stream).
"""

from __future__ import annotations

import numpy as np
import pytest

from fedagg.data.partition import dirichlet_partition, label_histograms
from fedagg.errors import ConfigError
from fedagg.fedau import FedAUWeights
from fedagg.participation import (
    PROBABILITIES,
    PROCESSES,
    AvailabilityProcess,
    build_probabilities,
    build_process,
    constant_probabilities,
    explicit_probabilities,
    heterogeneous_probabilities,
    participation_rng,
    probability_kinds,
    process_names,
)

P4 = np.array([0.05, 0.1, 0.3, 0.9])


def _trace(proc: AvailabilityProcess, rounds: int, start: int = 0) -> np.ndarray:
    """(rounds, N) 0/1 matrix of availability."""
    out = np.zeros((rounds, proc.num_clients), dtype=int)
    for i in range(rounds):
        out[i, proc.available(start + i)] = 1
    return out


def _rows(trace: np.ndarray) -> list[str]:
    return ["".join(str(v) for v in col) for col in trace.T]


# ---------------------------------------------------------------------------------------------
# §5.2 reference vectors
# ---------------------------------------------------------------------------------------------


def test_heterogeneous_probabilities_reference_vector():
    labels = np.repeat(np.arange(10), 100)  # 10 classes x 100 samples, class-sorted
    rng = np.random.RandomState(1)
    parts = dirichlet_partition(labels, 5, rng, alpha=0.1)
    assert [len(p) for p in parts] == [231, 213, 135, 316, 105]
    hist = label_histograms(labels, parts, 10)
    p = heterogeneous_probabilities(hist, rng, alpha=0.1, mean=0.1, floor=0.02)
    np.testing.assert_allclose(p, [0.20183, 0.02, 0.11541, 0.09626, 0.05551], atol=5e-6)
    assert p[1] == 0.02  # clipped at the floor exactly

    # the spec builder gives the same numbers from the same stream position
    rng2 = np.random.RandomState(1)
    parts2 = dirichlet_partition(labels, 5, rng2, alpha=0.1)
    spec = {"kind": "heterogeneous", "alpha": 0.1, "mean": 0.1, "floor": 0.02}
    p2 = build_probabilities(spec, 5, histograms=label_histograms(labels, parts2, 10), rng=rng2)
    np.testing.assert_array_equal(p, p2)


REFERENCE_TRACES = {
    ("bernoulli", ()): [
        "00000000101000000000",
        "00000100000000000000",
        "00000000000100000101",
        "11111111111111111111",
    ],
    ("markov", (("a", 0.05),)): [
        "00000001010000000000",
        "00001000000000000000",
        "00000000000000000000",
        "11111111111111111111",
    ],
    ("cyclic", (("period", 10),)): [
        "00000100000000010000",
        "00000000100000000010",
        "01110000000111000000",
        "11111111101111111110",
    ],
}


@pytest.mark.parametrize("key", list(REFERENCE_TRACES), ids=lambda k: k[0])
def test_sampler_reference_traces(key):
    name, params = key
    proc = build_process(name, P4, np.random.RandomState(1), **dict(params))
    assert _rows(_trace(proc, 20)) == REFERENCE_TRACES[key]


# ---------------------------------------------------------------------------------------------
# draw-for-draw equality with a per-client scalar transcription of §5.1
# ---------------------------------------------------------------------------------------------


class _ScalarSampler:
    """One client, scalar legacy draws, exactly the order of §5.1 (test oracle)."""

    def __init__(self, method: str, p: float, rng: np.random.RandomState, param: float = 0):
        self.method, self.p, self.rng = method, p, rng
        if method == "markov":
            self.to_active, self.to_inactive = param, param * (1 / p - 1) if p > 0 else np.inf
            if self.to_inactive > 1:
                self.to_active /= self.to_inactive
                self.to_inactive = 1.0
            self.state = rng.binomial(1, p)
        elif method == "cyclic":
            self.active = max(1, round(param * p))
            self.inactive = max(1, int(param) - self.active)
            self.state = 0
            self.counter = rng.randint(self.inactive)

    def sample(self) -> int:
        if self.method == "bernoulli":
            return self.rng.binomial(1, self.p)
        if self.method == "markov":
            if self.state == 1:
                if self.rng.binomial(1, self.to_inactive) == 1:
                    self.state = 0
            elif self.rng.binomial(1, self.to_active) == 1:
                self.state = 1
            return self.state
        if self.counter == 0:
            self.state = 1 - self.state
            self.counter = self.active if self.state else self.inactive
        self.counter -= 1
        return self.state


@pytest.mark.parametrize(
    "method,param,kwargs",
    [
        ("bernoulli", 0, {}),
        ("markov", 0.05, {"a": 0.05}),
        ("markov", 0.5, {"a": 0.5}),
        ("cyclic", 10, {"period": 10}),
        ("cyclic", 7, {"period": 7}),
    ],
)
def test_vectorised_process_consumes_stream_like_scalar_reference(method, param, kwargs):
    p = np.random.default_rng(0).uniform(0, 1, size=60)
    p[:6] = [0.0, 1.0, 0.001, 0.999, 0.5, 0.02]  # edge cases: no-draw p = 0, renormalisation
    rounds = 80
    rng_ref = np.random.RandomState(123)
    samplers = [_ScalarSampler(method, float(pn), rng_ref, param) for pn in p]
    expected = np.array([[s.sample() for s in samplers] for _ in range(rounds)])

    rng = np.random.RandomState(123)
    proc = build_process(method, p, rng, **kwargs)
    np.testing.assert_array_equal(_trace(proc, rounds), expected)
    # same number of draws consumed: the streams continue identically
    assert rng.random_sample() == rng_ref.random_sample()


# ---------------------------------------------------------------------------------------------
# long-run behaviour (§5.2 "long-run sanity": seed 2, 5000 rounds)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,kwargs,tol",
    [("bernoulli", {}, 0.01), ("markov", {"a": 0.05}, 0.015), ("cyclic", {"period": 100}, 1e-9)],
)
def test_long_run_rates_match_p(name, kwargs, tol):
    p = np.array([0.02, 0.1, 0.3, 0.9])
    proc = build_process(name, p, np.random.RandomState(2), **kwargs)
    est = FedAUWeights(4)
    counts = np.zeros(4)
    for t in range(5000):
        ids = proc.available(t)
        counts[ids] += 1
        est.step(t, ids)
    np.testing.assert_allclose(counts / 5000, p, atol=tol)
    if name == "bernoulli":
        # §5.2: the final FedAU weight with K = ∞ is about 51, 10.6, 3.3 and 1.1
        np.testing.assert_allclose(est.weights(), [51.0, 10.6, 3.3, 1.1], rtol=0.02)
        np.testing.assert_allclose(est.weights(), 1 / p, rtol=0.07)


def test_cyclic_rate_is_on_over_period_with_rounding_bias():
    # §2.1: L = 10, p = 0.05 gives A = max(1, round(0.5)) = 1 on of 10 -> rate 0.1, not 0.05
    p = np.array([0.05, 0.25, 0.35, 0.5])  # round(2.5) = 2, round(3.5) = 4 (half to even)
    proc = build_process("cyclic", p, np.random.RandomState(0), period=10)
    rates = _trace(proc, 1000).mean(axis=0)
    np.testing.assert_allclose(rates, [0.1, 0.2, 0.4, 0.5])


def test_markov_extremes_and_stationarity():
    p = np.array([0.0, 1.0, 0.01])
    proc = build_process("markov", p, np.random.RandomState(0), a=0.05)
    # a(1/p - 1) = 4.95 > 1: renormalised to P(on->off) = 1, P(off->on) = 0.05 / 4.95
    np.testing.assert_allclose(proc.to_inactive, [1.0, 0.0, 1.0])
    np.testing.assert_allclose(proc.to_active, [0.0, 0.05, 0.05 / 4.95])
    tr = _trace(proc, 300)
    assert tr[:, 0].sum() == 0 and tr[:, 1].sum() == 300
    # after a participation a renormalised client is off the next round
    on = np.flatnonzero(tr[:-1, 2])
    assert np.all(tr[on + 1, 2] == 0)


def test_always_and_bernoulli_extremes():
    tr = _trace(build_process("always", np.zeros(3), np.random.RandomState(0)), 5)
    assert tr.sum() == 15
    tr = _trace(build_process("bernoulli", [0.0, 1.0], np.random.RandomState(0)), 50)
    assert tr[:, 0].sum() == 0 and tr[:, 1].sum() == 50


# ---------------------------------------------------------------------------------------------
# checkpoint / round order / API
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,kwargs", [("bernoulli", {}), ("markov", {"a": 0.2}), ("cyclic", {"period": 6}),
                    ("always", {})]
)
def test_state_dict_resumes_bit_exactly(name, kwargs):
    p = np.random.default_rng(1).uniform(0.02, 0.95, size=40)
    full = build_process(name, p, np.random.RandomState(7), **kwargs)
    expected = _trace(full, 60)

    proc = build_process(name, p, np.random.RandomState(7), **kwargs)
    head = _trace(proc, 25)
    state = proc.state_dict()
    _trace(proc, 10, start=25)  # advance further: the checkpoint must not alias live state
    resumed = build_process(name, p, participation_rng(99), **kwargs)  # different stream
    resumed.load_state_dict(state)
    assert resumed.next_round == 25
    tail = _trace(resumed, 35, start=25)
    np.testing.assert_array_equal(np.vstack([head, tail]), expected)


def test_load_state_dict_rejects_other_process_or_size():
    p = np.full(4, 0.5)
    state = build_process("markov", p, np.random.RandomState(0)).state_dict()
    with pytest.raises(ValueError, match="markov"):
        build_process("cyclic", p, np.random.RandomState(0)).load_state_dict(state)
    with pytest.raises(ValueError, match="clients"):
        build_process("markov", np.full(5, 0.5), np.random.RandomState(0)).load_state_dict(state)


def test_rounds_must_be_consecutive_and_first_round_is_configurable():
    proc = build_process("bernoulli", P4, np.random.RandomState(1), first_round=1)
    with pytest.raises(ValueError, match="expected round 1"):
        proc.available(0)
    proc.available(1)
    with pytest.raises(ValueError, match="expected round 2"):
        proc.available(1)  # repeated
    with pytest.raises(ValueError, match="expected round 2"):
        proc.available(3)  # skipped
    # first_round only renumbers: the trace equals the reference from round 0
    proc0 = build_process("bernoulli", P4, np.random.RandomState(1))
    proc1 = build_process("bernoulli", P4, np.random.RandomState(1), first_round=1)
    np.testing.assert_array_equal(_trace(proc0, 20), _trace(proc1, 20, start=1))


def test_available_returns_sorted_int_ids_and_does_not_mutate_p():
    p = np.array([0.9, 0.9, 0.9, 0.9, 0.9])
    proc = build_process("bernoulli", p, np.random.RandomState(3))
    ids = proc.available(0)
    assert ids.dtype == np.int64 and np.all(np.diff(ids) > 0)
    assert np.all(p == 0.9) and not proc.p.flags.writeable
    with pytest.raises(ValueError):
        build_process("bernoulli", [0.5, 1.5], np.random.RandomState(0))
    with pytest.raises(ValueError):
        build_process("bernoulli", [[0.5]], np.random.RandomState(0))


def test_generator_is_accepted_and_participation_rng_is_deterministic():
    a = _trace(build_process("bernoulli", P4, np.random.default_rng(5)), 30)
    b = _trace(build_process("bernoulli", P4, np.random.default_rng(5)), 30)
    np.testing.assert_array_equal(a, b)
    x = participation_rng(3).random_sample(4)
    np.testing.assert_array_equal(x, participation_rng(3).random_sample(4))
    assert not np.array_equal(x, participation_rng(4).random_sample(4))
    assert not np.array_equal(x, participation_rng(3, "other").random_sample(4))
    with pytest.raises(TypeError):
        build_process("bernoulli", P4, 5)


def test_process_registry_validates_params():
    assert process_names() == ["always", "bernoulli", "cyclic", "markov"]
    assert PROCESSES.entry("markov").param("a").default == 0.05
    assert PROCESSES.entry("cyclic").param("period").default == 100
    with pytest.raises(ConfigError, match="participation: unknown value 'markv'.*markov"):
        build_process("markv", P4, np.random.RandomState(0))
    with pytest.raises(ConfigError, match=r"participation\.markov\.a: must be > 0"):
        build_process("markov", P4, np.random.RandomState(0), a=0)
    with pytest.raises(ConfigError, match=r"participation\.cyclic\.period: must be >= 1"):
        build_process("cyclic", P4, np.random.RandomState(0), period=0)
    with pytest.raises(ConfigError, match=r"participation\.bernoulli\.a: unknown parameter"):
        build_process("bernoulli", P4, np.random.RandomState(0), a=0.1)
    proc = build_process("cyclic", P4, np.random.RandomState(0), period="10")  # CLI string
    assert proc.period == 10


# ---------------------------------------------------------------------------------------------
# probability specs
# ---------------------------------------------------------------------------------------------


def test_probability_specs():
    assert probability_kinds() == ["constant", "explicit", "heterogeneous"]
    np.testing.assert_array_equal(build_probabilities({"kind": "constant", "p": 0.1}, 3), [0.1] * 3)
    np.testing.assert_array_equal(constant_probabilities(2, 0.3), [0.3, 0.3])
    got = build_probabilities({"kind": "explicit", "p": [0.1, 0.5, 1]}, 3)
    assert got.dtype == np.float64 and got.tolist() == [0.1, 0.5, 1.0]
    assert explicit_probabilities(2, [0.2, 0.4]).tolist() == [0.2, 0.4]
    assert PROBABILITIES.entry("heterogeneous").param("floor").default == 0.02


def test_probability_spec_errors_name_the_field():
    f = "participation.probabilities"
    with pytest.raises(ConfigError, match=rf"{f}\.kind: required; allowed: constant, explicit"):
        build_probabilities({"p": 0.1}, 3)
    with pytest.raises(ConfigError, match=rf"{f}\.kind: unknown value 'const'"):
        build_probabilities({"kind": "const", "p": 0.1}, 3)
    with pytest.raises(ConfigError, match=rf"{f}\.p: must be <= 1"):
        build_probabilities({"kind": "constant", "p": 1.5}, 3)
    with pytest.raises(ConfigError, match=rf"{f}\.p: required"):
        build_probabilities({"kind": "constant"}, 3)
    with pytest.raises(ConfigError, match=rf"{f}\.mean: unknown parameter"):
        build_probabilities({"kind": "constant", "p": 0.1, "mean": 0.1}, 3)
    with pytest.raises(ConfigError, match=rf"{f}\.p: expected 3 values, got 2"):
        build_probabilities({"kind": "explicit", "p": [0.1, 0.2]}, 3)
    with pytest.raises(ConfigError, match=rf"{f}\.p: every value must be a number in \[0, 1\]"):
        build_probabilities({"kind": "explicit", "p": [0.1, 0.2, -0.1]}, 3)
    with pytest.raises(ConfigError, match=rf"{f}\.alpha: must be > 0"):
        build_probabilities({"kind": "heterogeneous", "alpha": 0}, 3)
    with pytest.raises(ConfigError, match="x.y: expected a mapping"):
        build_probabilities("constant", 3, field="x.y")
    with pytest.raises(ValueError, match="histograms"):
        build_probabilities({"kind": "heterogeneous"}, 3)


def test_heterogeneous_formula_clip_and_mean():
    # one-hot histograms: p_n = max(floor, C·mean·m_{class(n)}), capped at 1
    hist = np.eye(4)[[0, 1, 2, 3, 3]]
    m = np.random.RandomState(9).dirichlet(0.1 * np.ones(4), size=1)[0]
    p = heterogeneous_probabilities(hist, np.random.RandomState(9), alpha=0.1, mean=0.5, floor=0.05)
    expected = np.minimum(1.0, np.maximum(0.05, 4 * 0.5 * m[[0, 1, 2, 3, 3]]))
    np.testing.assert_array_equal(p, expected)
    assert p.max() == 1.0  # 4·0.5·max(m) > 1 here: capped (the reference would fail)
    # mean before clipping ≈ `mean` over many draws of m (E[C·π·m] = 1 for any histogram)
    rng = np.random.RandomState(0)
    hist = rng.dirichlet(np.ones(10), size=200)
    vals = [heterogeneous_probabilities(hist, rng, mean=0.1, floor=0.0).mean() for _ in range(400)]
    assert abs(np.mean(vals) - 0.1) < 0.005
    empty = heterogeneous_probabilities(np.zeros((2, 3)), np.random.RandomState(0), floor=0.02)
    assert empty.tolist() == [0.02, 0.02]
