"""Online datasets from the Hugging Face hub, loaded through ``flwr-datasets`` (``dataset: hf:<name>``).

``flwr_datasets.FederatedDataset`` downloads, caches and (optionally) reshuffles the splits; we take
the whole ``train`` and ``test`` splits as arrays and partition them with our own partitioners, so
that splits are deterministic from the run seed and mean the same thing for every dataset.
Extra ``dataset_args`` are passed to ``datasets.load_dataset`` (e.g. ``data_files`` for a local
CSV/Parquet folder: ``dataset: hf:parquet`` with ``dataset_args: {data_files: {...}}``).
Needs the optional extra ``pip install 'fedagg[hf]'`` and network access for hub datasets: offline
(``HF_HUB_OFFLINE=1``, as the Makefile sets) only copies already in the Hugging Face cache load, and
without that flag an unreachable hub is detected by one TCP connect (3 s at most) instead of the
library's retries; both are a one-line ConfigError naming the offline datasets.
"""

from __future__ import annotations

import os
import socket
import urllib.parse
from typing import Any

import numpy as np

from fedagg.data.base import ArrayDataset, CentralDataset
from fedagg.errors import ConfigError

_LABEL_KEYS = ("label", "labels", "fine_label", "target", "y")
#: Seconds to wait for a TCP connection to the hub before calling it unreachable.
CONNECT_TIMEOUT = 3.0


def _offline_names() -> str:
    from fedagg.data.datasets import DATASETS

    return ", ".join(DATASETS.names())


def hub_unreachable(endpoint: str, timeout: float = CONNECT_TIMEOUT) -> str | None:
    """Why a TCP connection to ``endpoint`` (an http(s) URL) fails, or None when it connects.

    Skipped (None) behind a proxy, where a direct connection says nothing.
    """
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urllib.parse.urlsplit(endpoint)
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((url.hostname or "", port), timeout=timeout).close()
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__
    return None


def _column(split: Any, key: str) -> np.ndarray:
    values = split[key]
    try:
        return np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError):  # images (PIL) or ragged lists
        return np.stack([np.asarray(v, dtype=np.float32) for v in values])


def _to_arrays(split: Any, feature_key: str | list[str] | None, label_key: str | None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Features ``(n, d)`` float32 and labels ``(n,)`` int64 of a Hugging Face split.

    Features: ``feature_key`` (one column, e.g. an image, or a list of columns); by default the
    only non-label column, or all non-label columns stacked (tabular data).
    """
    cols = list(split.column_names)
    lk = label_key or next((k for k in _LABEL_KEYS if k in cols), None)
    if lk is None or lk not in cols:
        raise ConfigError("dataset_args.label_key", f"no label column found; columns: {cols}")
    keys = [feature_key] if isinstance(feature_key, str) else list(feature_key or [k for k in cols if k != lk])
    missing = [k for k in keys if k not in cols]
    if not keys or missing:
        raise ConfigError("dataset_args.feature_key", f"no feature column {missing or ''}; columns: {cols}")
    parts = [_column(split, k).reshape(len(split), -1) for k in keys]
    x = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    if len(keys) == 1 and x.size and x.max() > 1.5 and _column(split, keys[0]).ndim > 2:
        x = x / 255.0  # 8-bit images to [0, 1]
    y = np.asarray(split[lk]).astype(np.int64)
    return x.astype(np.float32), y


def load_hf(
    name: str, *, feature_key: str | list[str] | None = None, label_key: str | None = None,
    test_split: str = "test", seed: int = 42, **load_kwargs: Any,
) -> CentralDataset:
    """``train`` and ``test`` splits of hub dataset ``name`` as a :class:`CentralDataset`."""
    try:
        from flwr_datasets import FederatedDataset
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ConfigError("dataset", "hf:<name> needs `pip install 'fedagg[hf]'`") from exc
    import datasets

    try:
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES as local_builders
    except ImportError:  # pragma: no cover - private name of the datasets library
        local_builders = {}
    offline = bool(datasets.config.HF_HUB_OFFLINE)
    if not offline and name not in local_builders:  # csv, parquet, ... read local files: no hub
        endpoint = datasets.config.HF_ENDPOINT
        why = hub_unreachable(endpoint)
        if why is not None:
            raise ConfigError("dataset", f"'hf:{name}' cannot be downloaded: {endpoint} is unreachable "
                              f"({why}); use an offline dataset ({_offline_names()}), or set "
                              "HF_HUB_OFFLINE=1 to load a copy from the Hugging Face cache")
    try:
        fds = FederatedDataset(dataset=name, partitioners={"train": 1}, seed=seed, **load_kwargs)
        train = fds.load_split("train")
        test = fds.load_split(test_split)
    except ConnectionError as exc:
        if offline:
            raise ConfigError("dataset", f"'hf:{name}' cannot be downloaded offline (HF_HUB_OFFLINE=1) "
                              f"and is not in the Hugging Face cache; offline datasets: "
                              f"{_offline_names()}") from None
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError("dataset", f"'hf:{name}' could not be downloaded ({first})") from None
    x, y = _to_arrays(train, feature_key, label_key)
    xt, yt = _to_arrays(test, feature_key, label_key)
    num_classes = int(max(y.max(), yt.max())) + 1
    return CentralDataset(f"hf:{name}", ArrayDataset(x, y), ArrayDataset(xt, yt), num_classes)
