"""The small MNIST-1D transformer: shapes, deterministic init, config errors, and that it learns."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedagg.errors import ConfigError
from fedagg.models.transformer import (
    TRANSFORMER_PARAMS,
    TransformerClassifier,
    build_transformer,
    build_transformer_model,
)
from fedagg.registry import Registry

# The test machine has 2 shared cores; one intra-op thread is much faster for these tiny models.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_shapes_and_feature_is_prelogit():
    model = build_transformer(dim=48, depth=3, heads=6, patch=4, generator=_gen(0))
    x = torch.randn(7, 40, generator=_gen(1))
    assert model(x).shape == (7, 10)
    assert model(x.reshape(7, 1, 40)).shape == (7, 10)
    f = model.features(x)
    assert f.shape == (7, 48)
    torch.testing.assert_close(model.head(f), model(x))
    assert model.num_tokens == 10
    assert model.pos_embed.shape == (1, 11, 48)
    mean_pool = build_transformer(pool="mean", patch=8, generator=_gen(0))
    assert mean_pool.features(x).shape == (7, 64) and mean_pool.num_tokens == 5


def test_parameter_count_and_no_dropout():
    model = build_transformer(generator=_gen(0))
    # conv 4·64+64; cls 64; pos 11·64; per block 2·128 (LN) + 64·192+192 + 64·64+64 + 64·128+128
    # + 128·64+64; final LN 128; head 64·10+10.
    per_block = 256 + 12480 + 4160 + 8320 + 8256
    assert sum(p.numel() for p in model.parameters()) == 320 + 64 + 704 + 2 * per_block + 128 + 650
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    x = torch.randn(4, 40, generator=_gen(1))
    model.train()
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


def test_init_is_deterministic_from_the_generator_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a = build_transformer(generator=_gen(3)).state_dict()
    b = build_transformer(generator=_gen(3)).state_dict()
    c = build_transformer(generator=_gen(4)).state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], c["blocks.0.attn.qkv.weight"])
    # generator=None is seed 0, not the global RNG
    d = build_transformer(generator=None).state_dict()
    e = build_transformer(generator=_gen(0)).state_dict()
    assert all(torch.equal(d[k], e[k]) for k in d)


def test_init_scheme():
    model = build_transformer(dim=64, depth=4, generator=_gen(0))
    for name, p in model.named_parameters():
        if ".norm" in f".{name}" and name.endswith("weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
    w = torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, nn.Linear)])
    assert abs(w.std().item() - 0.02) < 0.001 and abs(w.mean().item()) < 0.001
    assert w.abs().max() <= 2.0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"patch": 3}, "patch"), ({"heads": 5}, "heads"), ({"depth": 0}, "depth"),
     ({"pool": "max"}, "pool"), ({"mlp_ratio": 0.0}, "mlp_ratio")],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError) as err:
        build_transformer(**kwargs)
    assert err.value.field == field


def test_registry_adapter():
    reg: Registry[nn.Module] = Registry("model")
    reg.add("transformer", build_transformer_model, params=TRANSFORMER_PARAMS)
    entry = reg.entry("transformer")
    kwargs = entry.resolve({"dim": "32", "depth": 1, "heads": 2})
    model = entry.factory((1, 40), 10, _gen(0), **kwargs)
    assert isinstance(model, TransformerClassifier)
    assert model(torch.zeros(2, 40)).shape == (2, 10)
    assert model.features(torch.zeros(2, 40)).shape == (2, 32)
    with pytest.raises(ConfigError):
        entry.resolve({"pool": "max"})


def test_learns_a_tiny_synthetic_task():
    # Ten fixed random templates plus noise (SNR 2): chance is 10 %.
    g = _gen(0)
    templates = torch.randn(10, 40, generator=g)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 10, (n,), generator=g)
        return templates[y] + 0.5 * torch.randn(n, 40, generator=g), y

    model = build_transformer(dim=32, depth=2, heads=4, generator=_gen(1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, foreach=True)
    for _ in range(120):
        x, y = batch(64)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = batch(500)
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.95, acc
