"""FedIns SSF pools: §8.4 vectors, per-instance vs batch-averaged selection, the model wrapper."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedagg.errors import ConfigError
from fedagg.models import build_model
from fedagg.models.transformer import build_transformer
from fedagg.ssf import (
    HeadInput,
    SSFPoolModel,
    features_method,
    fedins_loss,
    find_ssf_sites,
    fold,
    inject_ssf,
    match_keys,
    pool_head,
    resolve_feature_fn,
    select_slots,
)

KEYS = torch.tensor([[1.0, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, -1]], dtype=torch.float64)
SCALE_POOL = torch.tensor([[1.0, 1], [1.2, 0.8], [0.9, 1.1], [2, 2]], dtype=torch.float64)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- §8.4 reference vectors
def test_key_matching_vector():
    m = match_keys(torch.tensor([[2.0, 1, 0]], dtype=torch.float64), KEYS, top_k=2)
    torch.testing.assert_close(
        m.sim, torch.tensor([[0.894427, 0.447214, 0.948683, 0.0]], dtype=torch.float64),
        rtol=0, atol=1e-6)
    assert m.idx.tolist() == [[2, 0]]
    assert m.reduced_sim.item() == pytest.approx(1.843110, abs=1e-6)
    # surrogate term with λ = 0.1: 0.1·(1 − 1.843110) = −0.084311
    logits = torch.tensor([[0.3, -1.2, 2.0]], dtype=torch.float64)
    target = torch.tensor([2])
    ce = F.cross_entropy(logits, target).item()
    loss = fedins_loss(logits, target, m.reduced_sim, lam=0.1).item()
    assert loss - 0.9 * ce == pytest.approx(-0.084311, abs=1e-6)


def test_adaptive_gamma_vector():
    m = match_keys(torch.tensor([[2.0, 1, 0]], dtype=torch.float64), KEYS, top_k=2)
    gamma = select_slots(SCALE_POOL, m.idx)
    torch.testing.assert_close(gamma, torch.tensor([[0.95, 1.05]], dtype=torch.float64))


def test_per_instance_vs_batch_averaged_selection_vector():
    q = torch.tensor([[2.0, 1, 0], [0.1, 0, -3]], dtype=torch.float64)
    m = match_keys(q, KEYS, top_k=2)
    assert m.idx.tolist() == [[2, 0], [3, 0]]
    assert m.reduced_sim.item() == pytest.approx(1.437935, abs=1e-6)  # (1/B)·Σ_b Σ_j cos
    per_instance = select_slots(SCALE_POOL, m.idx, "instance")
    batch = select_slots(SCALE_POOL, m.idx, "batch")
    torch.testing.assert_close(per_instance, torch.tensor([[0.95, 1.05], [1.5, 1.5]],
                                                          dtype=torch.float64))
    torch.testing.assert_close(batch, torch.tensor([[1.225, 1.275], [1.225, 1.275]],
                                                   dtype=torch.float64))
    with pytest.raises(ConfigError):
        select_slots(SCALE_POOL, m.idx, "sum")  # type: ignore[arg-type]


def test_keys_are_matched_by_cosine_not_by_dot_product():
    keys = torch.tensor([[10.0, 10.0], [1.0, 0.0]])
    m = match_keys(torch.tensor([[1.0, 0.05]]), keys, top_k=1)
    assert m.idx.tolist() == [[1]]  # the dot product would pick key 0


def test_pool_head_is_the_mean_of_the_selected_heads():
    g = _gen(0)
    w, b = torch.randn(5, 3, 4, generator=g), torch.randn(5, 3, generator=g)
    f = torch.randn(2, 4, generator=g)
    idx = torch.tensor([[4, 1, 0], [2, 3, 1]])
    expected = torch.stack([
        torch.stack([f[i] @ w[j].T + b[j] for j in idx[i].tolist()]).mean(0) for i in range(2)])
    torch.testing.assert_close(pool_head(f, w, b, idx), expected)
    all_slots = idx.flatten().tolist()
    w_bar, b_bar = w[all_slots].mean(0), b[all_slots].mean(0)
    torch.testing.assert_close(pool_head(f, w, b, idx, "batch"), f @ w_bar.T + b_bar)


# ------------------------------------------------------------------------------- the model
def _backbone() -> nn.Module:
    return build_transformer(dim=32, depth=1, heads=2, generator=_gen(0))


def _pool_model(seed: int = 1, **kwargs) -> SSFPoolModel:
    params = {"pool_size": 6, "top_k": 2} | kwargs
    return SSFPoolModel(_backbone(), generator=_gen(seed), **params)


def _spread_pool(model: SSFPoolModel, seed: int) -> None:
    """Pools far from identity and keys of unit scale, so slot choice changes the output a lot."""
    g = _gen(seed)
    state = {}
    for name, t in model.pool_state_dict().items():
        noise = torch.randn(t.shape, generator=g)
        state[name] = 1.0 + 0.3 * noise if name.endswith("scale") else (
            noise if name == "keys" else 0.3 * noise)
    model.load_pool_state_dict(state)


def test_sites_pool_shapes_and_frozen_backbone():
    model = _pool_model()
    assert model.sites == ("patch_embed", "blocks.0.norm1", "blocks.0.attn.qkv", "blocks.0.attn.proj",
                           "blocks.0.norm2", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "norm")
    state = model.pool_state_dict()
    assert state["keys"].shape == (6, 32)
    assert state["head_weight"].shape == (6, 10, 32) and state["head_bias"].shape == (6, 10)
    assert state["net.blocks.0.attn.qkv.scale"].shape == (6, 96)
    assert state["net.patch_embed.shift"].shape == (6, 32)
    assert set(state) == {"keys", "head_weight", "head_bias"} | {
        f"net.{s}.{p}" for s in model.sites for p in ("scale", "shift")}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(state)
    with pytest.raises(ValueError, match="cannot be folded"):
        fold(model.net)
    assert {id(p) for p in model.pool_parameters()} == {
        id(p) for p in model.parameters() if p.requires_grad}
    # reference init: bias 0, head weight std √(2/(K·D)), keys ~ N(0, 0.02²), slots N(1|0, 0.02²)
    assert torch.equal(state["head_bias"], torch.zeros(6, 10))
    assert state["head_weight"].std().item() == pytest.approx((2 / 320) ** 0.5, rel=0.1)
    assert state["keys"].std().item() == pytest.approx(0.02, rel=0.1)
    scales = torch.cat([v.flatten() for k, v in state.items() if k.endswith("scale")])
    assert scales.mean().item() == pytest.approx(1.0, abs=2e-3)
    assert scales.std().item() == pytest.approx(0.02, rel=0.1)


def test_construction_is_deterministic_and_does_not_touch_the_backbone():
    backbone = _backbone()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    rng = torch.get_rng_state()
    a = SSFPoolModel(backbone, pool_size=6, top_k=2, generator=_gen(5))
    b = SSFPoolModel(backbone, pool_size=6, top_k=2, generator=_gen(5))
    assert torch.equal(torch.get_rng_state(), rng)
    sa, sb = a.pool_state_dict(), b.pool_state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not find_ssf_sites(backbone)
    assert all(p.requires_grad for p in backbone.parameters())
    after = backbone.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_per_instance_forward_equals_one_ssf_model_per_sample():
    """Instance mode == the reference run with B = 1: a fixed SSF (mean of the sample's slots)."""
    model = _pool_model()
    _spread_pool(model, seed=2)
    x = torch.randn(5, 40, generator=_gen(3))
    with torch.no_grad():
        logits, m = model.forward_with_match(x)
        torch.testing.assert_close(m.sim, match_keys(model.net.features(x), model.keys, 2).sim)
        state = model.pool_state_dict()
        for mode in ("instance", "batch"):
            out = model.forward_with_match(x, selection=mode)[0]
            for b in range(5):
                slots = m.idx[b] if mode == "instance" else m.idx.flatten()
                ref = inject_ssf(_backbone(), sites=model.sites, generator=None)
                for site in model.sites:
                    ssf = ref.get_submodule(site).ssf
                    ssf.scale.copy_(state[f"net.{site}.scale"][slots].mean(0))
                    ssf.shift.copy_(state[f"net.{site}.shift"][slots].mean(0))
                f = ref.features(x[b:b + 1])[0]
                heads = [f @ state["head_weight"][j].T + state["head_bias"][j] for j in slots]
                torch.testing.assert_close(out[b], torch.stack(heads).mean(0), rtol=0, atol=1e-5)
        torch.testing.assert_close(logits, model(x), rtol=0, atol=0)


def test_per_instance_prediction_does_not_depend_on_the_batch():
    model = _pool_model()
    _spread_pool(model, seed=4)
    model.eval()
    x = torch.randn(12, 40, generator=_gen(5))
    with torch.no_grad():
        model.keys.copy_(model.query(x[:6]))  # sample i < 6 matches key i best
        m = model.match(x)
        assert m.idx[:6, 0].tolist() == list(range(6))  # samples really pick different slots
        together = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(12)])
        torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
        assert torch.equal(together.argmax(1), alone.argmax(1))
        torch.testing.assert_close(model(x[3:9]), together[3:9], rtol=0, atol=1e-5)
        # the 2023 reference's batch-averaged selection does depend on the batch
        model.selection = "batch"
        together_b = model(x)
        alone_b = torch.cat([model(x[i:i + 1]) for i in range(12)])
    torch.testing.assert_close(alone_b, alone, rtol=0, atol=1e-5)  # B = 1: the modes agree
    assert (together_b - alone_b).abs().max().item() > 0.1


