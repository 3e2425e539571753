"""Offline datasets, cached on disk.

Registered in :data:`DATASETS` (``build(name, **params) -> CentralDataset``):

- ``mnist1d`` (default) — the MNIST-1D benchmark (Greydanus & Kobak, arXiv 2011.14439), generated
  locally by the ``mnist1d`` package: 40-sample 1-D signals, 10 classes. ``num_samples`` sets the total
  (80 % train pool, 20 % server test set, as the package splits). With ``domains > 1`` it generates
  that many *domains*: each domain is MNIST-1D drawn with its own generator settings (translation,
  correlated/iid noise) and then scaled and shifted; samples carry their domain id (feature skew, used
  by the ``domain`` partitioner).
- ``digits`` — scikit-learn's bundled 8×8 digits (1,797 samples), flattened to 64 features in [0, 1].
- ``synthetic`` — LEAF Synthetic(α, β) (Li et al., FedProx, arXiv 1812.06127): every client has its
  own softmax-regression model and feature distribution; samples carry their client id, so the
  ``natural`` partitioner returns exactly the generated clients.

The online path ``hf:<name>`` (Hugging Face datasets through ``flwr-datasets``) lives in
:mod:`fedagg.data.hf`.

Generation is deterministic from the dataset's own seed (``data_seed``), not the run seed: a dataset
is a fixed benchmark; the run seed only drives partitioning and training. The ``mnist1d`` package
reseeds numpy's global RNG while generating; we save and restore the global state around it so that
nothing outside changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fedagg.data.base import ArrayDataset, CentralDataset
from fedagg.errors import ConfigError
from fedagg.io import atomic_write_bytes
from fedagg.registry import Param, Registry
from fedagg.rng import numpy_rng

DATASETS: Registry[CentralDataset] = Registry("dataset")


def cache_dir() -> Path:
    """The data cache: ``$FEDAGG_CACHE`` or ``~/.cache/fedagg``."""
    return Path(os.environ.get("FEDAGG_CACHE", Path.home() / ".cache" / "fedagg"))


def _cache_key(name: str, params: dict[str, Any]) -> str:
    blob = json.dumps({"name": name, **params}, sort_keys=True, default=str)
    return f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def _cached(name: str, params: dict[str, Any], make: Any) -> dict[str, np.ndarray]:
    """Load ``name`` with ``params`` from the cache, or ``make()`` it and store it atomically."""
    path = cache_dir() / f"{_cache_key(name, params)}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError):
            path.unlink(missing_ok=True)  # corrupt entry: regenerate
    arrays = make()
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())
    return arrays


@contextlib.contextmanager
def _preserve_global_rngs() -> Iterator[None]:
    """Restore numpy's and Python's global RNG state after third-party code reseeds them."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    try:
        yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


