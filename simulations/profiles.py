"""Client profiles: which client belongs to which hardware group (deterministic from the seed).

The assignment is a seeded permutation of the client ids, cut in profile order: with profiles
``fast (fraction 0.7)`` and ``slow (count 3)`` out of 10 clients, 7 random clients are fast, 3 slow.
Clients not covered by any profile get the implicit ``default`` profile (all defaults).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedagg.rng import numpy_rng

DEFAULT = {"name": "default", "count": None, "fraction": None, "num_cpus": 1.0, "num_gpus": 0.0,
           "gpu": "required", "resources": {}, "workers": None, "speed": 1.0, "local_steps": None,
           "batch_size": None, "dropout_prob": 0.0, "bandwidth_mbps": 100.0}


def _as_dict(config: Any) -> dict[str, Any]:
    return config if isinstance(config, Mapping) else config.model_dump(mode="json")


def profiles(config: Any) -> list[dict[str, Any]]:
    """The run's profiles as dicts, the implicit default one last."""
    c = _as_dict(config)
    listed = [{**DEFAULT, **p} for p in c.get("profiles") or []]
    return [*listed, dict(DEFAULT)]


def profile_sizes(config: Any) -> list[int]:
    """Clients per profile (same order as :func:`profiles`; the default one takes the rest)."""
    c = _as_dict(config)
    n = int(c["num_clients"])
    sizes = []
    for p in profiles(c)[:-1]:
        sizes.append(int(p["count"]) if p["count"] is not None else int(round(float(p["fraction"]) * n)))
    return [*sizes, max(0, n - sum(sizes))]


def assignment(config: Any) -> np.ndarray:
    """``(num_clients,)`` profile index of every client."""
    c = _as_dict(config)
    n = int(c["num_clients"])
    sizes = profile_sizes(c)
    order = numpy_rng(int(c["seed"]), "profiles").permutation(n)
    out = np.full(n, len(sizes) - 1, dtype=np.int64)
    start = 0
    for idx, size in enumerate(sizes[:-1]):
        out[order[start : start + size]] = idx
        start += size
    return out


class ProfileTable:
    """Profiles and the client → profile assignment of one run, computed once."""

    def __init__(self, config: Any) -> None:
        self.profiles = profiles(config)
        self.assignment = assignment(config)

    def of(self, cid: int) -> dict[str, Any]:
        """The profile dict of client ``cid``."""
        return self.profiles[int(self.assignment[cid])]

    def index(self, cid: int) -> int:
        return int(self.assignment[cid])
