"""Robust aggregation rules: API, reference numbers, invariants (fedagg.aggregators)."""

from __future__ import annotations

import doctest
import importlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedagg.aggregators import REGISTRY, build, declared_params, krum_scores, names
from fedagg.aggregators._common import closest_to_center_mean, gram, sq_distances
from fedagg.errors import ConfigError

N, F, D = 15, 3, 12

# (name, params) run on n=15, f=3 inputs; every one of them is deterministic.
RULES: list[tuple[str, dict]] = [
    ("mean", {}),
    ("median", {}),
    ("trimmed-mean", {"f": F}),
    ("meamed", {"f": F}),
    ("phocas", {"f": F}),
    ("krum", {"f": F}),
    ("krum", {"f": F, "variant": "byzfl"}),
    ("multikrum", {"f": F}),
    ("multikrum", {"f": F, "variant": "garfield"}),
    ("bulyan", {"f": F}),
    ("bulyan", {"f": F, "variant": "flower"}),
    ("bulyan", {"f": F, "variant": "garfield"}),
    ("geomedian", {}),
    ("centered-clipping", {"tau": 1.0}),
    ("flag", {}),
    ("flag", {"lam": 2.0, "init": "svd"}),
    ("nnm+trimmed-mean", {"f": F}),
    ("clipping+nnm+median", {"f": F, "tau": 5.0}),
]
ROBUST = [r for r in RULES if r[0] != "mean"]


def rid(rule: tuple[str, dict]) -> str:
    return rule[0] + "".join(f",{k}={v}" for k, v in rule[1].items() if k != "f")


def honest_cluster(seed: int, n: int = N, d: int = D) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return 1.0 + 0.1 * rng.normal(size=(n, d))


# --------------------------------------------------------------------------------------------
# registry and build
# --------------------------------------------------------------------------------------------


def test_names_cover_the_family():
    assert names() == sorted([
        "bucketing", "bulyan", "centered-clipping", "clipping", "flag", "geomedian", "krum",
        "meamed", "mean", "median", "multikrum", "nnm", "phocas", "trimmed-mean",
    ])
    assert REGISTRY.kind == "aggregator"


def test_unknown_name_and_param_are_config_errors():
    with pytest.raises(ConfigError, match="allowed: .*krum"):
        build("krumm", f=1)
    with pytest.raises(ConfigError, match=r"krum\.g: unknown parameter.*allowed: f, offset"):
        build("krum", f=1, g=2)
    with pytest.raises(ConfigError, match=r"krum\.f: required"):
        build("krum")
    with pytest.raises(ConfigError, match="variant"):
        build("bulyan", f=1, variant="fast")


def test_chain_routes_shared_and_directed_params():
    rule = build("clipping+nnm+trimmed-mean", f=2, tau=3.0, **{"nnm.f": 1})
    clip, nnm, tm = rule.stages
    assert (clip.tau, nnm.f, tm.f) == (3.0, 1, 2)
    assert set(declared_params("clipping+nnm+trimmed-mean")) == {"f", "tau"}
    with pytest.raises(ConfigError, match=r"nnm\+median\.ff: unknown parameter; allowed: f, nnm\.f"):
        build("nnm+median", ff=1)
    with pytest.raises(ConfigError, match=r"median\.f: unknown parameter for 'median'"):
        build("nnm+median", f=1, **{"median.f": 1})
    with pytest.raises(ConfigError, match="only pre-aggregators"):
        build("median+nnm+mean", f=1)
    with pytest.raises(ConfigError, match="must end with a final rule"):
        build("nnm+bucketing", f=1)


def test_chain_equals_manual_composition():
    X = honest_cluster(0)
    X[:F] += 30.0
    manual = build("trimmed-mean", f=F)(build("nnm", f=F)(build("clipping", tau=5.0)(X)))
    np.testing.assert_allclose(build("clipping+nnm+trimmed-mean", f=F, tau=5.0)(X), manual)


# --------------------------------------------------------------------------------------------
# reference numbers (shared/reference/fedau_flag.md §5.3 baselines; p=7, f=1)
# --------------------------------------------------------------------------------------------