def test_batch_loss_is_the_mean_of_per_instance_reference_losses():
    model = _pool_model()
    _spread_pool(model, seed=10)
    x, y = torch.randn(5, 40, generator=_gen(11)), torch.tensor([0, 3, 3, 9, 1])
    with torch.no_grad():
        per_instance = torch.stack([model.loss(x[i:i + 1], y[i:i + 1], lam=0.3) for i in range(5)])
        torch.testing.assert_close(model.loss(x, y, lam=0.3), per_instance.mean(), rtol=0, atol=1e-6)


def test_train_mode_keeps_the_backbone_in_eval():
    model = _pool_model()
    model.train()
    assert model.training and not any(m.training for m in model.net.modules())


def test_gradients_reach_only_the_pool_and_an_optimizer_step_leaves_the_backbone():
    model = _pool_model()
    x, y = torch.randn(2, 40, generator=_gen(6)), torch.tensor([3, 7])
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    pool_before = model.pool_state_dict()
    loss = model.loss(x, y, lam=0.1)
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)
    idx = model.match(x).idx
    chosen = sorted(set(idx.flatten().tolist()))
    others = [j for j in range(6) if j not in chosen]
    assert others  # B·k = 4 < N = 6
    for name, p in model.named_pool_parameters():
        assert p.grad is not None, name
        if name != "keys":  # SSF and head slots: CE gradient only where selected
            assert p.grad[others].abs().max() == 0, name
            assert p.grad[chosen].abs().max() > 0, name
    assert model.keys.grad[chosen].abs().max() > 0 and model.keys.grad[others].abs().max() == 0
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    after = dict(model.named_parameters())
    assert all(torch.equal(frozen[n], after[n]) for n in frozen)
    assert not torch.equal(pool_before["keys"], model.keys.detach())
    # keys get gradient only from the surrogate term
    model.zero_grad()
    model.loss(x, y, lam=0.0).backward()
    assert model.keys.grad.abs().max() == 0
    assert model.head_weight.grad.abs().max() > 0


