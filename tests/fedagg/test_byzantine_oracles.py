"""Cross-checks against independent implementations (shared/reference/byzantine.md §5.2–§5.3).

Oracles (test-only, installed by the Makefile): ByzFL 0.0.11 (``--no-deps``, imported with a stub
for its torchvision-dependent benchmark package), Flower 1.41 (legacy ``aggregate_*`` functions
and the Message-API selection helpers) and geom-median 0.1.0. Each comparison names the convention
under which our rule and the oracle coincide.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from fedagg.aggregators import build
from fedagg.attacks import build as build_attack

sys.modules.setdefault("byzfl.benchmark", types.ModuleType("byzfl.benchmark"))
byzfl = pytest.importorskip("byzfl")
flwr_aggregate = pytest.importorskip("flwr.server.strategy.aggregate")
flwr_app = pytest.importorskip("flwr.app")
flwr_multikrum = pytest.importorskip("flwr.serverapp.strategy.multikrum")
flwr_bulyan = pytest.importorskip("flwr.serverapp.strategy.bulyan")
geom_median = pytest.importorskip("geom_median.numpy")

DRAWS = 100


def gaussian(seed: int, n: int, d: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d))


def flower_results(X: np.ndarray) -> list:
    return [([x.copy()], 1) for x in X]


def flower_records(X: np.ndarray) -> list:
    return [flwr_app.RecordDict({"arrays": flwr_app.ArrayRecord([x.copy()])}) for x in X]


# --------------------------------------------------------------------------------------------
# Krum / Multi-Krum
# --------------------------------------------------------------------------------------------


def test_krum_neighbour_conventions_match_each_library():
    """byzfl preset (k = n−f−1) == ByzFL Krum; paper (k = n−f−2) == Flower; they differ."""
    n, f, differ = 10, 2, 0
    ours_paper, ours_byzfl = build("krum", f=f), build("krum", f=f, variant="byzfl")
    for seed in range(DRAWS):
        X = gaussian(seed, n, 5)
        b, fl = byzfl.Krum(f=f)(X.copy()), flwr_aggregate.aggregate_krum(flower_results(X), f, 0)[0]
        np.testing.assert_array_equal(ours_byzfl(X), b)
        np.testing.assert_array_equal(ours_paper(X), fl)
        differ += not np.array_equal(b, fl)
    assert differ > 0  # measured 16 % in byzantine.md §5.3: the switch is needed


@pytest.mark.parametrize("m", [1, 3, 6])
def test_multikrum_matches_flower_legacy_and_message_api(m):
    n, f = 11, 2
    rule = build("multikrum", f=f, m=m)
    for seed in range(DRAWS // 2):
        X = gaussian(seed, n, 4)
        legacy = flwr_aggregate.aggregate_krum(flower_results(X), f, m)[0]
        np.testing.assert_allclose(rule(X), legacy, rtol=1e-12, atol=1e-12)
        chosen = flwr_multikrum.select_multikrum(flower_records(X), f, m)
        msg = np.mean([c["arrays"].to_numpy_ndarrays()[0] for c in chosen], axis=0)
        np.testing.assert_allclose(rule(X), msg, rtol=1e-12, atol=1e-12)


def test_multikrum_byzfl_preset_matches_byzfl():
    for seed in range(DRAWS // 2):
        X = gaussian(seed, 9, 4)
        np.testing.assert_allclose(build("multikrum", f=2, variant="byzfl")(X),
                                   byzfl.MultiKrum(f=2)(X.copy()), rtol=1e-12)


# --------------------------------------------------------------------------------------------
# Bulyan
# --------------------------------------------------------------------------------------------


def flower_message_api_bulyan(X: np.ndarray, f: int) -> np.ndarray:
    """What ``flwr.serverapp.strategy.Bulyan.aggregate_train`` computes, via its own helpers."""
    theta, beta = len(X) - 2 * f, len(X) - 4 * f
    sel = flwr_multikrum.select_multikrum(flower_records(X), f, theta)
    arrays = [c["arrays"].to_numpy_ndarrays() for c in sel]
    median = [np.median(np.stack([a[0] for a in arrays]), axis=0)]
    return flwr_bulyan.aggregate_n_closest_weights(median, arrays, beta)[0]


@pytest.mark.parametrize(("n", "f"), [(15, 3), (11, 2), (7, 1)])
def test_bulyan_variants_match_flower_legacy_and_message_api(n, f):
    paper, flower = build("bulyan", f=f), build("bulyan", f=f, variant="flower")
    differ = 0
    for seed in range(DRAWS // 2):
        X = gaussian(seed, n, 6)
        legacy = flwr_aggregate.aggregate_bulyan(
            flower_results(X), f, flwr_aggregate.aggregate_krum, to_keep=0
        )[0]
        msg = flower_message_api_bulyan(X, f)
        np.testing.assert_allclose(paper(X), legacy, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(flower(X), msg, rtol=1e-12, atol=1e-12)
        differ += not np.allclose(legacy, msg)
    assert differ > 0  # byzantine.md §5.3: legacy ≠ Message-API on most inputs


def test_flower_bulyan_with_f0_is_the_mean():
    X = gaussian(0, 6, 3)
    np.testing.assert_allclose(build("bulyan", f=0)(X), X.mean(axis=0))


# --------------------------------------------------------------------------------------------
# coordinate-wise rules and pre-aggregators
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "f"), [(10, 2), (11, 4), (47, 3), (49, 1), (8, 3)])
def test_median_and_trimmed_mean(n, f):
    for seed in range(10):
        X = gaussian(seed, n, 7)
        np.testing.assert_allclose(build("median")(X), byzfl.Median()(X.copy()))
        np.testing.assert_allclose(build("median")(X),
                                   flwr_aggregate.aggregate_median(flower_results(X))[0])
        tm = build("trimmed-mean", f=f)(X)
        np.testing.assert_allclose(tm, byzfl.TrMean(f=f)(X.copy()), rtol=1e-12)
        # Flower takes a fraction: (f + 0.5)/n cuts exactly f (f/n loses one for (47,3), (49,1))
        np.testing.assert_allclose(
            tm, flwr_aggregate.aggregate_trimmed_avg(flower_results(X), (f + 0.5) / n)[0],
            rtol=1e-12,
        )


def test_meamed_nnm_clipping_pipelines_match_byzfl():
    for seed in range(DRAWS // 2):
        X = gaussian(seed, 10, 5)
        X[:2] *= 20
        np.testing.assert_allclose(build("meamed", f=2)(X), byzfl.Meamed(f=2)(X.copy()))
        np.testing.assert_allclose(build("nnm", f=2)(X), byzfl.NNM(f=2)(X.copy()), rtol=1e-12,
                                   atol=1e-12)
        np.testing.assert_allclose(build("clipping", tau=2.0)(X), byzfl.Clipping(c=2.0)(X.copy()))
        expected = byzfl.TrMean(f=2)(byzfl.NNM(f=2)(byzfl.Clipping(c=2.0)(X.copy())))
        np.testing.assert_allclose(build("clipping+nnm+trimmed-mean", f=2, tau=2.0)(X), expected,
                                   rtol=1e-12, atol=1e-12)


def test_byzfl_docstring_example_in_all_input_types():
    """ByzFL's unit-test style: the 3×3 example as ndarray, tensor and lists of each."""
    X = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    inputs = [X, torch.from_numpy(X), list(X), list(torch.from_numpy(X))]
    for inp in inputs:
        np.testing.assert_allclose(np.asarray(build("nnm", f=1)(inp)),
                                   [[2.5, 3.5, 4.5], [2.5, 3.5, 4.5], [5.5, 6.5, 7.5]])
        np.testing.assert_allclose(np.asarray(build("multikrum", f=1, variant="byzfl")(inp)),
                                   [2.5, 3.5, 4.5])
        np.testing.assert_allclose(np.asarray(build("meamed", f=1)(inp)),
                                   byzfl.Meamed(f=1)(X.copy()))