BASE = np.array([[1, 2, 3], [1.2, 1.8, 3.1], [0.8, 2.1, 2.9], [1.1, 2.2, 3.3], [0.9, 1.9, 2.7],
                 [1, 2.05, 3.05], [50, -40, 0]])


@pytest.mark.parametrize(
    ("name", "params", "expected"),
    [
        ("mean", {}, [8, -3.992857, 2.578571]),
        ("median", {}, [1, 2, 3]),
        ("trimmed-mean", {"f": 1}, [1.04, 1.97, 2.95]),
        ("phocas", {"f": 1}, [1, 2.008333, 3.008333]),
        ("meamed", {"f": 1}, [1, 2.008333, 3.008333]),
        # the FA paper's "krum" is Garfield Multi-Krum: plain L2, n-f-1 neighbours, m = n-f-2 = 4
        ("multikrum", {"f": 1, "variant": "garfield"}, [1, 1.9875, 3.0125]),
        # the FA paper's "bulyan" is Garfield's Bulyan over Multi-Krum
        ("bulyan", {"f": 1, "variant": "garfield"}, [0.9, 2.0125, 2.883333]),
    ],
)
def test_fa_baseline_table(name, params, expected):
    np.testing.assert_allclose(build(name, **params)(BASE), expected, atol=1e-6)


def test_canonical_variants_differ_from_garfield_on_the_table():
    # the paper conventions do not reproduce the FA rows: the switch is what matters
    assert not np.allclose(build("multikrum", f=1, m=4)(BASE), [1, 1.9875, 3.0125])
    assert not np.allclose(build("bulyan", f=1)(BASE), [0.9, 2.0125, 2.883333])


def test_small_hand_examples():
    # Flower's Krum test: f=1 on {0.2, 0.7, 1.0} (k = max(1, n-f-2) = 1) -> 0.7
    D = sq_distances(gram(np.array([[0.2], [0.7], [1.0]])))
    assert np.argmin(krum_scores(D, 3 - 1 - 2)) == 1
    # ByzFL docstring examples on [[1,2,3],[4,5,6],[7,8,9]]
    X = np.array([[1.0, 2, 3], [4, 5, 6], [7, 8, 9]])
    np.testing.assert_allclose(build("krum", f=1, variant="byzfl")(X.copy()), [1, 2, 3])
    np.testing.assert_allclose(build("multikrum", f=1, variant="byzfl")(X), [2.5, 3.5, 4.5])
    np.testing.assert_allclose(build("geomedian", nu=0.1, max_iter=3, tol=0, init="zero")(X),
                               [3.78788764, 4.78788764, 5.78788764], rtol=1e-7)
    # even n: mean of the two middle values
    np.testing.assert_allclose(build("median")(np.array([[1.0], [2.0], [10.0], [4.0]])), [3.0])