def test_pool_state_dict_round_trip():
    src, dst = _pool_model(seed=1), _pool_model(seed=2)
    _spread_pool(src, seed=7)
    x = torch.randn(6, 40, generator=_gen(8))
    with torch.no_grad():
        assert (src(x) - dst(x)).abs().max() > 1e-3
        state = src.pool_state_dict()
        full = src.state_dict()
        assert all(torch.equal(full[k], v) for k, v in state.items())
        src.pool_state_dict()["keys"].add_(1.0)  # a copy: the model is unchanged
        assert torch.equal(state["keys"], src.keys)
        dst.load_pool_state_dict({k: v.numpy() for k, v in state.items()})
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
        bad = dict(state)
        bad["head_bias"] = torch.zeros(6, 11)
        bad["keys"] = torch.zeros(6, 32)
        with pytest.raises(ValueError, match="head_bias"):
            dst.load_pool_state_dict(bad)
        assert torch.equal(dst.keys, src.keys)  # nothing written
        with pytest.raises(KeyError, match="keys"):
            dst.load_pool_state_dict({k: v for k, v in state.items() if k != "keys"})
        with pytest.raises(KeyError, match="extra"):
            dst.load_pool_state_dict(state | {"extra": torch.zeros(1)})


def test_identity_pool_with_copied_heads_reproduces_the_backbone():
    backbone = _backbone()
    model = SSFPoolModel(backbone, pool_size=4, top_k=3, generator=_gen(0), std=0.0,
                         head_init="backbone")
    x = torch.randn(5, 40, generator=_gen(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), backbone(x), rtol=0, atol=1e-6)


