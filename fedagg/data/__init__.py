"""Offline datasets, partitioners and federated splits."""

from fedagg.data import domains as _domains  # noqa: F401  (registers natural/domain partitioners)
from fedagg.data.base import ArrayDataset, CentralDataset, FederatedData
from fedagg.data.datasets import DATASETS, cache_dir
from fedagg.data.federated import dataset_names, load_central, load_federated
from fedagg.data.partition import PARTITIONERS, label_histograms

__all__ = [
    "DATASETS", "PARTITIONERS", "ArrayDataset", "CentralDataset", "FederatedData", "cache_dir",
    "dataset_names", "label_histograms", "load_central", "load_federated",
]