@pytest.mark.parametrize(
    "module",
    ["fedagg.aggregators", "fedagg.aggregators.coordinate", "fedagg.aggregators.krum",
     "fedagg.aggregators.bulyan", "fedagg.aggregators.geomedian", "fedagg.aggregators.clipping",
     "fedagg.aggregators.pre", "fedagg.aggregators.flag"],
)
def test_docstring_examples(module):
    res = doctest.testmod(importlib.import_module(module), extraglobs={"np": np},
                          optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.attempted > 0 and res.failed == 0


# --------------------------------------------------------------------------------------------
# invariants on random inputs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", RULES, ids=rid)
def test_input_never_mutated_and_output_never_aliased(rule):
    X = honest_cluster(1)
    X.flags.writeable = False  # any write would raise
    out = build(rule[0], **rule[1])(X)
    assert out.shape == (D,) and not np.shares_memory(out, X)
    T = torch.from_numpy(honest_cluster(1))
    before = T.clone()
    out_t = build(rule[0], **rule[1])(T)
    assert torch.equal(T, before) and out_t.data_ptr() != T.data_ptr()


@pytest.mark.parametrize("rule", RULES, ids=rid)
def test_kind_and_dtype_are_preserved(rule):
    X = honest_cluster(2)
    ref = build(rule[0], **rule[1])(X)
    assert ref.dtype == np.float64
    t64 = build(rule[0], **rule[1])(torch.from_numpy(X))
    assert isinstance(t64, torch.Tensor) and t64.dtype == torch.float64
    np.testing.assert_allclose(t64.numpy(), ref, rtol=1e-12, atol=1e-12)
    listed = build(rule[0], **rule[1])(list(X))
    assert isinstance(listed, np.ndarray)
    np.testing.assert_allclose(listed, ref, rtol=1e-12, atol=1e-12)
    for dt_np, dt_t in ((np.float32, torch.float32), (np.float16, torch.float16)):
        Xl = X.astype(dt_np)
        o = build(rule[0], **rule[1])(Xl)
        assert o.dtype == dt_np and np.all(np.isfinite(o))
        ot = build(rule[0], **rule[1])(torch.from_numpy(Xl))
        assert ot.dtype == dt_t
        np.testing.assert_allclose(ot.numpy(), o)
        if dt_np == np.float32:  # same math in float32 as in float64 on the rounded input
            ref32 = build(rule[0], **rule[1])(Xl.astype(np.float64))
            np.testing.assert_allclose(o, ref32, rtol=1e-4, atol=1e-5)
    bf = build(rule[0], **rule[1])([torch.from_numpy(x).to(torch.bfloat16) for x in X])
    assert bf.dtype == torch.bfloat16


@pytest.mark.parametrize("rule", RULES, ids=rid)
def test_permutation_invariance(rule):
    X = honest_cluster(3)
    X[:F] += np.random.default_rng(3).normal(scale=5.0, size=(F, D))
    perm = np.random.default_rng(4).permutation(N)
    np.testing.assert_allclose(build(rule[0], **rule[1])(X[perm]),
                               build(rule[0], **rule[1])(X), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("rule", ROBUST, ids=rid)
def test_robust_rules_ignore_f_outliers(rule):
    X = honest_cluster(5)
    honest_mean = X[F:].mean(axis=0)
    X[:F] = 1e4 * np.random.default_rng(5).normal(size=(F, D))
    out = build(rule[0], **rule[1])(X)
    if rule[0] == "flag":  # FA outputs a normalised direction: compare directions
        cos = out @ honest_mean / (np.linalg.norm(out) * np.linalg.norm(honest_mean))
        assert cos > 0.99
    elif rule[0] == "centered-clipping":  # from v0 = 0 each outlier moves v by at most τ/n
        H = X[F:]
        honest_part = (H * np.minimum(1.0, 1.0 / np.linalg.norm(H, axis=1))[:, None]).sum(0) / N
        assert np.linalg.norm(out - honest_part) <= F * 1.0 / N + 1e-9
    else:
        assert np.abs(out - honest_mean).max() < 0.3
    assert np.abs(build("mean")(X) - honest_mean).max() > 100


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("rule", ROBUST, ids=rid)
def test_nonfinite_attackers_give_finite_output(rule, bad):
    X = honest_cluster(6)
    honest_mean = X[F:].mean(axis=0)
    X[:F] = bad
    X[0, :2] = 1.0  # a row that is only partly non-finite
    out = build(rule[0], **rule[1])(X)
    assert np.all(np.isfinite(out))
    if rule[0] not in ("flag", "centered-clipping"):  # those rescale (‖FA‖ ≤ p/m; CC from v0 = 0)
        assert np.abs(out - honest_mean).max() < 0.3


def test_mean_is_not_robust_to_inf():
    X = honest_cluster(6)
    X[0] = np.inf
    assert not np.isfinite(build("mean")(X)).any()


def test_feasibility_errors_name_the_rule_and_bound():
    with pytest.raises(ConfigError, match=r"krum\.f: krum needs n > 2f \+ 2.*n=8, f=3"):
        build("krum", f=3)(honest_cluster(0, n=8))
    with pytest.raises(ValueError, match=r"bulyan needs n ≥ 4f \+ 3.*n=14, f=3"):
        build("bulyan", f=3)(honest_cluster(0, n=14))
    with pytest.raises(ValueError, match="n > 2f"):
        build("trimmed-mean", f=3)(honest_cluster(0, n=6))
    with pytest.raises(ConfigError, match=r"multikrum\.m"):
        build("multikrum", f=1, m=9)(honest_cluster(0, n=8))
    build("krum", f=2)(honest_cluster(0, n=7))  # n = 2f + 3 is the smallest feasible


# --------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------


def test_integer_weights_equal_repeated_rows():
    X = honest_cluster(7, n=6, d=4)
    X[0] += 3.0
    w = np.array([1, 3, 2, 1, 1, 2])
    rep = np.repeat(X, w, axis=0)
    for name in ("mean", "geomedian", "centered-clipping"):
        np.testing.assert_allclose(build(name)(X, weights=w), build(name)(rep), rtol=1e-8)
    np.testing.assert_allclose(build("mean")(X, weights=w), np.average(X, axis=0, weights=w))


def test_multikrum_weights_only_weight_the_average():
    X = honest_cluster(8, n=9)
    rule = build("multikrum", f=2, m=3)
    sel = rule.selected(X)
    w = np.arange(1.0, 10.0)
    np.testing.assert_allclose(rule(X, weights=w), np.average(X[sel], axis=0, weights=w[sel]))
    np.testing.assert_allclose(build("krum", f=2)(X, weights=w), build("krum", f=2)(X))


@pytest.mark.parametrize("name", ["median", "trimmed-mean", "bulyan", "flag", "nnm+median"])
def test_order_statistic_rules_reject_non_uniform_weights(name):
    X = honest_cluster(9)
    rule = build(name, **({"f": 1} if "f" in declared_params(name) else {}))
    np.testing.assert_allclose(rule(X, weights=np.full(N, 2.0)), rule(X))
    with pytest.raises(ValueError, match="does not support non-uniform weights"):
        rule(X, weights=np.arange(N, dtype=float))


def test_bad_weights_are_rejected():
    X = honest_cluster(9, n=4)
    for w in ([1, 2, 3], [1, -1, 1, 1], [0, 0, 0, 0], [1, np.nan, 1, 1]):
        with pytest.raises(ValueError):
            build("mean")(X, weights=np.array(w, dtype=float))


def test_weighted_bucketing_carries_bucket_weights():
    X = honest_cluster(10, n=6, d=3)
    w = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    pipe = build("bucketing+mean", s=2, seed=3)
    # a weighted mean of weighted bucket means with bucket weights = the weighted mean
    np.testing.assert_allclose(pipe(X, weights=w), np.average(X, axis=0, weights=w))


# --------------------------------------------------------------------------------------------
# state: centered clipping and bucketing
# --------------------------------------------------------------------------------------------


def test_centered_clipping_state_roundtrip():
    rounds = [honest_cluster(s, n=6, d=5) * (s + 1) for s in range(3)]
    a = build("centered-clipping", tau=0.5, iterations=3)
    outs = [a(x) for x in rounds]
    b = build("centered-clipping", tau=0.5, iterations=3)
    b(rounds[0])
    state = b.state_dict()
    c = build("centered-clipping", tau=0.5, iterations=3)
    c.load_state_dict({"v": torch.from_numpy(state["v"])})
    np.testing.assert_allclose(c(rounds[1]), outs[1])
    np.testing.assert_allclose(c(rounds[2]), outs[2])
    c.reset()
    np.testing.assert_allclose(c(rounds[0]), outs[0])
    with pytest.raises(ValueError, match="state has d=5"):
        c(np.zeros((3, 4)))


def test_centered_clipping_iterations_reach_the_fixed_point():
    X = honest_cluster(11, n=8, d=4)
    X[0] = 50.0
    tau = 0.2
    v = build("centered-clipping", tau=tau, iterations=200)(X)
    # fixed point: Σ_i (x_i − v) min(1, τ/‖x_i − v‖) = 0, checked directly in d-space
    diff = X - v
    norms = np.linalg.norm(diff, axis=1)
    assert np.linalg.norm((diff * np.minimum(1, tau / norms)[:, None]).sum(0)) < 1e-8


def test_bucketing_is_seeded_and_restorable():
    X = np.arange(20.0).reshape(10, 2)
    a, b = build("bucketing", s=3, seed=7), build("bucketing", s=3, seed=7)
    ya = a(X)
    assert ya.shape == (4, 2)
    np.testing.assert_allclose(ya, b(X))
    np.testing.assert_allclose((ya * np.array([3, 3, 3, 1])[:, None]).sum(0), X.sum(0))
    state = a.state_dict()
    nxt = a(X)
    a.load_state_dict(state)
    np.testing.assert_allclose(a(X), nxt)
    assert not np.allclose(build("bucketing", s=3, seed=8)(X), ya)
    rng = np.random.default_rng(5)
    c = build("bucketing", s=2, rng=rng)
    perm = np.random.default_rng(5).permutation(10)
    np.testing.assert_allclose(c(X), X[perm].reshape(5, 2, 2).mean(axis=1))


def test_pipeline_state_dict_is_flat_numpy_and_restores():
    pipe = build("bucketing+centered-clipping", s=2, tau=1.0)
    assert set(pipe.state_dict()) == {"0:bucketing.rng"}  # CC has no momentum before a call
    pipe(honest_cluster(12, n=6))
    state = pipe.state_dict()
    assert set(state) == {"0:bucketing.rng", "1:centered-clipping.v"}
    assert all(isinstance(v, np.ndarray) for v in state.values())
    nxt = pipe(honest_cluster(13, n=6))
    other = build("bucketing+centered-clipping", s=2, tau=1.0)
    other.load_state_dict(state)
    np.testing.assert_allclose(other(honest_cluster(13, n=6)), nxt)
    with pytest.raises(ValueError, match="unknown state key"):
        other.load_state_dict({"2:mean.x": np.zeros(1)})


def test_library_code_never_touches_global_rngs():
    np_state, torch_state = np.random.get_state(), torch.random.get_rng_state()
    X = honest_cluster(13)
    for rule in RULES:
        build(rule[0], **rule[1])(X)
    build("bucketing+median", s=2)(X)
    assert np.array_equal(torch.random.get_rng_state(), torch_state)
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1])


