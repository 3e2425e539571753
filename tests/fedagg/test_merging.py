"""Fisher merging (vectors M1–M7, G of fedins_merging.md §8.1), task arithmetic and TIES."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from fedagg.errors import ConfigError
from fedagg.merging import (
    dirichlet_coefficients,
    fisher_merge,
    fisher_norm,
    magnitude_trim,
    pairwise_grid_coefficients,
    search_coefficients,
    task_arithmetic,
    ties,
)

KINDS = ["numpy", "torch"]


def sd(kind: str, **entries) -> dict:
    """A state dict of float64 numpy arrays or torch tensors."""
    if kind == "torch":
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in entries.items()}
    return {k: np.asarray(v, dtype=np.float64) for k, v in entries.items()}


def npy(x) -> np.ndarray:
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def check_kind(out: dict, kind: str) -> None:
    for v in out.values():
        assert isinstance(v, torch.Tensor if kind == "torch" else np.ndarray)


# ----------------------------------------------------------------- M1–M7, G (reference §8.1)

@pytest.mark.parametrize("kind", KINDS)
def test_m1_m2_isometric(kind):
    models = [sd(kind, w=[1, 2, 3]), sd(kind, w=[3, 2, 1])]
    m1 = fisher_merge(models, None, [0.5, 0.5])
    m2 = fisher_merge(models, None, [0.25, 0.75])
    check_kind(m1, kind)
    np.testing.assert_allclose(npy(m1["w"]), [2, 2, 2], atol=1e-6)
    np.testing.assert_allclose(npy(m2["w"]), [2.5, 2, 1.5], atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_m3_fisher_weighted_no_norm(kind):
    models = [sd(kind, w=[1, 1, 1]), sd(kind, w=[3, 3, 3])]
    fishers = [sd(kind, w=[1, 3, 0.5]), sd(kind, w=[1, 1, 1.5])]
    out = fisher_merge(models, fishers, [0.5, 0.5], normalize=False)
    # coordinate 1: (1·3·1 + 1·1·3)/(3 + 1) = 1.5
    np.testing.assert_allclose(npy(out["w"]), [2.0, 1.5, 2.5], atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_m4_m5_floor_and_favor_target(kind):
    models = [sd(kind, w=[1, 1, 1]), sd(kind, w=[3, 3, 3])]
    fishers = [sd(kind, w=[0, 0, 1]), sd(kind, w=[2, 0, 1])]
    m4 = fisher_merge(models, fishers, [0.5, 0.5], normalize=False, floor=1e-6, favor_target=True)
    m5 = fisher_merge(models, fishers, [0.5, 0.5], normalize=False, floor=1e-6, favor_target=False)
    # coordinate 0: (1e-6·1 + 2·3)/(1e-6 + 2); coordinate 1: all F = 0 → target (M4) or mean (M5)
    np.testing.assert_allclose(npy(m4["w"]), [2.999999, 1.0, 2.0], atol=1e-6)
    np.testing.assert_allclose(npy(m5["w"]), [2.999999, 2.0, 2.0], atol=1e-6)
    assert npy(m4["w"])[0] == pytest.approx((1e-6 + 6) / (1e-6 + 2), abs=1e-12)


def m6_inputs(kind):
    models = [
        sd(kind, a=[1, 2], b=[0.5]),
        sd(kind, a=[3, 0], b=[1.5]),
        sd(kind, a=[-1, 4], b=[2.5]),
    ]
    fishers = [sd(kind, a=[4, 0], b=[3]), sd(kind, a=[1, 1], b=[1]), sd(kind, a=[0, 2], b=[2])]
    return models, fishers


@pytest.mark.parametrize("kind", KINDS)
def test_m6_normalized_three_models(kind):
    models, fishers = m6_inputs(kind)
    assert [fisher_norm(f) for f in fishers] == pytest.approx([5, math.sqrt(3), 2 * math.sqrt(2)])
    out = fisher_merge(models, fishers, [0.2, 0.3, 0.5], normalize=True, favor_target=True)
    check_kind(out, kind)
    np.testing.assert_allclose(npy(out["a"]), [2.0396304, 2.6847475], atol=1e-6)
    np.testing.assert_allclose(npy(out["b"]), [1.8611139], atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_m7_unnormalized_three_models(kind):
    models, fishers = m6_inputs(kind)
    out = fisher_merge(models, fishers, [0.2, 0.3, 0.5], normalize=False)
    np.testing.assert_allclose(npy(out["a"]), [1.5454545, 3.0769229], atol=1e-6)
    np.testing.assert_allclose(npy(out["b"]), [1.7105263], atol=1e-6)
    # b by hand: (.2·3·.5 + .3·1·1.5 + .5·2·2.5) / (.2·3 + .3·1 + .5·2) = 3.25 / 1.9
    assert float(npy(out["b"])[0]) == pytest.approx(3.25 / 1.9, abs=1e-12)


def test_g_pairwise_grid():
    assert pairwise_grid_coefficients(5) == [(1, 0), (0.75, 0.25), (0.5, 0.5), (0.25, 0.75), (0, 1)]
    grid = pairwise_grid_coefficients(51)
    assert len(grid) == 51 and grid[1] == pytest.approx((0.98, 0.02), abs=1e-12)
    assert all(a + b == pytest.approx(1.0, abs=1e-12) for a, b in grid)
    with pytest.raises(ValueError):
        pairwise_grid_coefficients(1)


# ----------------------------------------------------------------- fisher_merge semantics

def test_normalize_removes_fisher_scale():
    rng = np.random.default_rng(0)
    models = [{"w": rng.normal(size=5), "v": rng.normal(size=(2, 2))} for _ in range(3)]
    fishers = [{"w": rng.random(5), "v": rng.random((2, 2))} for _ in range(3)]
    scales = [10.0, 0.1, 3.0]
    scaled = [{k: c * v for k, v in f.items()} for f, c in zip(fishers, scales, strict=True)]
    a = fisher_merge(models, fishers, [0.2, 0.3, 0.5], normalize=True, floor=0.0)
    b = fisher_merge(models, scaled, [0.2, 0.3, 0.5], normalize=True, floor=0.0)
    c = fisher_merge(models, scaled, [0.2, 0.3, 0.5], normalize=False, floor=0.0)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-12)
    assert not np.allclose(a["w"], c["w"])


def test_head_and_non_floating_entries_come_from_target():
    models = [
        {"body": np.array([1.0, 2.0]), "head": np.array([7.0]), "steps": np.array(3)},
        {"body": np.array([3.0, 4.0]), "head": np.array([9.0, 9.0]), "steps": np.array(5)},
    ]
    fishers = [{"body": np.array([1.0, 1.0])}, {"body": np.array([1.0, 3.0])}]
    out = fisher_merge(models, fishers, [0.5, 0.5], normalize=False)
    np.testing.assert_allclose(out["body"], [2.0, 3.5])
    np.testing.assert_array_equal(out["head"], [7.0])
    assert out["head"] is not models[0]["head"]
    assert out["steps"] == 3 and out["steps"].dtype == models[0]["steps"].dtype


def test_zero_denominator_falls_back_to_target():
    # λ_0 = 0 removes the target's floor: coordinate 1 has Σ λ'F̃ = 0; reference gives NaN there
    models = [{"w": np.array([1.0, 1.0])}, {"w": np.array([3.0, 3.0])}]
    fishers = [{"w": np.array([0.0, 0.0])}, {"w": np.array([2.0, 0.0])}]
    out = fisher_merge(models, fishers, [0.0, 1.0], normalize=False)
    np.testing.assert_array_equal(out["w"], [3.0, 1.0])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("favor_target", [True, False])
def test_merging_a_model_with_itself_is_bit_exact(kind, normalize, favor_target):
    rng = np.random.default_rng(1)
    theta = {"w": rng.normal(size=(4, 3)), "b": rng.normal(size=3)}
    theta = {k: v.astype(np.float32) for k, v in theta.items()}
    fishers = [{k: rng.random(v.shape, dtype=np.float32) for k, v in theta.items()} for _ in range(3)]
    if kind == "torch":
        theta = {k: torch.from_numpy(v) for k, v in theta.items()}
    out = fisher_merge([theta] * 3, fishers, [0.1, 0.7, 0.2], normalize, 1e-6, favor_target)
    for k in theta:
        assert out[k].dtype == theta[k].dtype
        np.testing.assert_array_equal(npy(out[k]), npy(theta[k]))
    iso = fisher_merge([theta, theta], None, [0.3, 0.7])
    np.testing.assert_array_equal(npy(iso["w"]), npy(theta["w"]))


def test_numpy_torch_parity_and_no_mutation():
    rng = np.random.default_rng(2)
    models = [{"w": rng.normal(size=(3, 2)), "b": rng.normal(size=2)} for _ in range(3)]
    fishers = [{"w": rng.random((3, 2)), "b": rng.random(2)} for _ in range(3)]
    saved = copy.deepcopy((models, fishers))
    out_np = fisher_merge(models, fishers, [0.2, 0.3, 0.5])
    tm = [{k: torch.from_numpy(v.copy()) for k, v in m.items()} for m in models]
    tf = [{k: torch.from_numpy(v.copy()) for k, v in f.items()} for f in fishers]
    out_t = fisher_merge(tm, tf, [0.2, 0.3, 0.5])
    for k in out_np:
        np.testing.assert_array_equal(out_np[k], out_t[k].numpy())
    for now, before in zip((models, fishers), saved, strict=True):
        for d, d0 in zip(now, before, strict=True):
            for k in d:
                np.testing.assert_array_equal(d[k], d0[k])


def test_read_only_numpy_inputs_and_float32_result():
    a = np.array([1.0, 2.0], dtype=np.float32)
    a.setflags(write=False)
    out = fisher_merge([{"w": a}, {"w": np.array([3.0, 4.0], dtype=np.float32)}], None, [1, 1])
    assert out["w"].dtype == np.float32
    np.testing.assert_array_equal(out["w"], [2.0, 3.0])


def test_fisher_merge_errors():
    m = [{"w": np.ones(2)}, {"w": np.zeros(2)}]
    with pytest.raises(ValueError, match="L2 norm"):
        fisher_merge(m, [{"w": np.zeros(2)}, {"w": np.ones(2)}], [1, 1], normalize=True)
    with pytest.raises(ValueError, match="coefficients"):
        fisher_merge(m, None, [1, -1])
    with pytest.raises(ValueError, match="entries"):
        fisher_merge(m, None, [1, 1, 1])
    with pytest.raises(ValueError, match="missing"):
        fisher_merge(m, [{"w": np.ones(2)}, {"v": np.ones(2)}], [1, 1])
    with pytest.raises(ValueError, match="shape"):
        fisher_merge(m, [{"w": np.ones(2)}, {"w": np.ones(3)}], [1, 1])


def test_coefficient_search_keeps_best():
    models = [{"w": np.array([0.0])}, {"w": np.array([1.0])}]
    coeffs, score, merged = search_coefficients(
        models, None, lambda p: -abs(float(p["w"][0]) - 0.3), pairwise_grid_coefficients(11)
    )
    assert coeffs == pytest.approx([0.7, 0.3]) and score == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(merged["w"], [0.3])
    draws = dirichlet_coefficients(3, 4, np.random.default_rng(0))
    assert draws.shape == (4, 3)
    np.testing.assert_allclose(draws.sum(axis=1), 1.0)
    np.testing.assert_array_equal(draws, dirichlet_coefficients(3, 4, np.random.default_rng(0)))


# ----------------------------------------------------------------- task arithmetic (mergekit)

@pytest.mark.parametrize("kind", KINDS)
def test_task_arithmetic_by_hand(kind):
    base = sd(kind, w=[1, 1])
    models = [sd(kind, w=[2, 3]), sd(kind, w=[0, 1])]
    # δ1 = [1, 2], δ2 = [-1, 0]; Σ wδ = 1·δ1 + 0.5·δ2 = [0.5, 2]
    out = task_arithmetic(base, models, [1.0, 0.5], lambda_=0.5)
    check_kind(out, kind)
    np.testing.assert_allclose(npy(out["w"]), [1 + 0.5 * 0.5, 1 + 0.5 * 2], atol=1e-12)
    out = task_arithmetic(base, models, [1.0, 0.5], lambda_=0.5, normalize=True)
    np.testing.assert_allclose(npy(out["w"]), [1 + 0.5 * 0.5 / 1.5, 1 + 0.5 * 2 / 1.5], atol=1e-12)
    # negation: weight −1 subtracts the task vector
    out = task_arithmetic(base, models[:1], [-1.0])
    np.testing.assert_allclose(npy(out["w"]), [0, -1], atol=1e-12)


def test_task_arithmetic_normalize_guard_on_zero_weight_sum():
    base = {"w": np.zeros(1)}
    out = task_arithmetic(base, [{"w": np.ones(1)}, {"w": 3 * np.ones(1)}], [1, -1], normalize=True)
    np.testing.assert_allclose(out["w"], [-2.0])  # |Σw| < 1e-8 → divisor 1 (mergekit)


def test_task_arithmetic_identity_is_bit_exact():
    rng = np.random.default_rng(3)
    # a large base and a small fine-tuned model: θ − base rounds, so base + δ ≠ θ in float32
    base = {"w": (30 * rng.normal(size=50)).astype(np.float32)}
    theta = {"w": (1e-3 * rng.normal(size=50)).astype(np.float32)}
    naive = base["w"] + (theta["w"] - base["w"])
    assert not np.array_equal(naive, theta["w"])  # the rounding the special case avoids
    for models, w, norm in (([theta], [1.0], False), ([theta, theta], [0.5, 0.5], False),
                            ([theta, theta], [0.3, 0.7], True)):
        out = task_arithmetic(base, models, w, normalize=norm)
        np.testing.assert_array_equal(out["w"], theta["w"])
    out = task_arithmetic(base, [theta], [0.5])
    assert not np.array_equal(out["w"], theta["w"])


# ----------------------------------------------------------------- TIES (mergekit)

def test_magnitude_trim():
    d = torch.tensor([1.0, -2.0, 3.0, 0.5])
    assert magnitude_trim(d, 0.5).tolist() == [0.0, -2.0, 3.0, 0.0]
    assert magnitude_trim(d, 0.74).tolist() == [0.0, -2.0, 3.0, 0.0]  # k = ⌊0.74·4⌋ = 2
    assert magnitude_trim(d, 1.0) is d
    # equal magnitudes at the cut: the earliest index is kept
    assert magnitude_trim(torch.tensor([1.0, -1.0, 1.0]), 0.34).tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(ConfigError, match="density"):
        magnitude_trim(torch.tensor([1.0, 2.0]), 0.4, "bias")


@pytest.mark.parametrize("kind", KINDS)
def test_ties_by_hand(kind):
    base = sd(kind, w=[0, 0, 0, 0])
    models = [sd(kind, w=[1, -2, 3, 0.5]), sd(kind, w=[-1, 1, 2, -4])]
    # trim to 2 of 4: δ̂1 = [0, -2, 3, 0], δ̂2 = [0, 0, 2, -4]
    # Σ = [0, -2, 5, -4] → elected signs s = [+, -, +, -]
    # masks: m1 = [0, 1, 1, 0], m2 = [0, 0, 1, 1]; Σ wδ̂m = [0, -2, 5, -4]; D = [0→1, 1, 2, 1]
    out = ties(base, models, [1.0, 1.0], density=0.5)
    check_kind(out, kind)
    np.testing.assert_allclose(npy(out["w"]), [0, -2, 2.5, -4], atol=1e-12)
    out = ties(base, models, [1.0, 1.0], density=0.5, normalize=False, lambda_=0.5)
    np.testing.assert_allclose(npy(out["w"]), [0, -1, 2.5, -2], atol=1e-12)


def test_ties_elects_sign_on_weighted_deltas():
    base = {"w": np.array([1.0])}
    models = [{"w": np.array([4.0])}, {"w": np.array([-1.0])}]  # δ = 3 and -2
    # w = [1, 1]: Σ = 1 ≥ 0 → +, only model 0 agrees → δ = 3/1
    np.testing.assert_allclose(ties(base, models, [1.0, 1.0], 1.0)["w"], [4.0])
    # w = [1, 2]: Σ = 3 - 4 < 0 → −, only model 1 agrees → δ = (2·-2)/2 = -2
    np.testing.assert_allclose(ties(base, models, [1.0, 2.0], 1.0)["w"], [-1.0])


def test_ties_per_model_density_and_base_passthrough():
    base = {"w": np.zeros(4), "n": np.array([7])}
    models = [{"w": np.array([1.0, 2.0, 3.0, 4.0]), "n": np.array([1])},
              {"w": np.array([4.0, 3.0, 2.0, 1.0]), "n": np.array([2])}]
    # model 0 keeps all 4 entries, model 1 keeps 1 (⌊0.25·4⌋): δ̂2 = [4, 0, 0, 0]
    out = ties(base, models, [1.0, 1.0], density=[1.0, 0.25])
    np.testing.assert_allclose(out["w"], [2.5, 2.0, 3.0, 4.0])
    np.testing.assert_array_equal(out["n"], [7])


def ties_oracle(base, models, weights, density, lam, normalize):
    """Straight numpy restatement of reference §6 for one flat tensor."""
    deltas = []
    for m, dens in zip(models, density, strict=True):
        d = m - base
        k = int(dens * d.size)
        if dens < 1:
            keep = np.argsort(-np.abs(d), kind="stable")[:k]
            trimmed = np.zeros_like(d)
            trimmed[keep] = d[keep]
            d = trimmed
        deltas.append(d)
    wd = np.array([w * d for w, d in zip(weights, deltas, strict=True)])
    sign = np.where(wd.sum(0) >= 0, 1.0, -1.0)
    mask = np.sign(wd) == sign
    mixed = (wd * mask).sum(0)
    if normalize:
        div = (np.array(weights)[:, None] * mask).sum(0)
        mixed = mixed / np.where(div == 0, 1.0, div)
    return base + lam * mixed


@pytest.mark.parametrize("seed", range(4))
def test_ties_matches_definition_on_random_inputs(seed):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=40)
    models = [base + rng.normal(size=40) for _ in range(3)]
    weights = list(rng.uniform(0.2, 1.5, size=3))
    density = list(rng.uniform(0.2, 1.0, size=3))
    lam = float(rng.uniform(0.5, 1.5))
    for normalize in (True, False):
        want = ties_oracle(base, models, weights, density, lam, normalize)
        got = ties({"w": base}, [{"w": m} for m in models], weights, density, lam, normalize)
        np.testing.assert_allclose(got["w"], want, rtol=1e-12, atol=1e-12)
        t = ties({"w": torch.from_numpy(base)}, [{"w": torch.from_numpy(m)} for m in models],
                 weights, density, lam, normalize)
        np.testing.assert_array_equal(t["w"].numpy(), got["w"])


def test_ties_identity_and_no_mutation():
    rng = np.random.default_rng(5)
    base = {"w": (30 * rng.normal(size=30)).astype(np.float32)}
    theta = {"w": (1e-3 * rng.normal(size=30)).astype(np.float32)}
    saved = copy.deepcopy((base, theta))
    out = ties(base, [theta, theta], [0.5, 0.5], density=1.0)
    np.testing.assert_array_equal(out["w"], theta["w"])
    out = ties(base, [theta, theta], [0.5, 0.5], density=1.0, normalize=False)
    np.testing.assert_array_equal(out["w"], theta["w"])
    # density < 1: kept coordinates are θ exactly, trimmed ones the base exactly
    out = ties(base, [theta, theta], [0.3, 0.7], density=0.5)
    kept = out["w"] != base["w"]
    assert kept.sum() == 15
    np.testing.assert_array_equal(out["w"][kept], theta["w"][kept])
    np.testing.assert_array_equal(base["w"], saved[0]["w"])
    np.testing.assert_array_equal(theta["w"], saved[1]["w"])


def test_ties_rejects_bad_density():
    base = {"w": np.zeros(2)}
    with pytest.raises(ConfigError, match="density"):
        ties(base, [{"w": np.ones(2)}], [1.0], density=0.0)
    with pytest.raises(ValueError, match="keys"):
        ties(base, [{"v": np.ones(2)}], [1.0], density=1.0)
