"""Hand-batched forwards of k clients equal k ordinary ``functional_call`` forwards, values and gradients."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from fedagg.batched.layers import stacked_forward
from fedagg.models import MLP, build_model

TOL = {"atol": 1e-5, "rtol": 1e-5}
MODELS = [("mlp", {}), ("mlp", {"hidden": [16, 8, 4]}), ("cnn", {})]


def _model(name: str, params: dict[str, Any]) -> nn.Module:
    return build_model(name, (40,), 10, seed=0, params=params)


def _stacked(model: nn.Module, names: list[str], k: int, seed: int) -> dict[str, torch.Tensor]:
    """Each client's parameters: the model's own plus N(0, 0.1²) noise, stacked to ``(k, *shape)``."""
    g = torch.Generator().manual_seed(seed)
    own = dict(model.named_parameters())
    return {n: (own[n].detach() + 0.1 * torch.randn(k, *own[n].shape, generator=g, dtype=own[n].dtype))
            .requires_grad_() for n in names}


def _check(model: nn.Module, names: list[str], k: int, b: int, seed: int = 0) -> None:
    """Forward and per-client gradients of ``stacked_forward`` equal ``functional_call`` client by client."""
    f = stacked_forward(model, names)
    assert f is not None
    dtype = next(model.parameters()).dtype
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(k, b, 40, generator=g, dtype=dtype)
    weights = torch.randn(k, b, 10, generator=g, dtype=dtype)  # a different loss per client
    params = _stacked(model, names, k, seed)
    own = dict(model.named_parameters())

    y = f(params, x)
    assert y.shape == (k, b, 10) and y.dtype == dtype
    grads = torch.autograd.grad((weights * y).sum(), list(params.values())) if names else ()

    for i in range(k):
        mine = {n: p.detach()[i].clone().requires_grad_() for n, p in params.items()}
        ref = functional_call(model, {**own, **mine}, (x[i],))
        torch.testing.assert_close(y[i], ref, **TOL)
        if names:
            ref_grads = torch.autograd.grad((weights[i] * ref).sum(), list(mine.values()))
            for n, got, want in zip(params, grads, ref_grads, strict=True):
                torch.testing.assert_close(got[i], want, **TOL, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize(("name", "params"), MODELS)
@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("b", [1, 5])
def test_all_trainable_matches_functional_call(name: str, params: dict[str, Any], k: int, b: int) -> None:
    model = _model(name, params)
    _check(model, [n for n, _ in model.named_parameters()], k, b)


@pytest.mark.parametrize(("name", "params"), MODELS)
@pytest.mark.parametrize(
    "subset",
    [["head.weight", "head.bias"], ["body.0.bias", "head.weight"], ["body.2.weight"], []],
    ids=["head", "bias0+head.weight", "weight2", "none"],
)
def test_trainable_subsets_match_functional_call(name: str, params: dict[str, Any], subset: list[str]) -> None:
    _check(_model(name, params), subset, k=3, b=4)


def test_float64_and_frozen_params_requiring_grad() -> None:
    model = _model("cnn", {"channels": 6}).double()
    _check(model, ["body.0.weight", "body.4.bias", "head.weight"], k=3, b=2)


def test_grouped_and_dilated_convolutions() -> None:
    model = _model("cnn", {"channels": 4})
    model.body[2] = nn.Conv1d(4, 4, 3, stride=2, padding=1, groups=2)  # grouped-convolution path
    model.body[4] = nn.Conv1d(4, 4, 3, stride=2, padding=2, dilation=2)  # same output length, im2col path
    _check(model, [n for n, _ in model.named_parameters()], k=3, b=2)
    _check(model, ["body.2.weight", "head.bias"], k=2, b=3)


class _Calls(TorchFunctionMode):
    """Records ``(function name, first argument's shape, groups)`` of linear/conv/bmm calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple[int, ...], int]] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in {"linear", "conv1d", "bmm", "baddbmm"}:
            first = args[1] if name == "baddbmm" else args[0]
            groups = kwargs.get("groups", args[6] if name == "conv1d" and len(args) > 6 else 1)
            self.calls.append((name, tuple(first.shape), groups))
        return func(*args, **kwargs)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_frozen_body_runs_once_on_all_clients(name: str) -> None:
    model = _model(name, {})
    k, b = 5, 3
    f = stacked_forward(model, ["head.weight", "head.bias"])
    assert f is not None
    params = _stacked(model, ["head.weight", "head.bias"], k, 0)
    with _Calls() as mode:
        f(params, torch.randn(k, b, 40, generator=torch.Generator().manual_seed(0)))
    body = [c for c in mode.calls if c[0] in {"linear", "conv1d"}]
    assert len(body) == (2 if name == "mlp" else 3)
    assert all(shape[0] == k * b and groups == 1 for _, shape, groups in body)
    assert [c[0] for c in mode.calls[len(body):]] == ["baddbmm"]


def test_trainable_layers_are_batched() -> None:
    model = _model("cnn", {})
    k, b = 4, 3
    names = [n for n, _ in model.named_parameters()]
    f = stacked_forward(model, names)
    assert f is not None
    with _Calls() as mode:
        f(_stacked(model, names, k, 0), torch.randn(k, b, 40, generator=torch.Generator().manual_seed(0)))
    assert [c[0] for c in mode.calls] == ["baddbmm"] * 4  # three im2col convolutions and the head
    assert all(shape[0] == k for _, shape, _ in mode.calls)


class _SubMLP(MLP):
    pass


def _with_batchnorm() -> nn.Module:
    model = _model("mlp", {})
    model.body[1] = nn.BatchNorm1d(128)
    return model


def _with_hook() -> nn.Module:
    model = _model("mlp", {})
    model.body[0].register_forward_hook(lambda m, i, o: o * 2)
    return model


def _tied() -> nn.Module:
    model = _model("mlp", {"hidden": [10]})
    model.head.weight = nn.Parameter(torch.zeros(10, 10))
    model.body[0].weight = model.head.weight  # input dim 10: one tensor, two layers
    model.body[0].in_features = 10
    return model


def _circular_cnn() -> nn.Module:
    model = _model("cnn", {})
    model.body[0] = nn.Conv1d(1, 32, 5, stride=2, padding=1, padding_mode="circular")
    return model


UNSUPPORTED = {
    "transformer": lambda: _model("transformer", {}),
    "sequential with batchnorm": lambda: nn.Sequential(nn.Linear(40, 8), nn.BatchNorm1d(8), nn.Linear(8, 10)),
    "mlp with batchnorm": _with_batchnorm,
    "mlp subclass": lambda: _SubMLP(40, 10),
    "mlp with forward hook": _with_hook,
    "cnn with circular padding": _circular_cnn,
    "mlp with tied weights": _tied,
}


@pytest.mark.parametrize("what", list(UNSUPPORTED))
def test_no_fast_path_returns_none(what: str) -> None:
    model = UNSUPPORTED[what]()
    assert stacked_forward(model, [n for n, _ in model.named_parameters()]) is None
    assert stacked_forward(model, []) is None


def test_global_forward_hook_means_no_fast_path() -> None:
    model = _model("mlp", {})
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: o)
    try:
        assert stacked_forward(model, ["head.weight"]) is None
    finally:
        handle.remove()
    assert stacked_forward(model, ["head.weight"]) is not None


