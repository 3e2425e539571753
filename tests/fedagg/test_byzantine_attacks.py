"""Attacks (fedagg.attacks): definitions, the ALIE z_max table, Min-Max/Min-Sum feasibility."""

from __future__ import annotations

import doctest
import importlib

import numpy as np
import pytest
import torch

from fedagg.attacks import REGISTRY, alie_z, build, flip_labels, gamma_search, names
from fedagg.errors import ConfigError


def honest(seed: int = 0, h: int = 8, d: int = 6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(loc=1.0, scale=0.5, size=(h, d))


def test_names_and_knowledge_flags():
    assert names() == sorted(["alie", "gaussian", "inf", "ipm", "labelflip", "mimic", "minmax",
                              "minsum", "nan", "random", "reverse", "signflip"])
    assert REGISTRY.kind == "attack"
    omniscient = {n for n in names() if build(n).omniscient}
    assert omniscient == {"alie", "ipm", "minmax", "minsum", "mimic"}
    assert build("signflip", flavour="mean").omniscient
    assert not build("alie", knowledge="own").omniscient
    assert [n for n in names() if build(n).data_attack] == ["labelflip"]


def test_config_errors():
    with pytest.raises(ConfigError, match="allowed: .*alie"):
        build("lie")
    with pytest.raises(ConfigError, match=r"alie\.zz: unknown parameter"):
        build("alie", zz=1)
    with pytest.raises(ConfigError, match=r"alie\.z"):
        build("alie", z="large")
    with pytest.raises(ConfigError, match=r"alie\.sign"):
        build("alie", sign=2)
    assert build("alie", z="1.5").z == 1.5


# ALIE z_max table, shared/reference/byzantine.md §2: (n, f, z_max)
Z_TABLE = [
    (10, 1, -0.140), (10, 2, 0.000), (10, 3, 0.180), (10, 4, 0.431), (11, 1, 0.000),
    (13, 3, 0.253), (15, 3, 0.210), (20, 4, 0.157), (20, 8, 0.674), (25, 5, 0.2533),
    (25, 11, 1.068), (50, 12, 0.336), (51, 12, 0.361), (60, 6, 0.093), (60, 12, 0.264),
    (60, 18, 0.497),
]


@pytest.mark.parametrize(("n", "f", "z"), Z_TABLE)
def test_alie_z_table(n, f, z):
    assert alie_z(n, f) == pytest.approx(z, abs=5e-4 if z != 0.2533 else 5e-5)


def test_alie_z_undefined_cases():
    with pytest.raises(ValueError, match="undefined"):
        alie_z(10, 6)  # s <= 0: cdf >= 1
    with pytest.raises(ValueError):
        alie_z(5, 5)


def test_alie_conventions():
    H = honest(1)
    mu, s1, s0 = H.mean(0), H.std(0, ddof=1), H.std(0, ddof=0)
    z = alie_z(8 + 2, 2)  # n = len(honest) + f by default
    np.testing.assert_allclose(build("alie")(H, 2, None), np.tile(mu - z * s1, (2, 1)))
    np.testing.assert_allclose(build("alie", z=1.5, sign=1)(H, 3, None)[2], mu + 1.5 * s1)
    np.testing.assert_allclose(build("alie", z=1.5, ddof=0)(H, 1, None)[0], mu - 1.5 * s0)
    z25 = alie_z(25, 2)
    np.testing.assert_allclose(build("alie", n=25)(H, 2, None)[0], mu - z25 * s1)
    own = honest(2, h=3)
    np.testing.assert_allclose(build("alie", knowledge="own", z=0.21)(H, 3, None, own=own)[0],
                               own.mean(0) - 0.21 * own.std(0, ddof=1))
    with pytest.raises(ValueError, match="needs own="):
        build("alie", knowledge="own")(H, 2, None)
    with pytest.raises(ValueError, match="ddof=1 needs more than 1"):  # FA's NaN bug, caught
        build("alie", knowledge="own", z=0.21)(H, 1, None, own=own[:1])


def test_ipm_signflip_reverse_mimic():
    H = honest(3)
    own = honest(4, h=2)
    np.testing.assert_allclose(build("ipm")(H, 2, None), np.tile(-0.1 * H.mean(0), (2, 1)))
    np.testing.assert_allclose(build("ipm", epsilon=2.0, knowledge="own")(H, 2, None, own=own),
                               np.tile(-2.0 * own.mean(0), (2, 1)))
    np.testing.assert_allclose(build("signflip")(H, 2, None, own=own), -own)
    np.testing.assert_allclose(build("signflip", scale=3.0)(H, 2, None, own=own), -3.0 * own)
    np.testing.assert_allclose(build("signflip", flavour="mean")(H, 2, None),
                               np.tile(-H.mean(0), (2, 1)))
    with pytest.raises(ValueError, match="needs own="):
        build("signflip")(H, 2, None)
    np.testing.assert_allclose(build("reverse")(H, 2, None, own=own), -10.0 * own)
    np.testing.assert_allclose(build("mimic", target=5)(H, 2, None), np.tile(H[5], (2, 1)))
    with pytest.raises(ValueError, match="only 8 honest"):
        build("mimic", target=8)(H, 1, None)
    with pytest.raises(ValueError, match=r"own must be \(f, d\)"):
        build("reverse")(H, 3, None, own=own)


def test_labelflip():
    np.testing.assert_array_equal(flip_labels(np.arange(10), 10), np.arange(10)[::-1])
    y = torch.tensor([0, 1, 2], dtype=torch.int64)
    assert torch.equal(flip_labels(y, 3), torch.tensor([2, 1, 0]))
    assert flip_labels(4, 10) == 5
    atk = build("labelflip", num_classes=10)
    np.testing.assert_array_equal(atk.labels(np.array([9, 0], dtype=np.int32)), [0, 9])
    assert atk.labels(np.array([1], dtype=np.int32)).dtype == np.int32
    with pytest.raises(ValueError, match="num_classes is unknown"):
        build("labelflip").labels(np.array([1]))
    own = honest(5, h=2)
    np.testing.assert_allclose(atk(honest(5), 2, None, own=own), own)  # updates pass through


def test_noise_attacks_are_seeded_and_shaped():
    H = honest(6, d=4000)
    g1 = build("gaussian", mu=0.5, sigma=2.0)(H, 3, np.random.default_rng(0))
    g2 = build("gaussian", mu=0.5, sigma=2.0)(H, 3, np.random.default_rng(0))
    np.testing.assert_array_equal(g1, g2)
    assert g1.shape == (3, 4000) and not np.allclose(g1[0], g1[1])  # independent attackers
    assert abs(g1.mean() - 0.5) < 0.1 and abs(g1.std() - 2.0) < 0.1
    u = build("random")(H, 2, np.random.default_rng(1))
    assert u.min() >= 0.0 and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.02
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        build("gaussian")(H, 1, None)
    assert np.isposinf(build("inf")(H, 2, None)).all()
    assert np.isnan(build("nan")(H, 2, None)).all()


@pytest.mark.parametrize("name", ["minmax", "minsum"])
@pytest.mark.parametrize("perturbation", ["unit", "sign", "std"])
def test_minmax_minsum_sit_on_the_feasibility_boundary(name, perturbation):
    H = honest(7, h=10, d=20)
    atk = build(name, perturbation=perturbation)
    byz = atk(H, 2, None)
    assert np.allclose(byz[0], byz[1])
    mu = H.mean(0)
    p = {"unit": mu / np.linalg.norm(mu), "sign": np.sign(mu), "std": H.std(0, ddof=1)}[perturbation]
    np.testing.assert_allclose(byz[0], mu - atk.last_gamma * p)
    pair = ((H[:, None] - H[None]) ** 2).sum(-1)

    def feasible(gamma: float) -> bool:
        dist = (((mu - gamma * p) - H) ** 2).sum(-1)
        if name == "minmax":
            return dist.max() <= pair.max() + 1e-9
        return dist.sum() <= pair.sum(1).min() + 1e-9

    assert atk.last_gamma > 0 and feasible(atk.last_gamma)
    assert not feasible(atk.last_gamma + 1e-3)


def test_gamma_search_follows_the_authors_schedule():
    assert gamma_search(lambda g: g <= 3.0) == pytest.approx(3.0, abs=1e-5)
    assert gamma_search(lambda g: False) == 0.0
    assert gamma_search(lambda g: True) == pytest.approx(20.0, abs=1e-4)  # γ_init (1 + ½ + ¼ …)
    assert gamma_search(lambda g: g <= 42.0, gamma_init=30.0) == pytest.approx(42.0, abs=3e-5)


@pytest.mark.parametrize("name", ["alie", "ipm", "minmax", "minsum", "mimic", "signflip",
                                  "reverse", "gaussian", "random", "inf", "nan", "labelflip"])
def test_kind_dtype_and_no_mutation(name):
    H = honest(8)
    own = honest(9, h=3)
    H_before, own_before = H.copy(), own.copy()
    out = build(name)(H, 3, np.random.default_rng(0), own=own)
    assert isinstance(out, np.ndarray) and out.shape == (3, 6) and out.dtype == np.float64
    np.testing.assert_array_equal(H, H_before)
    np.testing.assert_array_equal(own, own_before)
    out_t = build(name)(torch.from_numpy(H).float(), 3, np.random.default_rng(0),
                        own=torch.from_numpy(own).float())
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.float32
    np.testing.assert_allclose(out_t.numpy(), out, rtol=1e-4, atol=1e-4)
    assert build(name)(H, 0, np.random.default_rng(0), own=own[:0]).shape == (0, 6)


def test_attacks_never_touch_global_rngs():
    np_state, torch_state = np.random.get_state(), torch.random.get_rng_state()
    for name in names():
        build(name)(honest(10), 2, np.random.default_rng(0), own=honest(11, h=2))
    assert np.array_equal(torch.random.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state[1])


@pytest.mark.parametrize("module", ["fedagg.attacks", "fedagg.attacks.basic",
                                    "fedagg.attacks.alie", "fedagg.attacks.minmax"])
def test_docstring_examples(module):
    res = doctest.testmod(importlib.import_module(module), extraglobs={"np": np},
                          optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.attempted > 0 and res.failed == 0
