"""Model soups: reference behaviours of fedins_merging.md §8.3 and the learned soup."""

from __future__ import annotations

import copy
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call

from fedagg.merging import greedy_soup, learned_soup, linear, uniform_soup

THETAS = [0.2, -0.3, 1.5, -0.1]


def scalar_models(values, kind="numpy"):
    if kind == "torch":
        return [{"w": torch.tensor([v], dtype=torch.float64)} for v in values]
    return [{"w": np.array([v], dtype=np.float64)} for v in values]


def neg_abs(params) -> float:
    return -abs(float(params["w"][0]))


# ----------------------------------------------------------------- uniform / linear

@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_uniform_soup_is_mean_of_state_dicts(kind):
    out = uniform_soup(scalar_models(THETAS, kind))
    assert isinstance(out["w"], torch.Tensor if kind == "torch" else np.ndarray)
    assert float(out["w"][0]) == pytest.approx(0.325, abs=1e-12)
    rng = np.random.default_rng(0)
    models = [{"body": rng.normal(size=(3, 2)), "head": rng.normal(size=4), "n": np.array(i)}
              for i in range(3)]
    soup = uniform_soup(models)
    np.testing.assert_allclose(soup["body"], np.mean([m["body"] for m in models], 0), rtol=1e-14)
    np.testing.assert_allclose(soup["head"], np.mean([m["head"] for m in models], 0), rtol=1e-14)
    assert soup["n"] == 0  # non-floating entries come from models[0]
    weighted = uniform_soup(models, weights=[1.0, 0.0, 3.0])
    np.testing.assert_allclose(weighted["head"], (models[0]["head"] + 3 * models[2]["head"]) / 4)


def test_linear_mergekit():
    models = scalar_models([1.0, 3.0])
    assert float(linear(models, [1.0, 3.0])["w"][0]) == pytest.approx(2.5)
    assert float(linear(models, [1.0, 3.0], normalize=False)["w"][0]) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="sum to 0"):
        linear(models, [1.0, -1.0])


def test_running_mean_equals_batch_mean():
    rng = np.random.default_rng(1)
    thetas = [rng.normal(size=10) for _ in range(6)]
    running = thetas[0]
    for n, t in enumerate(thetas[1:], start=1):
        running = running * n / (n + 1) + t / (n + 1)
    soup = uniform_soup([{"w": t} for t in thetas])
    np.testing.assert_allclose(soup["w"], running, rtol=1e-12)


def test_soup_of_identical_models_is_bit_exact_and_inputs_untouched():
    rng = np.random.default_rng(2)
    theta = {"w": rng.normal(size=(5, 3)), "b": rng.normal(size=3)}
    theta = {k: v.astype(np.float32) for k, v in theta.items()}
    saved = copy.deepcopy(theta)
    for out in (uniform_soup([theta] * 7), uniform_soup([theta] * 3, weights=[0.1, 0.2, 0.7]),
                linear([theta] * 3, [0.3, 0.3, 0.3])):
        for k in theta:
            assert out[k].dtype == np.float32
            np.testing.assert_array_equal(out[k], theta[k])
            assert out[k] is not theta[k]
    for k in theta:
        np.testing.assert_array_equal(theta[k], saved[k])


# ----------------------------------------------------------------- greedy (§8.3)

@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_greedy_soup_toy(kind):
    r = greedy_soup(scalar_models(THETAS, kind), neg_abs)
    assert r.order == [3, 0, 1, 2]  # sorted by −|θ|: −0.1, 0.2, −0.3, 1.5
    assert r.indices == [3, 0]  # −0.3 and 1.5 rejected
    assert float(r.soup["w"][0]) == pytest.approx(0.05, abs=1e-12)
    assert r.score == pytest.approx(-0.05, abs=1e-12)
    assert r.individual_scores == pytest.approx([-0.2, -0.3, -1.5, -0.1])
    # candidates: {−0.1} = −0.1; {−0.1, 0.2} = 0.05; {…, −0.3} = −0.0667; {…, 1.5} = 0.4
    assert r.candidate_scores == pytest.approx([-0.1, -0.05, -0.2 / 3, -1.6 / 3])
    assert isinstance(r.soup["w"], torch.Tensor if kind == "torch" else np.ndarray)


def test_greedy_soup_tie_strict_vs_paper():
    models = scalar_models([0.5, -1.5])  # candidate mean −0.5 scores −0.5 = best
    assert float(greedy_soup(models, neg_abs).soup["w"][0]) == 0.5
    loose = greedy_soup(models, neg_abs, strict=False)
    assert loose.indices == [0, 1] and float(loose.soup["w"][0]) == -0.5


