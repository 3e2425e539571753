"""The merge-method registry: mergekit-style validation, dispatch and identity merges."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedagg.errors import ConfigError
from fedagg.merging import (
    MERGE_METHODS,
    build,
    describe,
    fisher_merge,
    merge,
    names,
    task_arithmetic,
    ties,
)

BASE = {"w": np.array([0.0, 0.0, 0.0, 0.0])}
MODELS = [{"w": np.array([1.0, -2.0, 3.0, 0.5])}, {"w": np.array([-1.0, 1.0, 2.0, -4.0])}]


def test_names():
    assert names() == ["fisher", "greedy_soup", "learned_soup", "linear", "task_arithmetic",
                       "ties", "uniform_soup"]


def test_dispatch_matches_functions():
    out = merge("ties", MODELS, [{"weight": 1.0, "density": 0.5}, {"weight": 1.0}],
                {"density": 0.5}, base=BASE)
    np.testing.assert_array_equal(out["w"], ties(BASE, MODELS, [1.0, 1.0], 0.5)["w"])
    out = merge("task_arithmetic", MODELS, [{"weight": 1.0}, {"weight": 0.5}], {"lambda": 2.0},
                base=BASE)
    np.testing.assert_array_equal(
        out["w"], task_arithmetic(BASE, MODELS, [1.0, 0.5], lambda_=2.0)["w"])
    fishers = [{"w": np.array([1.0, 2.0, 3.0, 4.0])}, {"w": np.array([4.0, 3.0, 2.0, 1.0])}]
    out = merge("fisher", MODELS, [{"weight": 0.2}, {"weight": 0.8}], {"normalize": False},
                fishers=fishers)
    np.testing.assert_array_equal(
        out["w"], fisher_merge(MODELS, fishers, [0.2, 0.8], normalize=False)["w"])
    out = merge("linear", MODELS, [{"weight": 1.0}, {"weight": 3.0}], {})
    np.testing.assert_allclose(out["w"], [-0.5, 0.25, 2.25, -2.875])
    out = merge("uniform_soup", MODELS, [{}, {}], {})
    np.testing.assert_allclose(out["w"], [0.0, -0.5, 2.5, -1.75])
    out = merge("greedy_soup", MODELS, [{}, {}], {"strict": False},
                evaluate=lambda p: -float(np.abs(p["w"]).sum()))
    np.testing.assert_allclose(out["w"], [0.0, -0.5, 2.5, -1.75])  # 4.75 < 7.5 (model 0)


def test_global_catch_all_and_precedence():
    # mergekit: a per-model parameter in the global block is the fallback for every model
    out = merge("ties", MODELS, [{"weight": 1.0}, {"weight": 1.0, "density": 1.0}],
                {"density": 0.5}, base=BASE)
    want = ties(BASE, MODELS, [1.0, 1.0], [0.5, 1.0])
    np.testing.assert_array_equal(out["w"], want["w"])
    out = merge("linear", MODELS, [{}, {"weight": 3.0}], {"weight": 1.0})
    np.testing.assert_allclose(out["w"], [-0.5, 0.25, 2.25, -2.875])


@pytest.mark.parametrize(
    ("method", "per_model", "params", "kwargs", "field"),
    [
        ("slerpp", [{}], {}, {}, "merge_method"),
        ("ties", [{"weight": 1.0}], {"lamda": 1.0}, {"base": BASE}, "parameters.lamda"),
        ("ties", [{"wieght": 1.0}], {}, {"base": BASE}, "models[0].parameters.wieght"),
        ("ties", [{"density": 0.5}], {}, {"base": BASE}, "models[0].parameters.weight"),
        ("ties", [{"weight": 1.0, "density": 1.5}], {}, {"base": BASE},
         "models[0].parameters.density"),
        ("ties", [{"weight": 1.0}], {"density": 0.0}, {"base": BASE}, "parameters.density"),
        ("ties", [{"weight": 1.0}], {"normalize": "maybe"}, {"base": BASE}, "parameters.normalize"),
        ("ties", [{"weight": 1.0}], {}, {}, "base_model"),
        ("linear", [{"weight": 1.0}], {}, {"base": BASE}, "base_model"),
        ("fisher", [{}], {}, {}, "fishers"),
        ("fisher", [{"weight": -1.0}], {}, {"fishers": [BASE]}, "models[0].parameters.weight"),
        ("learned_soup", [{}], {"granularity": "layer"}, {}, "parameters.granularity"),
        ("greedy_soup", [{}], {}, {}, "merge_method"),
        ("linear", [{"weight": 1.0}, {"weight": 1.0}], {}, {}, "models"),
    ],
)
def test_config_errors_name_the_field(method, per_model, params, kwargs, field):
    with pytest.raises(ConfigError) as err:
        merge(method, MODELS[:1], per_model, params, **kwargs)
    assert err.value.field == field


def test_unknown_names_list_what_is_allowed():
    with pytest.raises(ConfigError, match="allowed: .*normalize"):
        merge("linear", MODELS, [{"weight": 1}, {"weight": 1}], {"normalise": True})
    with pytest.raises(ConfigError, match="allowed: fisher, greedy_soup"):
        merge("fisher_merge", MODELS, [{}, {}], {})


def test_build_and_registry_entry():
    merger = build("task_arithmetic", **{"lambda": 0.5, "weight": 1.0})
    assert merger.params == {"lambda": 0.5, "normalize": False, "int8_mask": False}
    out = merger(MODELS, [{}, {}], base=BASE)
    np.testing.assert_allclose(out["w"], [0.0, -0.5, 2.5, -1.75])
    assert MERGE_METHODS.build("ties").params == {
        "lambda": 1.0, "normalize": True, "int8_mask": False}
    text = describe("ties")
    assert "needs: base_model" in text and "density (float, default 1.0)" in text
    assert "per-model" in text and "lambda (float, default 1.0)" in text


def _theta(kind):
    rng = np.random.default_rng(7)
    d = {"w": (1e-3 * rng.normal(size=(6, 4))).astype(np.float32),
         "b": (1e-3 * rng.normal(size=4)).astype(np.float32), "steps": np.array(9)}
    base = {"w": (30 * rng.normal(size=(6, 4))).astype(np.float32),
            "b": (30 * rng.normal(size=4)).astype(np.float32), "steps": np.array(0)}
    if kind == "torch":
        d = {k: torch.from_numpy(v) for k, v in d.items()}
        base = {k: torch.from_numpy(v) for k, v in base.items()}
    return d, base


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize(
    ("method", "per_model", "params"),
    [
        ("linear", {"weight": 0.3}, {}),
        ("uniform_soup", {}, {}),
        ("task_arithmetic", {"weight": 0.5}, {}),
        ("task_arithmetic", {"weight": 0.7}, {"normalize": True}),
        ("ties", {"weight": 0.5}, {}),
        ("ties", {"weight": 0.5, "density": 1.0}, {"normalize": False}),
        ("fisher", {"weight": 0.5}, {}),
        ("fisher", {"weight": 0.5}, {"favor_target": False, "normalize": False}),
        ("greedy_soup", {}, {}),
        ("learned_soup", {}, {"steps": 3, "granularity": "tensor"}),
    ],
)
def test_merging_a_model_with_itself_returns_it_bit_for_bit(kind, method, per_model, params):
    theta, base = _theta(kind)
    float_keys = ["w", "b"]
    kwargs = {}
    if method in ("task_arithmetic", "ties"):
        kwargs["base"] = base
    if method == "fisher":
        rng = np.random.default_rng(8)
        kwargs["fishers"] = [{k: rng.random(theta[k].shape).astype(np.float32) for k in float_keys}
                             for _ in range(2)]
    if method == "greedy_soup":
        kwargs["evaluate"] = lambda p: 0.0
    if method == "learned_soup":
        kwargs["loss_fn"] = lambda p: (p["w"] ** 2).sum() + p["b"].sum()
    out = merge(method, [theta, theta], [per_model, per_model], params, **kwargs)
    for k in float_keys:
        assert type(out[k]) is type(theta[k]) and out[k].dtype == theta[k].dtype
        np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(theta[k]))
    src = base if method in ("task_arithmetic", "ties") else theta
    assert int(out["steps"]) == int(src["steps"])
