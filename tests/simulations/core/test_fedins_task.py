"""The ``fedins`` client task: only the pool trains; keys learn from the surrogate only."""

from __future__ import annotations

import pytest
import torch

from fedagg.errors import ConfigError
from fedagg.models import build_model
from fedagg.models.fedins import frozen_state
from fedagg.rng import torch_generator
from fedagg.training import LocalTrainConfig
from simulations.core.tasks.fedins import train_pool

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _setup():
    model = build_model("fedins", (40,), 10, seed=1,
                        params={"backbone": "mnist1d-transformer-quick", "pool_size": 5, "top_k": 2})
    gen = torch_generator(0, "data")
    x = torch.randn(40, 40, generator=gen)
    y = torch.randint(0, 10, (40,), generator=gen)
    return model, x, y


def _pool(model):
    return {k: v.clone() for k, v in model.federated_state_dict().items()}


CFG = LocalTrainConfig(steps=4, lr=0.5, batch_size=8)


def test_only_the_pool_trains_and_training_is_deterministic():
    model, x, y = _setup()
    frozen, start = frozen_state(model), _pool(model)
    stats = train_pool(model, x, y, CFG, torch_generator(0, "local-train", 1, 0), lam=0.1)
    after = frozen_state(model)
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    moved = {k for k, v in _pool(model).items() if not torch.equal(v, start[k])}
    assert {"keys", "head_weight", "head_bias"} <= moved
    assert any(".scale" in k for k in moved) and any(".shift" in k for k in moved)
    assert set(stats) == {"train_loss", "train_ce", "train_cos", "slots_used"}
    assert -1.0 <= stats["train_cos"] <= 1.0 and 1 <= stats["slots_used"] <= 5
    # (1 − λ)·CE + λ·(1 − k·cos) recombines to the reported loss (means over the same steps)
    assert stats["train_loss"] == pytest.approx(
        0.9 * stats["train_ce"] + 0.1 * (1 - 2 * stats["train_cos"]), abs=1e-5)
    first = _pool(model)
    model.load_pool_state_dict(start)
    train_pool(model, x, y, CFG, torch_generator(0, "local-train", 1, 0), lam=0.1)
    assert all(torch.equal(v, first[k]) for k, v in _pool(model).items())


def test_keys_learn_only_from_the_surrogate_and_slots_only_from_ce():
    model, x, y = _setup()
    start = _pool(model)
    train_pool(model, x, y, CFG, torch_generator(0, "g"), lam=0.0)
    after = _pool(model)
    assert torch.equal(after["keys"], start["keys"])  # λ = 0: no gradient reaches the keys
    assert not torch.equal(after["head_weight"], start["head_weight"])
    model.load_pool_state_dict(start)
    train_pool(model, x, y, CFG, torch_generator(0, "g"), lam=1.0)
    after = _pool(model)
    assert not torch.equal(after["keys"], start["keys"])
    for k in after:  # λ = 1: no cross-entropy, so SSF and head slots stay put
        if k != "keys":
            assert torch.equal(after[k], start[k]), k


def test_adam_and_bad_optimizer():
    model, x, y = _setup()
    start = _pool(model)
    train_pool(model, x, y, LocalTrainConfig(steps=2, lr=1e-2, batch_size=8), torch_generator(0),
               optimizer="adam")
    # Adam's first step moves every selected entry by about lr
    delta = (model.keys - start["keys"]).abs().max().item()
    assert delta == pytest.approx(2e-2, rel=0.05)
    with pytest.raises(ConfigError, match="optimizer"):
        train_pool(model, x, y, CFG, torch_generator(0), optimizer="lion")
    empty = train_pool(model, x[:0], y[:0], CFG, torch_generator(0))
    assert all(v != v for v in empty.values())  # NaN for a client without data