# --------------------------------------------------------------------------------------------
# geometric median and centered clipping
# --------------------------------------------------------------------------------------------


def test_geomedian_byzfl_fixed_iterations():
    rule = build("geomedian", nu=0.1, max_iter=3, tol=0.0, init="zero")
    for seed in range(DRAWS // 2):
        X = gaussian(seed, 9, 6)
        np.testing.assert_allclose(rule(X), byzfl.GeometricMedian(nu=0.1, T=3)(X.copy()),
                                   rtol=1e-10)


@pytest.mark.parametrize("seed", range(5))
def test_geomedian_converged_matches_geom_median_and_optimality(seed):
    X = np.random.default_rng(seed).normal(size=(12, 20))
    X[:3] += 50.0  # byzantine.md Appendix A
    ours = build("geomedian")(X)
    ref = geom_median.compute_geometric_median(X, eps=1e-6, maxiter=2000, ftol=1e-22).median
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-7)
    unit = (X - ours) / np.linalg.norm(X - ours, axis=1, keepdims=True)
    assert np.linalg.norm(unit.sum(axis=0)) < 1e-6  # first-order optimality (fedlib's test)
    np.testing.assert_allclose(ours, byzfl.GeometricMedian(nu=1e-6, T=2000)(X.copy()), atol=1e-7)