class _UserNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(24, 8),
                                  nn.LayerNorm(8))
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x[:, None]))


def test_user_backbone_with_head_input_features():
    net = _UserNet()
    x = torch.randn(4, 8, generator=_gen(0))
    torch.testing.assert_close(HeadInput("fc")(net, x), net.body(x[:, None]))
    model = SSFPoolModel(net, head="fc", pool_size=5, top_k=2, generator=_gen(1))
    assert model.sites == ("body.0", "body.3", "body.4")
    assert model(x).shape == (4, 3)
    own = SSFPoolModel(net, feature_fn=lambda m, z: m.body(z[:, None]), head=None, num_classes=3,
                       feature_dim=8, exclude=["fc"], pool_size=5, top_k=2, generator=_gen(1))
    assert own.sites == model.sites
    # a torchvision-style `features` *submodule* is not mistaken for the feature method
    vgg_like = nn.Module()
    vgg_like.features = nn.Sequential(nn.Linear(8, 8))
    vgg_like.classifier = nn.Linear(8, 3)
    assert resolve_feature_fn(vgg_like, None, "classifier") == HeadInput("classifier")
    assert resolve_feature_fn(net, None, "fc") == HeadInput("fc")
    assert resolve_feature_fn(_backbone(), None, "head") is features_method
    torch.testing.assert_close(own(x), model(x))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"top_k": 7}, "top_k"), ({"top_k": 0}, "top_k"), ({"pool_size": 0}, "pool_size"),
     ({"selection": "sum"}, "selection"), ({"head": "classifier"}, "head"),
     ({"head": "norm"}, "head"), ({"head_init": "zeros"}, "head_init"),
     ({"head": None, "num_classes": 10}, "feature_dim"),
     ({"head": None, "head_init": "backbone", "num_classes": 10, "feature_dim": 32}, "head_init"),
     ({"head_init": "backbone", "num_classes": 5}, "head_init")],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError) as err:
        _pool_model(**kwargs)
    assert err.value.field == field


def test_pool_training_reduces_the_loss():
    g = _gen(9)
    templates = torch.randn(4, 40, generator=g)
    y = torch.randint(0, 4, (64,), generator=g)
    x = templates[y] + 0.3 * torch.randn(64, 40, generator=g)
    # A random MLP's ReLU features separate the templates; FedIns would start from a pretrained one.
    backbone = build_model("mlp", (40,), 4, seed=0, params={"hidden": [64]})
    model = SSFPoolModel(backbone, pool_size=6, top_k=2, generator=_gen(1))
    assert model.sites == ("body.0",)
    opt = torch.optim.Adam(model.pool_parameters(), lr=1e-2, foreach=True)
    with torch.no_grad():
        start = model.loss(x, y).item()
    for _ in range(30):
        loss = model.loss(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert model.loss(x, y).item() < 0.5 * start
        assert (model(x).argmax(1) == y).float().mean().item() > 0.9
