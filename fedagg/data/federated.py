"""From a dataset name and a partition spec to per-client train/test parts and a server test set."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedagg.data.base import CentralDataset, FederatedData
from fedagg.data.datasets import DATASETS
from fedagg.data.domains import NEEDS_GROUPS
from fedagg.data.hf import load_hf
from fedagg.data.partition import PARTITIONERS, split_train_test
from fedagg.errors import ConfigError
from fedagg.rng import numpy_rng


def dataset_names() -> list[str]:
    """Offline dataset names plus the online pattern ``hf:<name>``."""
    return [*DATASETS.names(), "hf:<name>"]


def load_central(name: str, **params: Any) -> CentralDataset:
    """A dataset before partitioning: offline by registry name, or ``hf:<name>`` online."""
    if name.startswith("hf:"):
        if len(name) <= 3:
            raise ConfigError("dataset", "hf: needs a dataset name, e.g. hf:mnist")
        return load_hf(name[3:], **params)
    entry = DATASETS.entry(name, field="dataset")
    return entry.factory(**entry.resolve(params, where="dataset_args"))


def load_federated(
    dataset: str,
    num_clients: int,
    seed: int,
    *,
    partition: str = "iid",
    partition_args: Mapping[str, Any] | None = None,
    dataset_args: Mapping[str, Any] | None = None,
    test_fraction: float = 0.2,
    rng: np.random.RandomState | None = None,
) -> FederatedData:
    """Load ``dataset`` and split it among ``num_clients``.

    The partition consumes ``rng`` (default ``RandomState(seed)``): a run that then draws its
    participation probabilities and availability from the same stream reproduces the IBM/fedau
    order (partition → p_n → samplers). Each client's part is split into train and test
    (``test_fraction`` of it) with a stream keyed by ``(seed, "client-test-split")``.
    """
    if num_clients < 1:
        raise ConfigError("num_clients", f"must be >= 1, got {num_clients}")
    pargs = dict(partition_args or {})
    dargs = dict(dataset_args or {})
    entry = PARTITIONERS.entry(partition, field="partition")
    resolved = entry.resolve(pargs, where="partition_args")
    if partition == "domain" and not dataset.startswith("hf:"):
        dargs.setdefault("domains", resolved["num_domains"])
    central = load_central(dataset, **dargs)
    pool = len(central.train.y)
    if num_clients > pool:  # checked before partitioning, which is O(num_clients)
        raise ConfigError("num_clients", f"{num_clients} clients but dataset {dataset!r} has {pool} "
                          f"training samples; num_clients must be <= {pool} (one sample each at least)")
    stream = rng if rng is not None else np.random.RandomState(seed % 2**32)
    kwargs: dict[str, Any] = {}
    if partition in NEEDS_GROUPS:
        kwargs["groups"] = central.train.domain
        resolved.pop("num_domains", None)
    parts = entry.factory(central.train.y, num_clients, stream, **resolved, **kwargs)
    train, test = split_train_test(parts, test_fraction, numpy_rng(seed, "client-test-split"))
    return FederatedData(central.name, central.train, train, test, central.test, central.num_classes)
