"""Diagonal Fisher estimators against the softmax-regression oracle of fedins_merging.md §8.2."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedagg.errors import ConfigError
from fedagg.merging import diagonal_fisher

# §8.2: logits = x @ W + b, x ∈ R³, C = 4, N = 6
X = [[0.1257302, -0.1321049, 0.6404226], [0.1049001, -0.5356694, 0.3615951],
     [1.304, 0.947081, -0.7037352], [-1.2654215, -0.6232744, 0.041326],
     [-2.3250308, -0.2187917, -1.245911], [-0.7322674, -0.544259, -0.3163002]]
Y = [0, 1, 1, 1, 1, 0]
W = [[0.6832317, -0.3325973, 0.175755, 0.4517351], [0.0470061, -0.3717496, -0.4608627, -0.2288629],
     [0.1100976, -0.5048091, -0.1045878, -0.0796125]]
B = [0.0540846, 0.0214659, 0.0355373, -0.0653829]
REF_F_W = [[0.1343394, 0.284136, 0.2226763, 0.1564191],
           [0.0588935, 0.0541816, 0.0544692, 0.0539179],
           [0.0489452, 0.0744119, 0.0647183, 0.0504228]]
REF_F_B = [0.1487186, 0.1843524, 0.176029, 0.1483262]
EMP_F_W = [[0.1302979, 0.3626745, 0.0534129, 0.0320428],
           [0.0728224, 0.1717848, 0.0167488, 0.0160943],
           [0.0638912, 0.0974869, 0.0155531, 0.0124941]]
EMP_F_B = [0.2517437, 0.3210042, 0.0578489, 0.0401948]


def softmax_regression(dtype=torch.float64) -> nn.Linear:
    lin = nn.Linear(3, 4).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(W, dtype=dtype).T)  # torch stores (out, in)
        lin.bias.copy_(torch.tensor(B, dtype=dtype))
    return lin


def closed_form(x: np.ndarray, y: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """True Fisher ``mean x² p(1−p)``; empirical with labels: ``mean x² (1[k=y] − p)²``."""
    z = x @ np.array(W) + np.array(B)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    g2 = p * (1 - p) if y is None else (np.eye(4)[y] - p) ** 2  # (N, C)
    return (x[:, :, None] ** 2 * g2[:, None, :]).mean(0), g2.mean(0)


XT = torch.tensor(X, dtype=torch.float64)
YT = torch.tensor(Y)


def test_true_fisher_matches_reference_and_closed_form():
    F = diagonal_fisher(softmax_regression(), XT, batch_size=2)  # reference: batch 2
    assert sorted(F) == ["bias", "weight"] and F["weight"].dtype == torch.float64
    np.testing.assert_allclose(F["weight"].T.numpy(), REF_F_W, atol=1e-6)
    np.testing.assert_allclose(F["bias"].numpy(), REF_F_B, atol=1e-6)
    fw, fb = closed_form(np.array(X))
    np.testing.assert_allclose(F["weight"].T.numpy(), fw, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(F["bias"].numpy(), fb, rtol=1e-12, atol=1e-15)


def test_true_fisher_ignores_labels_and_batching():
    lin = softmax_regression()
    base = diagonal_fisher(lin, XT, batch_size=2)
    loader = [(XT[:4], YT[:4]), (XT[4:], YT[4:])]
    for F in (diagonal_fisher(lin, XT, batch_size=6), diagonal_fisher(lin, XT, batch_size=4),
              diagonal_fisher(lin, loader), diagonal_fisher(lin, XT, labels=YT)):
        for k in base:
            torch.testing.assert_close(F[k], base[k], rtol=1e-13, atol=1e-15)


def test_empirical_fisher_uses_labels():
    lin = softmax_regression()
    F = diagonal_fisher(lin, XT, estimator="empirical", labels=YT, batch_size=4)
    np.testing.assert_allclose(F["weight"].T.numpy(), EMP_F_W, atol=1e-6)
    np.testing.assert_allclose(F["bias"].numpy(), EMP_F_B, atol=1e-6)
    fw, fb = closed_form(np.array(X), np.array(Y))
    np.testing.assert_allclose(F["weight"].T.numpy(), fw, rtol=1e-12)
    np.testing.assert_allclose(F["bias"].numpy(), fb, rtol=1e-12)
    G = diagonal_fisher(lin, [(XT[:3], YT[:3]), (XT[3:], YT[3:])], estimator="empirical")
    torch.testing.assert_close(G["bias"], F["bias"], rtol=1e-13, atol=0)


def test_max_examples_and_sum_reduction():
    lin = softmax_regression()
    F = diagonal_fisher(lin, XT, max_examples=4, batch_size=3)  # cut inside the second batch
    fw, fb = closed_form(np.array(X)[:4])
    np.testing.assert_allclose(F["weight"].T.numpy(), fw, rtol=1e-12)
    np.testing.assert_allclose(F["bias"].numpy(), fb, rtol=1e-12)
    S = diagonal_fisher(lin, XT, reduction="sum")
    np.testing.assert_allclose(S["bias"].numpy(), 6 * closed_form(np.array(X))[1], rtol=1e-12)
    loader = [(XT[:3], YT[:3]), (XT[3:], YT[3:])]
    L = diagonal_fisher(lin, loader, max_examples=4)
    np.testing.assert_allclose(L["bias"].numpy(), fb, rtol=1e-12)


def test_sampled_fisher_is_deterministic_and_unbiased():
    lin = softmax_regression()
    reps = XT.repeat(1000, 1)  # 6000 examples: each x with 1000 sampled labels

    def run(seed):
        return diagonal_fisher(lin, reps, estimator="sampled", batch_size=2000,
                               generator=torch.Generator().manual_seed(seed))

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["bias"], c["bias"])
    fw, fb = closed_form(np.array(X))
    np.testing.assert_allclose(a["weight"].T.numpy(), fw, rtol=0.1)
    np.testing.assert_allclose(a["bias"].numpy(), fb, rtol=0.1)


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.l1 = nn.Linear(5, 6)
        self.drop = nn.Dropout(0.5)
        self.l2 = nn.Linear(6, 3)
        self.register_buffer("shift", torch.full((5,), 0.1))
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g))
        self.l1.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(self.drop(torch.tanh(self.l1(x - self.shift))))


def loop_oracle(model: nn.Module, xs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Reference pseudocode (§4.3): one backward per class per example, eval mode."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    F = {n: torch.zeros_like(p) for n, p in params.items()}
    model.eval()
    for x in xs:
        logp = torch.log_softmax(model(x[None])[0], -1)
        p = logp.exp().detach()
        for y in range(logp.shape[0]):
            grads = torch.autograd.grad(logp[y], list(params.values()), retain_graph=True)
            for (n, _), g in zip(params.items(), grads, strict=True):
                F[n] += p[y] * g**2
    return {n: f / len(xs) for n, f in F.items()}


def test_nonlinear_model_matches_per_class_loop_and_is_untouched():
    model = SmallNet().double()
    xs = torch.randn(7, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    F = diagonal_fisher(model, xs, batch_size=3)
    assert model.training and model.drop.training  # modes restored
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert sorted(F) == ["l1.weight", "l2.bias", "l2.weight"]  # frozen l1.bias excluded
    want = loop_oracle(model, xs)
    for k in want:
        torch.testing.assert_close(F[k], want[k], rtol=1e-10, atol=1e-14)


def test_float32_model_gives_float32_fisher():
    F = diagonal_fisher(softmax_regression(torch.float32), XT.float())
    assert F["weight"].dtype == torch.float32
    np.testing.assert_allclose(F["bias"].numpy(), REF_F_B, atol=1e-6)


def test_bad_arguments():
    lin = softmax_regression()
    with pytest.raises(ConfigError, match="estimator"):
        diagonal_fisher(lin, XT, estimator="exact")
    with pytest.raises(ValueError, match="Generator"):
        diagonal_fisher(lin, XT, estimator="sampled")
    with pytest.raises(ValueError, match="labels"):
        diagonal_fisher(lin, XT, estimator="empirical")
    with pytest.raises(ConfigError, match="max_examples"):
        diagonal_fisher(lin, XT, max_examples=0)
    with pytest.raises(ValueError, match="no examples"):
        diagonal_fisher(lin, XT[:0])


def test_numpy_data_is_accepted():
    F = diagonal_fisher(softmax_regression(), np.array(X), estimator="empirical", labels=np.array(Y))
    np.testing.assert_allclose(F["bias"].numpy(), EMP_F_B, atol=1e-6)


def test_iterable_batches_are_split_into_chunks():
    lin = softmax_regression()
    whole = diagonal_fisher(lin, [(XT, YT)], estimator="empirical", batch_size=6)
    chunked = diagonal_fisher(lin, [(XT, YT)], estimator="empirical", batch_size=4)
    torch.testing.assert_close(chunked["weight"], whole["weight"], rtol=1e-13, atol=0)
    F = diagonal_fisher(lin, [XT[:5], XT[5:]], max_examples=5, batch_size=2)
    fw, _ = closed_form(np.array(X)[:5])
    np.testing.assert_allclose(F["weight"].T.numpy(), fw, rtol=1e-12)