def test_bad_names_and_shapes_raise() -> None:
    model = _model("mlp", {})
    with pytest.raises(ValueError, match="trainable: \\['nope'\\]"):
        stacked_forward(model, ["head.weight", "nope"])
    f = stacked_forward(model, ["head.weight"])
    assert f is not None
    x = torch.zeros(3, 2, 40)
    with pytest.raises(ValueError, match="params: keys"):
        f({"head.weight": torch.zeros(3, 10, 64), "head.bias": torch.zeros(3, 10)}, x)
    with pytest.raises(ValueError, match="leading dim"):
        f({"head.weight": torch.zeros(2, 10, 64)}, x)


@pytest.fixture
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_same_stack_is_bitwise_reproducible(name: str, one_thread: None) -> None:
    """Same k, same inputs → the same bits (engine determinism). Not asserted: the same bits for
    client i in stacks of different k — that fails for some shapes (batched BLAS kernels, tiny B)."""
    model = _model(name, {})
    names = [n for n, _ in model.named_parameters()]
    f = stacked_forward(model, names)
    assert f is not None
    x = torch.randn(7, 16, 40, generator=torch.Generator().manual_seed(0))
    runs = []
    for _ in range(2):
        params = _stacked(model, names, 7, 0)
        y = f(params, x)
        runs.append([y, *torch.autograd.grad(F.cross_entropy(y.reshape(-1, 10), torch.zeros(7 * 16, dtype=torch.long)),
                                             list(params.values()))])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_large_linear_weights_get_contiguous_gradients() -> None:
    """The hidden layers of the default MLP (128·40 and 64·128 entries per client) take the
    contiguous weight gradient (the SGD update then reads it linearly); the 64·10 head keeps
    autograd's transposed view. Values equal autograd's own backward of ``baddbmm``."""
    model = _model("mlp", {})
    names = [n for n, _ in model.named_parameters()]
    params = _stacked(model, names, k=5, seed=3)
    x = torch.randn(5, 16, 40, generator=torch.Generator().manual_seed(4))
    f = stacked_forward(model, names)
    assert f is not None
    out = f(params, x)
    grads = dict(zip(names, torch.autograd.grad(out.square().sum(), list(params.values())), strict=True))
    assert grads["body.0.weight"].is_contiguous() and grads["body.2.weight"].is_contiguous()
    assert not grads["head.weight"].is_contiguous()
    # the same forward with autograd's baddbmm everywhere
    h = x.reshape(80, 40)
    for i, layer in enumerate(["body.0", "body.2", "head"]):
        w, b = params[f"{layer}.weight"], params[f"{layer}.bias"]
        h = torch.baddbmm(b.unsqueeze(1), h.reshape(5, 16, -1), w.transpose(1, 2)).reshape(80, -1)
        h = F.relu(h) if i < 2 else h
    ref = dict(zip(names, torch.autograd.grad(h.reshape(5, 16, -1).square().sum(), list(params.values())),
                   strict=True))
    assert torch.equal(out, h.reshape(5, 16, -1))
    for n in names:
        torch.testing.assert_close(grads[n], ref[n], **TOL)
