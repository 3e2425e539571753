"""Online datasets from the Hugging Face hub, loaded through ``flwr-datasets`` (``dataset: hf:<name>``).

``flwr_datasets.FederatedDataset`` downloads, caches and (optionally) reshuffles the splits; we take
the whole ``train`` and ``test`` splits as arrays and partition them with our own partitioners, so
that splits are deterministic from the run seed and mean the same thing for every dataset.
Extra ``dataset_args`` are passed to ``datasets.load_dataset`` (e.g. ``data_files`` for a local
CSV/Parquet folder: ``dataset: hf:parquet`` with ``dataset_args: {data_files: {...}}``).
Needs the optional extra ``pip install 'fedagg[hf]'`` and network access for hub datasets.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedagg.data.base import ArrayDataset, CentralDataset
from fedagg.errors import ConfigError

_LABEL_KEYS = ("label", "labels", "fine_label", "target", "y")


def _to_arrays(split: Any, feature_key: str | None, label_key: str | None) -> tuple[np.ndarray, np.ndarray]:
    cols = list(split.column_names)
    lk = label_key or next((k for k in _LABEL_KEYS if k in cols), None)
    if lk is None or lk not in cols:
        raise ConfigError("dataset_args.label_key", f"no label column found; columns: {cols}")
    fk = feature_key or next((k for k in cols if k != lk), None)
    if fk is None or fk not in cols:
        raise ConfigError("dataset_args.feature_key", f"no feature column found; columns: {cols}")
    feats = split.with_format("numpy")[fk]
    x = np.stack([np.asarray(v, dtype=np.float32) for v in feats]) if feats.dtype == object else np.asarray(feats, dtype=np.float32)
    if x.ndim > 2:  # images: flatten and scale 8-bit pixels to [0, 1]
        x = x.reshape(len(x), -1)
    if x.size and x.max() > 1.5:
        x = x / 255.0
    y = np.asarray(split.with_format("numpy")[lk]).astype(np.int64)
    return x.astype(np.float32), y


def load_hf(
    name: str, *, feature_key: str | None = None, label_key: str | None = None,
    test_split: str = "test", seed: int = 42, **load_kwargs: Any,
) -> CentralDataset:
    """``train`` and ``test`` splits of hub dataset ``name`` as a :class:`CentralDataset`."""
    try:
        from flwr_datasets import FederatedDataset
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ConfigError("dataset", "hf:<name> needs `pip install 'fedagg[hf]'`") from exc
    fds = FederatedDataset(dataset=name, partitioners={"train": 1}, seed=seed, **load_kwargs)
    train = fds.load_split("train")
    test = fds.load_split(test_split)
    x, y = _to_arrays(train, feature_key, label_key)
    xt, yt = _to_arrays(test, feature_key, label_key)
    num_classes = int(max(y.max(), yt.max())) + 1
    return CentralDataset(f"hf:{name}", ArrayDataset(x, y), ArrayDataset(xt, yt), num_classes)
