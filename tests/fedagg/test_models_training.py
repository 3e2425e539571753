"""Models build deterministically without touching global RNGs; local SGD is reproducible."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedagg.data import load_central
from fedagg.errors import ConfigError
from fedagg.models import build_model, model_names
from fedagg.rng import torch_generator
from fedagg.training import (
    LocalTrainConfig,
    evaluate,
    load_numpy_state,
    local_sgd,
    minibatches,
    state_to_numpy,
)


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_models_are_deterministic_and_leave_global_rng_alone(name: str) -> None:
    state = torch.random.get_rng_state().clone()
    a = build_model(name, (40,), 10, seed=3)
    b = build_model(name, (40,), 10, seed=3)
    c = build_model(name, (40,), 10, seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    sa, sb, sc = state_to_numpy(a), state_to_numpy(b), state_to_numpy(c)
    assert all(np.array_equal(sa[k], sb[k]) for k in sa)
    assert not all(np.array_equal(sa[k], sc[k]) for k in sa)
    assert a(torch.zeros(2, 40)).shape == (2, 10)


def test_unknown_model_and_bad_params() -> None:
    assert {"mlp", "cnn", "transformer"} <= set(model_names())
    with pytest.raises(ConfigError, match="model"):
        build_model("resnet", (40,), 10, 0)
    with pytest.raises(ConfigError, match="model_args.channels"):
        build_model("cnn", (40,), 10, 0, {"channels": 0})


def test_minibatches_walk_permutations_and_skip_partial_batches() -> None:
    g = torch_generator(0, "mb")
    batches = list(minibatches(10, 4, 5, g))
    assert [len(b) for b in batches] == [4, 4, 4, 4, 4]
    assert len(set(torch.cat(batches[:2]).tolist())) == 8  # one epoch: no repeats
    small = list(minibatches(3, 8, 2, g))
    assert all(b.tolist() == [0, 1, 2] for b in small)
    assert list(minibatches(0, 8, 2, g)) == []


def test_local_sgd_is_reproducible_and_load_is_in_place() -> None:
    model = build_model("mlp", (40,), 10, 0)
    start = state_to_numpy(model)
    x = torch.randn(50, 40, generator=torch_generator(1, "x"))
    y = torch.randint(0, 10, (50,), generator=torch_generator(1, "y"))
    cfg = LocalTrainConfig(steps=7, lr=0.1, batch_size=16)
    loss1 = local_sgd(model, x, y, cfg, torch_generator(0, "t"))
    after1 = state_to_numpy(model)
    params_before = [p.data_ptr() for p in model.parameters()]
    load_numpy_state(model, start)
    assert [p.data_ptr() for p in model.parameters()] == params_before
    loss2 = local_sgd(model, x, y, cfg, torch_generator(0, "t"))
    after2 = state_to_numpy(model)
    assert loss1 == loss2
    assert all(np.array_equal(after1[k], after2[k]) for k in after1)
    assert not np.array_equal(after1["head.weight"], start["head.weight"])


def test_fedprox_term_pulls_towards_the_anchor() -> None:
    x = torch.randn(64, 40, generator=torch_generator(2, "x"))
    y = torch.randint(0, 10, (64,), generator=torch_generator(2, "y"))

    def drift(mu: float) -> float:
        model = build_model("mlp", (40,), 10, 0)
        start = state_to_numpy(model)
        local_sgd(model, x, y, LocalTrainConfig(steps=30, lr=0.2, batch_size=16, proximal_mu=mu),
                  torch_generator(0, "t"))
        end = state_to_numpy(model)
        return float(sum(np.sum((end[k] - start[k]) ** 2) for k in end))

    assert drift(5.0) < 0.8 * drift(0.0)


@pytest.mark.slow
def test_cnn_reaches_about_96_percent_on_mnist1d_when_trained_centrally() -> None:
    """The MNIST-1D 1-D CNN benchmark number, in test size (10k samples, 3k steps)."""
    torch.set_num_threads(2)
    data = load_central("mnist1d", num_samples=10_000)
    x, y = torch.as_tensor(data.train.x), torch.as_tensor(data.train.y)
    xt, yt = torch.as_tensor(data.test.x), torch.as_tensor(data.test.y)
    model = build_model("cnn", data.input_shape, 10, seed=0)
    cfg = LocalTrainConfig(steps=3000, lr=0.05, batch_size=64, momentum=0.9)
    local_sgd(model, x, y, cfg, torch_generator(0, "central"))
    _, acc = evaluate(model, xt, yt)
    assert acc >= 0.95, acc
