"""Backbones: the pretrain cache round-trip, the pretrain CLI, and user-supplied backbones."""

from __future__ import annotations

import shutil
import sys

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from fedagg.errors import ConfigError
from fedagg.models import backbone as bb
from fedagg.models import build_model
from simulations import pretrain as pretrain_cli

QUICK = "mnist1d-transformer-quick"


@pytest.fixture(scope="module")
def _cache_root(tmp_path_factory):
    """A fresh cache dir holding only the source-domain data (copied from the user cache when it
    is there, to save generating it): no backbone is cached."""
    from fedagg.data import cache_dir
    from fedagg.data.datasets import _cache_key

    root = tmp_path_factory.mktemp("cache")
    r = bb.backbone_entry(QUICK).recipe
    src = cache_dir() / f"{_cache_key('mnist1d', {'n': r.num_samples, 'seed': r.data_seed})}.npz"
    if src.is_file():
        shutil.copy(src, root / src.name)
    return root


@pytest.fixture
def tmp_cache(_cache_root, monkeypatch):
    """The module's cache dir without any backbone, and an empty in-process memo."""
    shutil.rmtree(_cache_root / "backbones", ignore_errors=True)
    monkeypatch.setenv("FEDAGG_CACHE", str(_cache_root))
    monkeypatch.setattr(bb, "_STATE_MEMO", {})
    return _cache_root


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_pretrain_cache_round_trip(tmp_cache, monkeypatch, capsys):
    entry = bb.backbone_entry(QUICK)
    path = bb.backbone_cache_path(QUICK, entry.recipe)
    assert path.parent == tmp_cache / "backbones" and not path.exists()
    first = bb.load_backbone(QUICK)
    assert path.is_file() and first.source == f"cache {path}"
    meta = bb.read_metadata(path)
    acc = float(meta["source_test_accuracy"])
    assert 0.2 < acc <= 1.0  # well above chance (0.1) on the source domain
    assert '"data_seed": 7' in meta["recipe"]  # not the federated data's seed (42)
    w1 = _params(first.module)
    # a second load reads the cache: pretraining is not called again, the weights are identical
    monkeypatch.setattr(bb, "_STATE_MEMO", {})
    monkeypatch.setattr(bb, "pretrain", lambda recipe: pytest.fail("pretrained again"))
    second = bb.load_backbone(QUICK)
    assert second.module is not first.module
    assert all(torch.equal(w1[k], v) for k, v in _params(second.module).items())
    # the weights are the trained ones, not the init
    init = entry.build((40,), 10, torch.Generator().manual_seed(0))
    assert not torch.equal(init.head.weight, second.module.head.weight)
    # the CLI reports the cached entry instead of retraining
    assert pretrain_cli.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "cached at" in out and f"{100 * acc:.2f} %" in out


def test_corrupt_cache_entry_is_rebuilt_and_deterministic(tmp_cache):
    first = _params(bb.load_backbone(QUICK).module)
    path = bb.backbone_cache_path(QUICK, bb.backbone_entry(QUICK).recipe)
    path.write_bytes(b"not a safetensors file")
    bb._STATE_MEMO.clear()
    again = _params(bb.load_backbone(QUICK).module)
    # pretraining is deterministic (explicit generators, one thread): the same weights again
    assert all(torch.equal(first[k], v) for k, v in again.items())
    with pytest.raises(ConfigError, match="not cached"):
        path.unlink()
        bb._STATE_MEMO.clear()
        bb.load_backbone(QUICK, pretrain_if_missing=False)


def test_cli_out_and_errors(tmp_path, capsys):
    assert pretrain_cli.main(["--quick", "--out", str(tmp_path / "w.bin")]) == 2
    assert "--out" in capsys.readouterr().err
    assert pretrain_cli.main(["--backbone", "nope"]) == 2
    assert "allowed" in capsys.readouterr().err


def test_project_backbone_rejects_other_datasets():
    with pytest.raises(ConfigError, match="pretrained for inputs"):
        build_model("fedins", (64,), 10, seed=0, params={"backbone": QUICK})
    with pytest.raises(ConfigError, match="model_args.backbone"):
        build_model("ssf", (40,), 10, seed=0, params={"backbone": "no-such-backbone"})


class UserNet(nn.Module):
    """A user model without a features() method: feature_fn and head name are given."""

    def __init__(self, d_in: int, k: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, 12), nn.LayerNorm(12), nn.GELU())
        self.fc = nn.Linear(12, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def test_user_backbone_with_weights_file(tmp_path):
    trained = UserNet(40, 10)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.5)
    weights = tmp_path / "user.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(weights))
    bb.register_backbone("test-user-net", lambda shape, k, gen: UserNet(shape[-1], k),
                         feature_fn=lambda m, x: m.body(x), head="fc", weights=weights,
                         overwrite=True)
    loaded = bb.load_backbone("test-user-net", input_shape=(40,), num_classes=10)
    assert torch.equal(loaded.module.fc.weight, trained.fc.weight)
    x = torch.randn(5, 40)
    fed = build_model("fedins", (40,), 10, seed=0,
                      params={"backbone": "test-user-net", "pool_size": 3, "top_k": 2})
    assert fed.sites == ("body.0", "body.1")  # the head "fc" is never an SSF site
    assert fed(x).shape == (5, 10)
    assert torch.equal(fed.head_weight[1], trained.fc.weight)  # head_init: backbone
    head = build_model("head-only", (40,), 10, seed=0, params={"backbone": "test-user-net"})
    assert sorted(head.federated_state_dict()) == ["net.fc.bias", "net.fc.weight"]
    torch.testing.assert_close(head(x), trained(x))
    # model_args.weights overrides the registered file; a file that does not fit is a ConfigError
    bad = tmp_path / "bad.safetensors"
    save_file({"fc.weight": torch.zeros(3, 3)}, str(bad))
    with pytest.raises(ConfigError, match="model_args.weights"):
        build_model("ssf", (40,), 10, seed=0, params={"backbone": "test-user-net", "weights": str(bad)})


def test_user_backbone_by_module_path(tmp_path, monkeypatch):
    (tmp_path / "fi_user_backbones.py").write_text(
        "import torch\n"
        "from torch import nn\n"
        "from fedagg.models.backbone import register_backbone\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.body = nn.Linear(40, 6)\n"
        "    def features(self, x):\n"
        "        return torch.tanh(self.body(x))\n"
        "    def forward(self, x):\n"
        "        return self.features(x)\n"
        "register_backbone('fi-headless', lambda shape, k, gen: Net(), head=None, overwrite=True)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fi_user_backbones", raising=False)
    model = build_model("fedins", (40,), 10, seed=0, params={
        "backbone": "fi_user_backbones:fi-headless", "pool_size": 4, "top_k": 1,
        "head_init": "reference"})
    assert model.head_weight.shape == (4, 10, 6)  # no head: K from the task, D probed
    assert model(torch.randn(3, 40)).shape == (3, 10)
    with pytest.raises(ConfigError, match="classifier head"):
        build_model("head-only", (40,), 10, seed=0,
                    params={"backbone": "fi_user_backbones:fi-headless"})