# --------------------------------------------------------------------------------------- mnist1d
def _generate_mnist1d(num_samples: int, seed: int, **overrides: Any) -> dict[str, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = int(num_samples)
    args.seed = int(seed)
    for k, v in overrides.items():
        setattr(args, k, v)
    with _preserve_global_rngs():
        d = make_dataset(args)
    return {
        "x": d["x"].astype(np.float32),
        "y": d["y"].astype(np.int64),
        "x_test": d["x_test"].astype(np.float32),
        "y_test": d["y_test"].astype(np.int64),
    }


def domain_settings(num_domains: int, data_seed: int, strength: float = 1.0) -> list[dict[str, float]]:
    """Generator settings of each MNIST-1D domain.

    Domain 0 is canonical MNIST-1D. Domain ``d ≥ 1`` draws (from a stream keyed by ``data_seed``
    and ``d``) a gain ``scale ∈ [2^-s, 2^s]``, an offset ``shift ∈ [-s, s]``, extra iid noise
    ``noise ∈ [0, 0.5 s]``, a correlated-noise scale and a maximum translation, with ``s = strength``.
    """
    out = [{"scale": 1.0, "shift": 0.0, "noise": 0.0, "corr_noise_scale": 0.25, "max_translation": 48}]
    for d in range(1, num_domains):
        rng = numpy_rng(data_seed, "mnist1d-domain", d)
        out.append(
            {
                "scale": float(2.0 ** rng.uniform(-strength, strength)),
                "shift": float(rng.uniform(-strength, strength)),
                "noise": float(rng.uniform(0.0, 0.5 * strength)),
                "corr_noise_scale": float(rng.uniform(0.1, 0.25 + 0.35 * strength)),
                "max_translation": int(rng.integers(24, 61)),
            }
        )
    return out


#: Domain styles of multi-domain MNIST-1D (``dataset_args.domain_style``).
DOMAIN_STYLES = ("drift", "sensor", "sensor-polarity")
#: Most domains of the ``sensor`` styles.
SENSOR_DOMAINS = 8


def sensor_settings(num_domains: int, strength: float = 1.0,
                    polarity: bool = False) -> list[dict[str, float]]:
    """Settings of the ``sensor`` domains: domain ``d`` is canonical MNIST-1D read through a
    sensor with its own gain and offset (and, with ``polarity``, sign),
    ``x ↦ sign·gain·x + offset``. With ``s = strength``, bit 0 of ``d`` sets the gain
    ``1 + 1.5 s``; bits 1–2 pick the offset from ``(0, 1.5 s, −1.5 s, 3 s)``; with ``polarity``
    bit 1 sets the offset ``1.5 s`` and bit 2 flips the sign instead. Domain 0 is canonical.
    No extra noise: each domain is an exact affine map of clean signals, so one SSF after the
    patch embedding can undo it, but one SSF cannot undo two different ones. At most
    :data:`SENSOR_DOMAINS` domains.

    >>> [(d["scale"], d["shift"]) for d in sensor_settings(4)]
    [(1.0, 0.0), (2.5, 0.0), (1.0, 1.5), (2.5, 1.5)]
    >>> [(d["scale"], d["shift"]) for d in sensor_settings(8, polarity=True)][4:6]
    [(-1.0, 0.0), (-2.5, 0.0)]
    """
    if not 1 <= num_domains <= SENSOR_DOMAINS:
        raise ConfigError("dataset_args.domains", f"the sensor styles have 1 to {SENSOR_DOMAINS} "
                          f"domains, got {num_domains}")
    base = {"noise": 0.0, "corr_noise_scale": 0.25, "max_translation": 48}
    offsets = (0.0, 1.5 * strength, -1.5 * strength, 3.0 * strength)
    out = []
    for d in range(num_domains):
        gain = 1.0 + 1.5 * strength if d & 1 else 1.0
        if polarity:
            sign, shift = (-1.0 if d & 4 else 1.0), (1.5 * strength if d & 2 else 0.0)
        else:
            sign, shift = 1.0, offsets[d >> 1]
        out.append({"scale": sign * gain, "shift": shift, **base})
    return out


@DATASETS.register(
    "mnist1d",
    params=[
        Param("num_samples", int, 5000, "total samples (80 % client pool, 20 % server test)", low=100),
        Param("data_seed", int, 42, "generator seed of the benchmark (42 = the canonical MNIST-1D)"),
        Param("domains", int, 1, "number of generated domains (feature skew); 1 = plain MNIST-1D", low=1),
        Param("domain_strength", float, 1.0, "how far domains drift from the canonical one", low=0.0),
        Param("domain_style", str, "drift", "drift: random gain, offset, noise, translation per "
              "domain; sensor: gain × offset, no noise; sensor-polarity: sign × gain × offset "
              "(the sensor styles: at most 8 domains)", choices=DOMAIN_STYLES),
    ],
)
def load_mnist1d(
    num_samples: int = 5000, data_seed: int = 42, domains: int = 1, domain_strength: float = 1.0,
    domain_style: str = "drift",
) -> CentralDataset:
    """MNIST-1D, optionally as ``domains`` feature-shifted domains of ``num_samples // domains``
    each (:func:`domain_settings` for the ``drift`` style, :func:`sensor_settings` for
    ``sensor``)."""
    if domains == 1:
        d = _cached("mnist1d", {"n": num_samples, "seed": data_seed},
                    lambda: _generate_mnist1d(num_samples, data_seed))
        return CentralDataset(
            "mnist1d", ArrayDataset(d["x"], d["y"]), ArrayDataset(d["x_test"], d["y_test"]), 10
        )
    settings = (domain_settings(domains, data_seed, domain_strength) if domain_style == "drift"
                else sensor_settings(domains, domain_strength, domain_style == "sensor-polarity"))
    per = num_samples // domains
    xs, ys, ds, xt, yt, dt = [], [], [], [], [], []
    for k, s in enumerate(settings):
        gen_seed = data_seed + 1000 * k

        def make(s: dict[str, float] = s, gen_seed: int = gen_seed, k: int = k) -> dict[str, np.ndarray]:
            raw = _generate_mnist1d(per, gen_seed, corr_noise_scale=s["corr_noise_scale"],
                                    max_translation=s["max_translation"])
            rng = numpy_rng(data_seed, "mnist1d-domain-noise", k)
            for key in ("x", "x_test"):
                x = raw[key] * s["scale"] + s["shift"]
                raw[key] = (x + s["noise"] * rng.standard_normal(x.shape)).astype(np.float32)
            return raw

        raw = _cached("mnist1d-domain", {"n": per, "seed": gen_seed, **s, "k": k, "ds": data_seed}, make)
        xs.append(raw["x"]), ys.append(raw["y"]), ds.append(np.full(len(raw["y"]), k))
        xt.append(raw["x_test"]), yt.append(raw["y_test"]), dt.append(np.full(len(raw["y_test"]), k))
    return CentralDataset(
        "mnist1d",
        ArrayDataset(np.concatenate(xs), np.concatenate(ys), np.concatenate(ds)),
        ArrayDataset(np.concatenate(xt), np.concatenate(yt), np.concatenate(dt)),
        10,
    )


# ---------------------------------------------------------------------------------------- digits
@DATASETS.register(
    "digits",
    params=[Param("test_fraction", float, 0.2, "server test share", low=0.05, high=0.5)],
)
def load_digits(test_fraction: float = 0.2) -> CentralDataset:
    """scikit-learn's 8×8 digits, 64 features scaled to [0, 1]; a fixed (seed 0) train/test split."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(y))
    k = int(round(test_fraction * len(y)))
    test, train = perm[:k], perm[k:]
    return CentralDataset("digits", ArrayDataset(x[train], y[train]), ArrayDataset(x[test], y[test]), 10)


# ------------------------------------------------------------------------------------- synthetic
@DATASETS.register(
    "synthetic",
    params=[
        Param("alpha", float, 1.0, "model heterogeneity α (u_k ~ N(0, α))", low=0.0),
        Param("beta", float, 1.0, "feature heterogeneity β (B_k ~ N(0, β))", low=0.0),
        Param("num_users", int, 30, "number of generated clients", low=1),
        Param("dim", int, 60, "feature dimension", low=1),
        Param("num_classes", int, 10, "classes", low=2),
        Param("max_samples", int, 500, "cap on samples per client", low=10),
        Param("data_seed", int, 0, "generator seed"),
    ],
)
def load_synthetic(
    alpha: float = 1.0, beta: float = 1.0, num_users: int = 30, dim: int = 60,
    num_classes: int = 10, max_samples: int = 500, data_seed: int = 0,
) -> CentralDataset:
    """LEAF Synthetic(α, β): client k has ``W_k, b_k ~ N(u_k, 1)``, ``u_k ~ N(0, α)``; features
    ``x ~ N(v_k, Σ)`` with ``v_k ~ N(B_k, 1)``, ``B_k ~ N(0, β)``, ``Σ = diag(j^-1.2)``; labels
    ``argmax(W_k x + b_k)``; sizes lognormal(4, 2) + 50, capped. Each client keeps 20 % of its
    samples for the server test set. ``train.domain`` holds the client id (``natural`` partition).
    """
    rng = numpy_rng(data_seed, "leaf-synthetic", int(alpha * 1e6), int(beta * 1e6))
    sizes = np.minimum(rng.lognormal(4, 2, num_users).astype(int) + 50, max_samples)
    cov = np.array([(j + 1) ** -1.2 for j in range(dim)])
    xs, ys, gs, xt, yt, gt = [], [], [], [], [], []
    for k in range(num_users):
        u = rng.normal(0, np.sqrt(alpha)) if alpha > 0 else 0.0
        b_mean = rng.normal(0, np.sqrt(beta)) if beta > 0 else 0.0
        w = rng.normal(u, 1, (num_classes, dim))
        b = rng.normal(u, 1, num_classes)
        v = rng.normal(b_mean, 1, dim)
        x = (rng.normal(size=(sizes[k], dim)) * np.sqrt(cov) + v).astype(np.float32)
        y = np.argmax(x @ w.T + b, axis=1).astype(np.int64)
        n_test = max(1, int(0.2 * sizes[k]))
        xs.append(x[n_test:]), ys.append(y[n_test:]), gs.append(np.full(sizes[k] - n_test, k))
        xt.append(x[:n_test]), yt.append(y[:n_test]), gt.append(np.full(n_test, k))
    return CentralDataset(
        "synthetic",
        ArrayDataset(np.concatenate(xs), np.concatenate(ys), np.concatenate(gs)),
        ArrayDataset(np.concatenate(xt), np.concatenate(yt), np.concatenate(gt)),
        num_classes,
    )
