"""Containers for centralised and federated data (numpy arrays, no framework)."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
    """Samples ``x: (n, *input_shape) float32`` and labels ``y: (n,) int64``.

    ``domain: (n,) int`` optionally tags each sample with the domain it was generated in.
    """

    x: np.ndarray
    y: np.ndarray
    domain: np.ndarray | None = None

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"x has {len(self.x)} rows but y has {len(self.y)}")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: np.ndarray) -> ArrayDataset:
        """The rows ``idx`` (a view-free copy)."""
        idx = np.asarray(idx, dtype=np.int64)
        dom = None if self.domain is None else self.domain[idx]
        return ArrayDataset(self.x[idx], self.y[idx], dom)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])


@dataclasses.dataclass(frozen=True)
class CentralDataset:
    """A dataset before partitioning: a pool of training samples and a held-out test set."""

    name: str
    train: ArrayDataset
    test: ArrayDataset
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.train.input_shape


@dataclasses.dataclass(frozen=True)
class FederatedData:
    """Per-client train/test parts (index arrays into ``pool``) and the server's test set.

    ``client_train[k]`` and ``client_test[k]`` are disjoint sorted index arrays into ``pool``.
    """

    name: str
    pool: ArrayDataset
    client_train: list[np.ndarray]
    client_test: list[np.ndarray]
    test: ArrayDataset
    num_classes: int

    @property
    def num_clients(self) -> int:
        return len(self.client_train)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.pool.input_shape

    def client(self, cid: int) -> tuple[ArrayDataset, ArrayDataset]:
        """``(train, test)`` datasets of client ``cid``."""
        return self.pool.subset(self.client_train[cid]), self.pool.subset(self.client_test[cid])

    def client_sizes(self) -> np.ndarray:
        """Number of training samples per client, ``(num_clients,)``."""
        return np.array([len(i) for i in self.client_train])

    def label_histograms(self) -> np.ndarray:
        """Label fractions of every client's train+test data, ``(num_clients, num_classes)``."""
        hist = np.zeros((self.num_clients, self.num_classes))
        for k in range(self.num_clients):
            idx = np.concatenate([self.client_train[k], self.client_test[k]])
            if len(idx):
                counts = np.bincount(self.pool.y[idx], minlength=self.num_classes)
                hist[k] = counts / len(idx)
        return hist
