"""SSF layers: placement, init, and the fold back into a plain model (fedins_merging.md §1, §8.4)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedagg.models.transformer import build_transformer
from fedagg.ssf import (
    SSF,
    SSFSite,
    channel_dim,
    find_sites,
    find_ssf_sites,
    fold,
    fold_site,
    inject_ssf,
    ssf_apply,
    ssf_named_parameters,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randomise_ssf(model: nn.Module, seed: int, std: float = 0.5) -> None:
    """Large random γ, β so that a wrong fold cannot hide behind γ ≈ 1, β ≈ 0."""
    g = _gen(seed)
    with torch.no_grad():
        for name, p in ssf_named_parameters(model):
            mean = 1.0 if name.endswith("scale") else 0.0
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std + mean)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# -------------------------------------------------------------------------------- the operator
def test_ssf_apply_broadcasts_along_the_channel_dim():
    x = torch.arange(12.0).reshape(2, 3, 2)
    scale, shift = torch.tensor([2.0, 3.0]), torch.tensor([10.0, 20.0])
    y = ssf_apply(x, scale, shift)  # last dim
    torch.testing.assert_close(y, x * torch.tensor([2.0, 3.0]) + torch.tensor([10.0, 20.0]))
    scale3, shift3 = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 1.0, 2.0])
    y = ssf_apply(x, scale3, shift3, dim=-2)  # conv layout (B, C, L)
    torch.testing.assert_close(y, x * scale3[:, None] + shift3[:, None])
    # per-sample (B, C): row b applies to x[b]
    per = torch.tensor([[1.0, 1.0], [2.0, -1.0]])
    y = ssf_apply(x, per, torch.zeros(2, 2))
    torch.testing.assert_close(y[0], x[0])
    torch.testing.assert_close(y[1], x[1] * torch.tensor([2.0, -1.0]))


def test_channel_dim_per_module_type():
    assert channel_dim(nn.Linear(3, 5)) == (5, -1)
    assert channel_dim(nn.LayerNorm((4, 6))) == (6, -1)
    assert channel_dim(nn.Conv1d(2, 7, 3)) == (7, -2)
    assert channel_dim(nn.Conv2d(2, 8, 3)) == (8, -3)
    with pytest.raises(TypeError):
        channel_dim(nn.ReLU())


def test_init_is_n1_002_and_n0_002_from_the_generator():
    state = torch.get_rng_state()
    a = SSF(50_000, generator=_gen(0))
    assert torch.equal(torch.get_rng_state(), state)
    assert abs(a.scale.mean().item() - 1.0) < 5e-4 and abs(a.scale.std().item() - 0.02) < 5e-4
    assert abs(a.shift.mean().item()) < 5e-4 and abs(a.shift.std().item() - 0.02) < 5e-4
    b = SSF(50_000, generator=_gen(0))
    assert torch.equal(a.scale, b.scale) and torch.equal(a.shift, b.shift)
    ident = SSF(4, generator=None)
    assert torch.equal(ident.scale, torch.ones(4)) and torch.equal(ident.shift, torch.zeros(4))


# ---------------------------------------------------------------------------------- placement
def test_transformer_sites_match_the_ssf_vit_placement():
    model = build_transformer(dim=32, depth=2, heads=2, generator=_gen(0))
    sites = find_sites(model, exclude=["head"])
    expected = ["patch_embed"]
    for i in range(2):
        expected += [f"blocks.{i}.{s}" for s in
                     ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")]
    assert sites == expected + ["norm"]
    adapted = inject_ssf(model, exclude=["head"], generator=_gen(1))
    assert find_ssf_sites(adapted) == sites
    # per block 2·(32 + 96 + 32 + 32 + 64 + 32); patch embed and final norm 2·32 each (§1 table)
    n_ssf = sum(p.numel() for _, p in ssf_named_parameters(adapted))
    assert n_ssf == 2 * 2 * (32 + 96 + 32 + 32 + 64 + 32) + 2 * 32 + 2 * 32
    # the fc1 SSF acts before the GELU: the site wraps fc1 itself
    assert isinstance(adapted.blocks[0].mlp.fc1, SSFSite)
    assert isinstance(adapted.blocks[0].mlp.act, nn.GELU)


def test_find_sites_patterns_types_and_multihead_attention():
    net = nn.Sequential()
    net.add_module("enc", nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)))
    net.add_module("mha", nn.MultiheadAttention(4, 2))
    net.add_module("head", nn.Linear(4, 2))
    assert find_sites(net) == ["enc.0", "enc.1", "head"]  # not mha.out_proj
    assert find_sites(net, types=(nn.LayerNorm,)) == ["enc.1"]
    assert find_sites(net, include=["enc.*"], exclude=["*.1"]) == ["enc.0"]
    with pytest.raises(TypeError):
        find_sites(net, types=(nn.ReLU,))


def test_inject_copies_and_freezes():
    model = build_transformer(dim=16, depth=1, heads=2, generator=_gen(0))
    before = _state(model)
    adapted = inject_ssf(model, exclude=["head"], generator=_gen(1), freeze=True,
                         trainable=["head.*"])
    assert not find_ssf_sites(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    ssf_names = {n for n, _ in ssf_named_parameters(adapted)}
    assert trainable == ssf_names | {"head.weight", "head.bias"}
    assert all(p.requires_grad for p in model.parameters())


def test_inject_errors():
    net = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    adapted = inject_ssf(net, generator=None)
    with pytest.raises(ValueError, match="already has SSF"):
        inject_ssf(adapted, generator=None)
    with pytest.raises(ValueError, match="no SSF site"):
        inject_ssf(net, include=["nothing"], generator=None)
    with pytest.raises(TypeError):
        inject_ssf(net, sites=["1"], generator=None)


# --------------------------------------------------------------------------------------- fold
def test_fold_linear_formula_float64():
    """§8.4: γ⊙(Wx+b)+β == (γ[:,None]·W)x + (γ⊙b+β), max err ~1e-16 in float64."""
    g = _gen(0)
    lin = nn.Linear(6, 4, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(4, 6, generator=g, dtype=torch.float64))
        lin.bias.copy_(torch.randn(4, generator=g, dtype=torch.float64))
    gamma = torch.randn(4, generator=g, dtype=torch.float64)
    beta = torch.randn(4, generator=g, dtype=torch.float64)
    x = torch.randn(10, 6, generator=g, dtype=torch.float64)
    folded = fold_site(lin, gamma, beta)
    torch.testing.assert_close(folded.weight, gamma[:, None] * lin.weight, rtol=0, atol=0)
    torch.testing.assert_close(folded.bias, gamma * lin.bias + beta, rtol=0, atol=0)
    err = (folded(x) - (gamma * lin(x) + beta)).abs().max().item()
    assert err < 1e-13


class _Mixed(nn.Module):
    """Every supported site type, including bias-free and affine-free variants."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2 = nn.Conv2d(2, 4, 3, padding=1)
        self.conv1 = nn.Conv1d(4, 6, 3, groups=2, bias=False)
        self.ln_plain = nn.LayerNorm(6, elementwise_affine=False)
        self.ln_nobias = nn.LayerNorm(6, bias=False)
        self.lin = nn.Linear(6, 5, bias=False)
        self.ln2d = nn.LayerNorm((3, 5))
        self.out = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, 2, 4, 5)
        h = torch.relu(self.conv2(x)).mean(-1)  # (B, 4, 4)
        h = self.conv1(h).transpose(1, 2)  # (B, 2, 6)
        h = self.ln_nobias(torch.tanh(self.ln_plain(h)))
        h = self.lin(h)  # (B, 2, 5)
        h = self.ln2d(torch.cat([h, h.flip(1)[:, :1]], dim=1))  # (B, 3, 5)
        return self.out(h.mean(1))


