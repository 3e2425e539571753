"""Partitioners: split sample indices among clients, deterministically from a random stream.

Every partitioner maps ``labels: (n,) int`` to a list of ``num_clients`` index arrays (disjoint,
each sorted in dataset order). They are registered in :data:`PARTITIONERS`:

- ``iid`` — a uniform random permutation cut into near-equal parts.
- ``dirichlet`` — label skew. Draw ``q_n ~ Dir(α·1_C)`` for every client (one call, an N×C matrix),
  then cut the class-``c`` indices (in dataset order) into consecutive blocks in proportion to
  ``q[n, c] / Σ_m q[m, c]`` using rounded cumulative sums. This is the IBM/fedau partition
  (``../shared/reference/fedau_flag.md`` §2.1, §5.1), reproduced draw for draw from a
  ``np.random.RandomState``.
- ``shards`` — pathological label skew (McMahan et al. 2017): sort by label, cut into
  ``num_clients · k`` shards, give each client ``k`` random shards (≈ k classes per client).
- ``domain`` — feature skew; it lives with the datasets that can generate domains
  (:mod:`fedagg.data.domains`) because it needs new samples, not just indices.
"""

from __future__ import annotations

import numpy as np

from fedagg.registry import Param, Registry

PARTITIONERS: Registry = Registry("partition")

RandomStream = np.random.Generator | np.random.RandomState


def _as_legacy(rng: RandomStream) -> np.random.RandomState:
    """The reference partition consumes a legacy stream; derive one from a Generator if needed."""
    if isinstance(rng, np.random.RandomState):
        return rng
    return np.random.RandomState(int(rng.integers(0, 2**32 - 1)))


@PARTITIONERS.register("iid", doc="Uniform random split into near-equal parts.")
def iid_partition(labels: np.ndarray, num_clients: int, rng: RandomStream) -> list[np.ndarray]:
    """``num_clients`` near-equal random parts of ``range(len(labels))``, each sorted."""
    n = len(labels)
    perm = rng.permutation(n)
    return [np.sort(part) for part in np.array_split(perm, num_clients)]


@PARTITIONERS.register(
    "dirichlet",
    params=[
        Param("alpha", float, 0.5, "Dirichlet concentration α (smaller = more label skew)",
              low=0.0, low_open=True),
    ],
    doc="Label skew: per-client class mix q_n ~ Dir(α), class blocks cut by cumulative shares.",
)
def dirichlet_partition(
    labels: np.ndarray, num_clients: int, rng: RandomStream, alpha: float = 0.5
) -> list[np.ndarray]:
    """IBM/fedau Dirichlet split (one ``dirichlet(α·1_C, size=N)`` draw; see module docstring).

    ``labels`` are integers in ``0..C-1`` with ``C = labels.max() + 1``. With a
    ``RandomState(s)`` this reproduces the reference partition exactly.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    labels = np.asarray(labels)
    num_classes = int(labels.max()) + 1
    legacy = _as_legacy(rng)
    q = legacy.dirichlet(alpha * np.ones(num_classes), size=num_clients)  # (N, C)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in range(num_classes):
        idx_c = np.flatnonzero(labels == c)
        share = np.cumsum(q[:, c]) / q[:, c].sum()
        cuts = np.round(len(idx_c) * share).astype(int)  # numpy round: half to even
        start = 0
        for n in range(num_clients):
            parts[n].append(idx_c[start : cuts[n]])
            start = cuts[n]
    return [np.sort(np.concatenate(p)) if p else np.empty(0, dtype=int) for p in parts]


@PARTITIONERS.register(
    "shards",
    params=[Param("shards_per_client", int, 2, "classes (shards) per client", low=1)],
    doc="Pathological label skew: sorted-by-label shards, k per client.",
)
def shard_partition(
    labels: np.ndarray, num_clients: int, rng: RandomStream, shards_per_client: int = 2
) -> list[np.ndarray]:
    """Sort by label (stable), cut into ``num_clients·k`` shards, deal ``k`` random shards each."""
    order = np.argsort(np.asarray(labels), kind="stable")
    shards = np.array_split(order, num_clients * shards_per_client)
    assign = rng.permutation(len(shards))
    out = []
    for n in range(num_clients):
        mine = assign[n * shards_per_client : (n + 1) * shards_per_client]
        out.append(np.sort(np.concatenate([shards[s] for s in mine])))
    return out


def label_histograms(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Per-client label fractions, ``(num_clients, num_classes)``; rows of empty clients are 0."""
    hist = np.zeros((len(parts), num_classes))
    for n, idx in enumerate(parts):
        if len(idx):
            hist[n] = np.bincount(np.asarray(labels)[idx], minlength=num_classes) / len(idx)
    return hist


def split_train_test(
    parts: list[np.ndarray], test_fraction: float, rng: np.random.Generator
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Split every client's indices into a train and a test part (test gets ``⌊f·n⌋``)."""
    train, test = [], []
    for idx in parts:
        perm = rng.permutation(idx)
        k = int(np.floor(test_fraction * len(idx)))
        test.append(np.sort(perm[:k]))
        train.append(np.sort(perm[k:]))
    return train, test