def test_geomedian_drops_inf_rows_like_byzfl():
    X = gaussian(3, 10, 4)
    X[:2] = np.inf
    np.testing.assert_allclose(build("geomedian", nu=0.1, max_iter=3, tol=0.0, init="zero")(X),
                               byzfl.GeometricMedian(nu=0.1, T=3)(X.copy()), rtol=1e-10)


def test_centered_clipping_is_stateful_like_byzfl():
    ours, theirs = build("centered-clipping", tau=1.5), byzfl.CenteredClipping(L=1, tau=1.5)
    for seed in range(5):
        X = gaussian(seed, 8, 5) + seed
        np.testing.assert_allclose(ours(X), theirs(X.copy()), rtol=1e-12)


# --------------------------------------------------------------------------------------------
# attacks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("z", [0.5, 1.5])
def test_alie_ipm_signflip_mimic_match_byzfl(z):
    for seed in range(10):
        H = gaussian(seed, 8, 6)
        np.testing.assert_allclose(build_attack("alie", z=z, sign=1, ddof=1)(H, 3, None),
                                   np.tile(byzfl.ALittleIsEnough(tau=z)(H.copy()), (3, 1)))
        np.testing.assert_allclose(build_attack("ipm", epsilon=z)(H, 2, None)[0],
                                   byzfl.InnerProductManipulation(tau=z)(H.copy()))
        np.testing.assert_allclose(build_attack("signflip", flavour="mean")(H, 2, None)[1],
                                   byzfl.SignFlipping()(H.copy()))
        np.testing.assert_allclose(build_attack("mimic", target=seed % 8)(H, 1, None)[0],
                                   byzfl.Mimic(epsilon=seed % 8)(H.copy()))
    assert np.isposinf(byzfl.Inf()(H.copy())).all() and np.isposinf(
        build_attack("inf")(H, 1, None)).all()


@pytest.mark.parametrize(
    ("name", "params"),
    [("median", {}), ("trimmed-mean", {"f": 3}), ("meamed", {"f": 3}), ("phocas", {"f": 3}),
     ("krum", {"f": 3}), ("multikrum", {"f": 3}), ("bulyan", {"f": 3}),
     ("bulyan", {"f": 3, "variant": "flower"}), ("geomedian", {}),
     ("centered-clipping", {"tau": 1.0}), ("flag", {}), ("nnm+trimmed-mean", {"f": 3}),
     ("clipping+nnm+geomedian", {"f": 3})],
)
def test_rules_survive_byzfl_inf_attackers(name, params):
    honest = gaussian(0, 12, 8) * 0.1 + 1.0
    byz = np.tile(byzfl.Inf()(honest.copy()), (3, 1))
    out = build(name, **params)(np.vstack([byz, honest]))
    assert np.all(np.isfinite(out))