def test_greedy_soup_explicit_order_and_call_count():
    calls = []

    def evaluate(p):
        calls.append(float(p["w"][0]))
        return neg_abs(p)

    r = greedy_soup(scalar_models(THETAS), evaluate)
    assert len(calls) == 4 + 3
    calls.clear()
    r2 = greedy_soup(scalar_models(THETAS), evaluate, order=[2, 1])
    assert len(calls) == 2 and r2.individual_scores is None
    assert r2.indices == [2, 1] and float(r2.soup["w"][0]) == pytest.approx(0.6)
    assert r.indices == [3, 0]
    with pytest.raises(ValueError, match="order"):
        greedy_soup(scalar_models(THETAS), evaluate, order=[0, 0])


def test_greedy_soup_nan_scores_sort_last_and_evaluate_cannot_mutate():
    models = scalar_models([1.0, 2.0, 3.0])
    saved = copy.deepcopy(models)

    def evaluate(p):
        value = float(p["w"][0])
        p["w"][0] = 1e9  # a careless evaluator writes into what it gets
        return float("nan") if value == 3.0 else -value

    r = greedy_soup(models, evaluate)
    assert r.order == [0, 1, 2]
    assert all(np.array_equal(m["w"], s["w"]) for m, s in zip(models, saved, strict=True))


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(-10, 10, allow_nan=False), min_size=1, max_size=6),
    seed=st.integers(0, 2**31 - 1),
    strict=st.booleans(),
)
def test_greedy_soup_never_worse_than_best_ingredient(values, seed, strict):
    """An arbitrary (but deterministic) held-out score: a hash of the soup's bytes."""

    def evaluate(p) -> float:
        key = zlib.crc32(np.ascontiguousarray(p["w"]).tobytes()) ^ seed
        return float(np.random.default_rng(key).normal())

    models = [{"w": np.array([v, -2 * v])} for v in values]
    r = greedy_soup(models, evaluate, strict=strict)
    best = max(evaluate(m) for m in models)
    assert r.score >= best
    assert r.score == evaluate(r.soup)
    assert r.indices[0] == r.order[0] and sorted(r.indices) == sorted(set(r.indices))
    chosen = uniform_soup([models[i] for i in r.indices])
    np.testing.assert_array_equal(chosen["w"], r.soup["w"])


# ----------------------------------------------------------------- learned soup

def _classifier_setup():
    """Three linear classifiers on separable 2-D data; model 0 is the only good one."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, generator=g)
    y = (x[:, 0] > 0).long()
    good = {"weight": torch.tensor([[-3.0, 0.0], [3.0, 0.0]]), "bias": torch.zeros(2)}
    bad1 = {"weight": torch.tensor([[3.0, 0.0], [-3.0, 0.0]]), "bias": torch.zeros(2)}
    bad2 = {"weight": torch.tensor([[0.0, 2.0], [0.0, -2.0]]), "bias": torch.tensor([0.5, -0.5])}
    net = torch.nn.Linear(2, 2)

    def loss_fn(params, beta=None):
        logits = functional_call(net, params, (x,))
        if beta is not None:
            logits = beta * logits
        return torch.nn.functional.cross_entropy(logits, y)

    return [good, bad1, bad2], loss_fn


def test_learned_soup_moves_weight_to_the_good_model():
    models, loss_fn = _classifier_setup()
    r = learned_soup(models, loss_fn, steps=60)
    assert r.coefficients.shape == (3,) and r.coefficients.sum() == pytest.approx(1.0)
    assert r.coefficients.argmax() == 0 and r.coefficients[0] > 0.6
    assert r.losses[-1] < r.losses[0] and len(r.losses) == 60
    assert r.temperature is None
    want = sum(c * m["weight"] for c, m in zip(r.coefficients.tolist(), models, strict=True))
    torch.testing.assert_close(r.soup["weight"], want, rtol=1e-5, atol=1e-6)
    again = learned_soup(models, loss_fn, steps=60)
    assert np.array_equal(again.coefficients, r.coefficients)  # deterministic
    assert all(torch.equal(again.soup[k], r.soup[k]) for k in r.soup)


def test_learned_soup_per_tensor_and_temperature_and_numpy():
    models, loss_fn = _classifier_setup()
    r = learned_soup(models, loss_fn, granularity="tensor", steps=30, learn_temperature=True)
    assert r.coefficients.shape == (2, 3) and r.tensor_names == ["weight", "bias"]
    np.testing.assert_allclose(r.coefficients.sum(axis=1), 1.0)
    assert r.temperature is not None and r.temperature != 1.0
    np_models = [{k: v.numpy() for k, v in m.items()} for m in models]
    saved = copy.deepcopy(np_models)
    r_np = learned_soup(np_models, loss_fn, steps=5)
    assert isinstance(r_np.soup["weight"], np.ndarray) and r_np.soup["weight"].dtype == np.float32
    assert all(np.array_equal(m[k], s[k]) for m, s in zip(np_models, saved, strict=True) for k in m)
    same = learned_soup([models[1]] * 3, loss_fn, steps=5)
    assert all(torch.equal(same.soup[k], models[1][k]) for k in models[1])
    zero = learned_soup(models, loss_fn, steps=0)
    np.testing.assert_allclose(zero.coefficients, [1 / 3] * 3)
