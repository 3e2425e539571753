"""Datasets and partitioners: determinism, coverage, the reference Dirichlet split, domains, hf."""

from __future__ import annotations

import numpy as np
import pytest

from fedagg.data import DATASETS, PARTITIONERS, load_central, load_federated
from fedagg.data.partition import (
    dirichlet_partition,
    iid_partition,
    label_histograms,
    shard_partition,
)
from fedagg.errors import ConfigError

LABELS = np.repeat(np.arange(10), 100)


def _check_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    allidx = np.concatenate(parts)
    assert len(allidx) == n
    assert len(np.unique(allidx)) == n


def test_iid_partition_is_disjoint_balanced_and_seeded() -> None:
    parts = iid_partition(LABELS, 7, np.random.default_rng(0))
    _check_disjoint_cover(parts, 1000)
    assert {len(p) for p in parts} <= {142, 143}
    again = iid_partition(LABELS, 7, np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_dirichlet_partition_reproduces_the_fedau_reference_sizes() -> None:
    # fedau_flag.md §5.2: 10 classes x 100 samples, N=5, alpha=0.1, np.random.seed(1)
    parts = dirichlet_partition(LABELS, 5, np.random.RandomState(1), alpha=0.1)
    assert [len(p) for p in parts] == [231, 213, 135, 316, 105]
    _check_disjoint_cover(parts, 1000)


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    def entropy(alpha: float) -> float:
        parts = dirichlet_partition(LABELS, 20, np.random.RandomState(3), alpha=alpha)
        h = label_histograms(LABELS, parts, 10)
        h = h[h.sum(1) > 0]
        return float(np.mean(-(h * np.log(np.where(h > 0, h, 1))).sum(1)))

    assert entropy(0.05) < entropy(1.0) < entropy(100.0)
    assert entropy(100.0) > 2.2  # nearly uniform label mix (max ln 10 = 2.30)


def test_shards_give_about_k_classes_per_client() -> None:
    parts = shard_partition(LABELS, 10, np.random.default_rng(0), shards_per_client=2)
    _check_disjoint_cover(parts, 1000)
    for p in parts:
        assert len(np.unique(LABELS[p])) <= 2


def test_load_federated_is_deterministic_and_splits_train_test() -> None:
    a = load_federated("digits", 6, 5, partition="dirichlet", partition_args={"alpha": 0.5})
    b = load_federated("digits", 6, 5, partition="dirichlet", partition_args={"alpha": 0.5})
    for k in range(6):
        assert np.array_equal(a.client_train[k], b.client_train[k])
        assert not set(a.client_train[k]) & set(a.client_test[k])
        assert len(a.client_test[k]) == int(0.2 * (len(a.client_train[k]) + len(a.client_test[k])))
    c = load_federated("digits", 6, 6, partition="dirichlet", partition_args={"alpha": 0.5})
    assert not all(np.array_equal(a.client_train[k], c.client_train[k]) for k in range(6))
    assert a.test.x.shape[1] == 64 and a.num_classes == 10


def test_mnist1d_shapes_and_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FEDAGG_CACHE", str(tmp_path))
    d = load_central("mnist1d", num_samples=500)
    assert d.train.x.shape == (400, 40) and d.test.x.shape == (100, 40)
    assert d.train.x.dtype == np.float32 and set(np.unique(d.train.y)) <= set(range(10))
    assert len(list(tmp_path.glob("mnist1d-*.npz"))) == 1
    again = load_central("mnist1d", num_samples=500)
    assert np.array_equal(d.train.x, again.train.x)


def test_mnist1d_generation_leaves_global_rngs_alone() -> None:
    import random

    np_state = np.random.get_state()[1].copy()
    py_state = random.getstate()
    load_central("mnist1d", num_samples=200, data_seed=7)
    assert np.array_equal(np.random.get_state()[1], np_state)
    assert random.getstate() == py_state


def test_domain_partition_mixes_domains_inside_clients() -> None:
    fd = load_federated("mnist1d", 8, 0, partition="domain",
                        partition_args={"num_domains": 4, "domains_per_client": 2})
    doms = [np.unique(fd.pool.domain[np.concatenate([fd.client_train[k], fd.client_test[k]])])
            for k in range(8)]
    assert all(len(d) == 2 for d in doms)
    assert set(np.concatenate(doms)) == {0, 1, 2, 3}
    # feature skew: domain statistics differ
    means = [fd.pool.x[fd.pool.domain == d].mean() for d in range(4)]
    assert np.ptp(means) > 0.1
    single = load_federated("mnist1d", 8, 0, partition="domain", partition_args={"num_domains": 4})
    assert all(len(np.unique(single.pool.domain[single.client_train[k]])) == 1 for k in range(8))


def test_domain_partition_needs_domains() -> None:
    with pytest.raises(ConfigError, match="partition"):
        from fedagg.data.domains import domain_partition

        domain_partition(LABELS, 4, np.random.default_rng(0), groups=None)


@pytest.mark.parametrize(("style", "maps"), [
    # domain: (sign·gain, offset) — sensor: gain bit 0, offset (0, 1.5, −1.5, 3) from bits 1–2
    ("sensor", [(1.0, 0.0), (2.5, 0.0), (1.0, 1.5), (2.5, 1.5), (1.0, -1.5), (2.5, -1.5),
                (1.0, 3.0), (2.5, 3.0)]),
    # sensor-polarity: gain bit 0, offset 1.5 bit 1, sign flip bit 2
    ("sensor-polarity", [(1.0, 0.0), (2.5, 0.0), (1.0, 1.5), (2.5, 1.5), (-1.0, 0.0),
                         (-2.5, 0.0), (-1.0, 1.5), (-2.5, 1.5)]),
])
def test_sensor_domains_are_exact_affine_maps_of_clean_mnist1d(style, maps) -> None:
    from fedagg.data.datasets import _generate_mnist1d

    c = load_central("mnist1d", num_samples=800, domains=8, domain_style=style)
    for d, (a, b) in enumerate(maps):
        # the domain's own clean draw (generator seed data_seed + 1000·d, canonical settings)
        raw = _generate_mnist1d(100, 42 + 1000 * d, corr_noise_scale=0.25, max_translation=48)
        np.testing.assert_allclose(c.train.x[c.train.domain == d], a * raw["x"] + b, atol=1e-5)
        np.testing.assert_allclose(c.test.x[c.test.domain == d], a * raw["x_test"] + b, atol=1e-5)
    # domain 0 is the drift style's domain 0 (canonical), sample for sample
    drift = load_central("mnist1d", num_samples=800, domains=8)
    np.testing.assert_array_equal(c.train.x[c.train.domain == 0], drift.train.x[drift.train.domain == 0])


def test_sensor_style_has_at_most_eight_domains() -> None:
    with pytest.raises(ConfigError) as exc:
        load_central("mnist1d", num_samples=900, domains=9, domain_style="sensor")
    assert exc.value.field == "dataset_args.domains"
    with pytest.raises(ConfigError) as exc:
        load_central("mnist1d", num_samples=900, domains=2, domain_style="camera")
    assert "domain_style" in exc.value.field


def test_synthetic_natural_partition_has_one_client_per_user() -> None:
    fd = load_federated("synthetic", 30, 0, partition="natural")
    assert fd.num_clients == 30 and fd.input_shape == (60,)
    assert all(len(t) > 0 for t in fd.client_train)
    with pytest.raises(ConfigError, match="num_clients"):
        load_federated("synthetic", 10, 0, partition="natural")


def test_unknown_names_raise_config_errors_listing_choices() -> None:
    with pytest.raises(ConfigError, match="allowed: .*mnist1d"):
        load_central("cifar")
    with pytest.raises(ConfigError, match="partition"):
        load_federated("digits", 3, 0, partition="nope")
    with pytest.raises(ConfigError, match="partition_args.alpha"):
        load_federated("digits", 3, 0, partition="dirichlet", partition_args={"alpha": 0})
    assert "mnist1d" in DATASETS.names() and "dirichlet" in PARTITIONERS.names()


def test_hf_path_loads_a_local_dataset_through_flwr_datasets(tmp_path) -> None:
    pytest.importorskip("flwr_datasets")
    import csv

    rng = np.random.default_rng(0)
    for split, n in (("train", 60), ("test", 20)):
        with open(tmp_path / f"{split}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["f0", "f1", "label"])
            for _ in range(n):
                y = int(rng.integers(0, 3))
                w.writerow([y + 0.1 * rng.normal(), -y + 0.1 * rng.normal(), y])
    files = {"train": str(tmp_path / "train.csv"), "test": str(tmp_path / "test.csv")}
    fd = load_federated("hf:csv", 4, 0, partition="iid", dataset_args={"data_files": files})
    assert fd.name == "hf:csv" and fd.num_classes == 3 and fd.input_shape == (2,)
    # features are the two non-label columns, labels match the generating class
    assert np.corrcoef(fd.pool.x[:, 0], fd.pool.y)[0, 1] > 0.95
    assert len(fd.pool) == 60 and len(fd.test) == 20
    assert sum(len(t) + len(s) for t, s in zip(fd.client_train, fd.client_test, strict=True)) == 60
