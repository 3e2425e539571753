"""Batched local training equals the per-client path, client by client (fedagg.batched)."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedagg.batched import ClientJob, batched_local_sgd, can_batch
from fedagg.models import build_model
from fedagg.models.backbone import register_backbone
from fedagg.models.transformer import build_transformer
from fedagg.ssf.pool import SSFPoolModel
from fedagg.ssf.training import batched_train_pool, train_pool
from fedagg.training import LocalTrainConfig, local_sgd, state_to_numpy

TOL = 1e-5
TINY = {"dim": 16, "depth": 1, "heads": 2, "patch": 8}
register_backbone("test-batched-tiny", lambda shape, k, gen: build_transformer(
    math.prod(shape), k, generator=gen, **TINY), overwrite=True,
    doc="untrained tiny transformer (tests only, no pretraining)")
BACKBONE = {"backbone": "test-batched-tiny"}
POOL = {**BACKBONE, "pool_size": 5, "top_k": 2}

# client sizes: several epochs with a skipped partial batch, smaller than its batch, empty, a wider
# batch than the others, and zero steps
SIZES = (37, 5, 0, 20, 12)
BASE = (
    LocalTrainConfig(steps=6, lr=0.1, batch_size=8),
    LocalTrainConfig(steps=3, lr=0.05, batch_size=8),
    LocalTrainConfig(steps=4, lr=0.1, batch_size=8),
    LocalTrainConfig(steps=4, lr=0.2, batch_size=16),
    LocalTrainConfig(steps=0, lr=0.1, batch_size=4),
)
OPTIONS = {
    "plain": {},
    "momentum": {"momentum": 0.9},
    "weight_decay": {"weight_decay": 0.05},
    "prox": {"proximal_mu": 0.5},
    "clip": {"max_grad_norm": 0.05},
    "all": {"momentum": 0.8, "weight_decay": 0.01, "proximal_mu": 0.3, "max_grad_norm": 0.1},
}
# every client its own hyperparameters (per-client coefficient vectors, FedProx on some only)
MIXED = ({"momentum": 0.9, "max_grad_norm": 0.05, "weight_decay": 0.01}, {"proximal_mu": 0.5, "weight_decay": 0.05},
         {}, {"momentum": 0.5, "proximal_mu": 0.1}, {"max_grad_norm": 1.0})


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _data(sizes=SIZES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 40, generator=g), torch.randint(0, 10, (n,), generator=g)) for n in sizes]


def _configs(option: str) -> list[LocalTrainConfig]:
    if option == "mixed":
        return [dataclasses.replace(c, **o) for c, o in zip(BASE, MIXED, strict=True)]
    return [dataclasses.replace(c, **OPTIONS[option]) for c in BASE]


def _jobs(data, cfgs, seed=100):
    return [ClientJob(x, y, c, torch.Generator().manual_seed(seed + i))
            for i, ((x, y), c) in enumerate(zip(data, cfgs, strict=True))]


def _model(kind: str) -> nn.Module:
    params = {"mlp": {"hidden": [16, 8]}, "cnn": {"channels": 4}, "transformer": TINY,
              "ssf": BACKBONE, "head-only": BACKBONE, "fedins": POOL}[kind]
    return build_model(kind, (40,), 10, seed=1, params=params)


def _assert_state_close(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> None:
    assert list(ref) == list(got)
    for k in ref:
        assert ref[k].shape == got[k].shape and got[k].dtype == np.float32, k
        np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=TOL, err_msg=k)


def _same_loss(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= TOL * max(1.0, abs(a))


# --------------------------------------------------------------------------- plain local SGD
@pytest.mark.parametrize("option", [*OPTIONS, "mixed"])
@pytest.mark.parametrize("kind", ["mlp", "cnn", "transformer", "ssf", "head-only", "fedins"])
def test_batched_equals_local_sgd_per_client(kind, option):
    model = _model(kind).eval()
    assert can_batch(model) is None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data, cfgs = _data(), _configs(option)
    jobs = _jobs(data, cfgs)
    out = batched_local_sgd(model, jobs)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # not modified
    assert not any(m.training for m in model.modules())  # modes restored
    init = state_to_numpy(model)
    for i, ((x, y), cfg) in enumerate(zip(data, cfgs, strict=True)):
        ref_model = copy.deepcopy(model)
        gen = torch.Generator().manual_seed(100 + i)
        loss = local_sgd(ref_model, x, y, cfg, gen)
        ref = state_to_numpy(ref_model)
        _assert_state_close(ref, out.client(i))
        assert _same_loss(loss, out.losses[i]), (i, loss, out.losses[i])
        assert out.metrics[i] == {}
        # the client's generator was advanced exactly as local_sgd advances it
        assert torch.equal(gen.get_state(), jobs[i].generator.get_state())
        if len(y) == 0 or cfg.steps == 0:
            assert math.isnan(out.losses[i])
            assert all(np.array_equal(v, init[k]) for k, v in out.client(i).items())
        else:
            assert any(not np.allclose(v, init[k]) for k, v in out.client(i).items())


def test_options_change_the_result():
    """Each option moves the weights (so the equality tests above exercise it)."""
    model, data = _model("mlp"), _data()
    plain = batched_local_sgd(model, _jobs(data, _configs("plain"))).client(0)
    for option in OPTIONS:
        if option != "plain":
            other = batched_local_sgd(model, _jobs(data, _configs(option))).client(0)
            assert max(np.abs(other[k] - plain[k]).max() for k in plain) > 1e-4, option


def test_states_follow_federated_state_keys_and_stack_clients():
    model = _model("ssf")
    out = batched_local_sgd(model, _jobs(_data(), _configs("plain")))
    fed = model.federated_state_dict()
    assert list(out.states) == list(fed)
    assert all(out.states[k].shape == (len(SIZES), *v.shape) for k, v in fed.items())


def test_same_inputs_give_bit_identical_results():
    model, data = _model("transformer"), _data()
    a = batched_local_sgd(model, _jobs(data, _configs("all")))
    b = batched_local_sgd(model, _jobs(data, _configs("all")))
    assert all(torch.equal(a.states[k], b.states[k]) for k in a.states)
    assert np.array_equal(np.array(a.losses), np.array(b.losses), equal_nan=True)


@pytest.mark.parametrize("kind", ["mlp", "cnn", "transformer"])
def test_client_alone_or_with_others_agrees(kind):
    """A client's result does not depend on its batch-mates beyond float32 rounding (it is not always
    bit-identical: padding and the stacked kernels change summation order)."""
    model, data, cfgs = _model(kind), _data(), _configs("all")
    together = batched_local_sgd(model, _jobs(data, cfgs))
    for i in (0, 1, 3):
        alone = batched_local_sgd(model, [_jobs(data, cfgs)[i]])
        _assert_state_close(alone.client(0), together.client(i))
        assert _same_loss(alone.losses[0], together.losses[i])


def test_per_sample_loss_fn_and_its_shape_check():
    model, data = _model("mlp"), _data()
    cfgs = _configs("momentum")

    def smooth(logits, y):
        return F.cross_entropy(logits, y, reduction="none", label_smoothing=0.1)

    out = batched_local_sgd(model, _jobs(data, cfgs), loss_fn=smooth)
    ref = copy.deepcopy(model)
    loss = local_sgd(ref, *data[0], cfgs[0], torch.Generator().manual_seed(100),
                     loss_fn=nn.CrossEntropyLoss(label_smoothing=0.1))
    _assert_state_close(state_to_numpy(ref), out.client(0))
    assert _same_loss(loss, out.losses[0])
    with pytest.raises(ValueError, match="one loss per sample"):
        batched_local_sgd(model, _jobs(data, cfgs), loss_fn=F.cross_entropy)


# ------------------------------------------------------------------------------------- can_batch
class _BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn, self.head = nn.Linear(40, 8), nn.BatchNorm1d(8), nn.Linear(8, 10)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.fc(x))))


def test_can_batch_refuses_batchnorm_dropout_batch_selection_and_frozen_models():
    bn = _BNNet()
    assert "BatchNorm" in can_batch(bn)
    assert bn.training  # can_batch restores the modes it found
    with pytest.raises(ValueError, match="BatchNorm"):
        batched_local_sgd(bn, _jobs(_data(), _configs("plain")))
    assert "dropout" in can_batch(nn.Sequential(nn.Linear(40, 10), nn.Dropout(0.1)))
    assert can_batch(nn.Sequential(nn.Linear(40, 10), nn.Dropout(0.0))) is None
    assert "no trainable" in can_batch(nn.Linear(40, 10).requires_grad_(False))
    assert "float32" in can_batch(nn.Linear(40, 10).double())
    pool = _model("fedins")
    assert isinstance(pool, SSFPoolModel)
    pool.selection = "batch"
    assert "batch" in can_batch(pool)
    assert all(can_batch(_model(k)) is None for k in ("mlp", "cnn", "transformer"))


# --------------------------------------------------------------------------------- FedIns pools
@pytest.mark.parametrize("option", ["plain", "momentum", "weight_decay", "clip", "mixed"])
def test_batched_train_pool_equals_train_pool_sgd(option):
    _check_pool(_model("fedins"), option, "sgd", lam=0.3)


def test_batched_train_pool_equals_train_pool_adam():
    # Adam's ε = 1e-8 turns gradients that are exactly zero in exact arithmetic (the SSF shift of
    # the attention keys: softmax ignores a constant added to every key) into ±lr steps driven by
    # float noise, on either path; sites without such coordinates compare to 1e-5.
    sites = ["blocks.*.mlp.fc1", "blocks.*.attn.proj", "norm"]
    model = build_model("fedins", (40,), 10, seed=1, params={**POOL, "sites": sites})
    _check_pool(model, "all", "adam", lam=0.2)


def _check_pool(model: SSFPoolModel, option: str, optimizer: str, lam: float) -> None:
    data, cfgs = _data(), _configs(option)
    out = batched_train_pool(model, _jobs(data, cfgs), lam=lam, optimizer=optimizer)
    for i, ((x, y), cfg) in enumerate(zip(data, cfgs, strict=True)):
        ref_model = copy.deepcopy(model)
        stats = train_pool(ref_model, x, y, cfg, torch.Generator().manual_seed(100 + i), lam=lam,
                           optimizer=optimizer)
        _assert_state_close(state_to_numpy(ref_model), out.client(i))
        assert list(out.metrics[i]) == list(stats)
        for name, value in stats.items():
            assert _same_loss(value, out.metrics[i][name]), (i, name, value, out.metrics[i][name])
        assert _same_loss(stats["train_loss"], out.losses[i])
        if len(y) and cfg.steps:
            assert 1 <= out.metrics[i]["slots_used"] <= 5


def test_a_stacked_forward_from_layers_is_used(monkeypatch):
    """``fedagg.batched.layers.stacked_forward`` (hand-batched layers) replaces vmap when it knows
    the model; it gets the trainable names and ``(k, B, ...)`` inputs."""
    import fedagg.batched.core as core

    seen: list[tuple[tuple[str, ...], tuple[int, ...]]] = []
    model = _model("mlp")

    def fake(m, trainable):
        generic = core._generic_forward(m)

        def forward(params, x):
            seen.append((tuple(params), tuple(x.shape)))
            return generic(params, x)

        return forward

    monkeypatch.setattr(core, "stacked_forward", fake)
    data, cfgs = _data(), _configs("plain")
    out = batched_local_sgd(model, _jobs(data, cfgs))
    names = tuple(n for n, _ in model.named_parameters())
    assert seen[0] == (names, (3, 16, 40))  # 3 clients train; widest batch 16
    assert [s[1][0] for s in seen] == [3, 3, 3, 2, 1, 1]  # clients drop out after their last step
    ref = copy.deepcopy(model)
    local_sgd(ref, *data[0], cfgs[0], torch.Generator().manual_seed(100))
    _assert_state_close(state_to_numpy(ref), out.client(0))
