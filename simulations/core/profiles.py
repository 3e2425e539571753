"""Client profiles: which client belongs to which hardware group (deterministic from the seed).

The assignment is a seeded permutation of the client ids, cut in profile order: with profiles
``fast (fraction 0.7)`` and ``slow (count 3)`` out of 10 clients, 7 random clients are fast, 3 slow.
Clients not covered by any profile get the implicit ``default`` profile (all defaults).
"""

from __future__ import annotations

import numpy as np

from fedagg.rng import numpy_rng
from simulations.core.config import ProfileConfig, RunConfig


def profiles(cfg: RunConfig) -> list[ProfileConfig]:
    """The run's profiles, the implicit default one last."""
    return [*cfg.profiles, ProfileConfig()]


def profile_sizes(cfg: RunConfig) -> list[int]:
    """Clients per profile (same order as :func:`profiles`; the default one takes the rest)."""
    n = cfg.num_clients
    sizes = [p.count if p.count is not None else int(round(float(p.fraction or 0.0) * n))
             for p in cfg.profiles]
    return [*sizes, max(0, n - sum(sizes))]


def assignment(cfg: RunConfig) -> np.ndarray:
    """``(num_clients,)`` profile index of every client."""
    n = cfg.num_clients
    sizes = profile_sizes(cfg)
    order = numpy_rng(cfg.seed, "profiles").permutation(n)
    out = np.full(n, len(sizes) - 1, dtype=np.int64)
    start = 0
    for idx, size in enumerate(sizes[:-1]):
        out[order[start : start + size]] = idx
        start += size
    return out


class ProfileTable:
    """Profiles and the client → profile assignment of one run, computed once."""

    def __init__(self, cfg: RunConfig) -> None:
        self.profiles = profiles(cfg)
        self.assignment = assignment(cfg)

    def of(self, cid: int) -> ProfileConfig:
        """The profile of client ``cid``."""
        return self.profiles[int(self.assignment[cid])]

    def index(self, cid: int) -> int:
        return int(self.assignment[cid])