def test_fold_equivalence_on_every_site_type():
    model = _Mixed()
    adapted = inject_ssf(model, generator=_gen(0))
    assert len(find_ssf_sites(adapted)) == 7
    _randomise_ssf(adapted, seed=1)
    snapshot = _state(adapted)
    folded = fold(adapted)
    assert not find_ssf_sites(folded)
    assert not any(isinstance(m, (SSF, SSFSite)) for m in folded.modules())
    # original architecture and names (bias / affine added where there was none)
    added = {"conv1.bias", "ln_plain.weight", "ln_plain.bias", "ln_nobias.bias", "lin.bias"}
    assert set(folded.state_dict()) == set(model.state_dict()) | added
    x = torch.randn(16, 2, 4, 5, generator=_gen(2))
    with torch.no_grad():
        torch.testing.assert_close(folded(x), adapted(x), rtol=0, atol=1e-5)
        assert (folded(x) - model(x)).abs().max() > 0.1  # the SSF really changed the function
    after = adapted.state_dict()  # input not mutated
    assert all(torch.equal(snapshot[k], after[k]) for k in snapshot)
    assert len(find_ssf_sites(adapted)) == 7


def test_fold_equivalence_on_the_transformer():
    model = build_transformer(dim=32, depth=2, heads=4, generator=_gen(0))
    adapted = inject_ssf(model, exclude=["head"], generator=_gen(1), freeze=True,
                         trainable=["head.*"])
    _randomise_ssf(adapted, seed=3, std=0.3)
    folded = fold(adapted)
    assert list(folded.state_dict()) == list(model.state_dict())
    x = torch.randn(32, 40, generator=_gen(4))
    with torch.no_grad():
        torch.testing.assert_close(folded(x), adapted(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(folded.features(x), adapted.features(x), rtol=0, atol=1e-5)
    # frozen stays frozen, the head stays trainable
    grads = {n: p.requires_grad for n, p in folded.named_parameters()}
    assert grads["head.weight"] and not grads["blocks.0.attn.qkv.weight"]


def test_fold_of_identity_ssf_is_the_original_model():
    model = build_transformer(dim=16, depth=1, heads=2, generator=_gen(0))
    folded = fold(inject_ssf(model, generator=None))
    ref = model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in folded.state_dict().items())