# --------------------------------------------------------------------------------------------
# property tests
# --------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    arrays(np.float64, st.tuples(st.integers(2, 9), st.integers(1, 4)),
           elements=st.integers(-4, 4).map(float)),
    st.data(),
)
def test_closest_to_center_window_equals_brute_force(X, data):
    """The sorted-window trick == pick the k nearest values (ties: lower value first)."""
    n = X.shape[0]
    k = data.draw(st.integers(1, n))
    center = data.draw(arrays(np.float64, X.shape[1], elements=st.integers(-4, 4).map(float)))
    fast = closest_to_center_mean(np.sort(X, axis=0), center, k)
    for j in range(X.shape[1]):
        order = np.lexsort((X[:, j], np.abs(X[:, j] - center[j])))
        assert fast[j] == pytest.approx(X[order[:k], j].mean())


@settings(max_examples=40, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(5, 12), st.integers(1, 5)),
              elements=st.floats(-1e3, 1e3)))
def test_order_statistics_stay_in_the_honest_range(X):
    f = (X.shape[0] - 1) // 2
    lo, hi = X.min(axis=0), X.max(axis=0)
    for name, params in (("median", {}), ("trimmed-mean", {"f": f}), ("meamed", {"f": f}),
                         ("phocas", {"f": f})):
        out = build(name, **params)(X)
        assert np.all(out >= lo - 1e-9) and np.all(out <= hi + 1e-9)
    # the f largest and f smallest values of a coordinate never matter to the trimmed mean
    S = np.sort(X, axis=0)
    Y = S.copy()
    Y[:f] = -1e9
    Y[X.shape[0] - f:] = 1e9
    np.testing.assert_allclose(build("trimmed-mean", f=f)(Y), build("trimmed-mean", f=f)(S))


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(3, 9), st.integers(1, 6))
def test_krum_scores_match_brute_force(seed, n, d):
    X = np.random.default_rng(seed).normal(size=(n, d))
    D = sq_distances(gram(X))
    k = max(1, n - 3)
    brute = [sorted(np.sum((X[i] - X[j]) ** 2) for j in range(n) if j != i)[:k] for i in range(n)]
    np.testing.assert_allclose(krum_scores(D, k), np.sum(brute, axis=1), rtol=1e-9, atol=1e-12)
