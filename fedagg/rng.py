"""Seed derivation: every random draw flows from the run seed through explicit generators.

A draw that belongs to (round 3, client 17) uses ``numpy_rng(seed, "train", 3, 17)``; it does not
depend on execution order, worker count or engine. Global RNGs are never touched.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported lazily: numpy-only users do not pay for it
    import torch


def _key_to_int(key: int | str) -> int:
    if isinstance(key, (int, np.integer)):
        if key < 0:
            raise ValueError(f"seed keys must be non-negative, got {key}")
        return int(key)
    digest = hashlib.sha256(str(key).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed derived from ``seed`` and a path of keys (ints or strings)."""
    ss = np.random.SeedSequence([_key_to_int(seed), *(_key_to_int(k) for k in keys)])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def numpy_rng(seed: int, *keys: int | str) -> np.random.Generator:
    """A fresh ``np.random.Generator`` for the stream named by ``keys`` under ``seed``."""
    return np.random.default_rng(derive_seed(seed, *keys))


def torch_generator(seed: int, *keys: int | str, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` for the stream named by ``keys`` under ``seed``."""
    import torch

    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, *keys))
    return gen
