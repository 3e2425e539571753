"""Byzantine clients in the runner (issue 5 fills this in).

``build_corruption(cfg)`` returns the environment's ``corrupt(round, replies, broadcast)`` hook, or
None when the run has no attack. ``byzantine_ids(config)`` names the Byzantine clients
(deterministic from the seed); ``data_attack(config, cid, y)`` applies client-side data attacks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedagg.errors import ConfigError


def build_corruption(cfg: Any) -> Any:
    """The ``corrupt`` hook for ``cfg`` (None without an attack)."""
    if cfg.attack is None:
        return None
    raise ConfigError("attack", "Byzantine attacks are not available yet")


def data_attack(config: Mapping[str, Any], cid: int, y: np.ndarray) -> np.ndarray:
    """Labels client ``cid`` trains on (unchanged for honest clients)."""
    return y
