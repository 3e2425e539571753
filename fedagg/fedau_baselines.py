"""Server-update rules that FedAU is compared with (Wang & Ji, arXiv 2306.03401, §5).

All take the participants' deltas ``Δ_n = local − global`` of one round, ``(n, d)``, and return the
step ``(d,)`` to add to the global model; the server learning rate ``η`` is included. If nobody
participates the step is 0 (and the memories are unchanged). Exactly as in IBM/fedau ``main.py``
(``../shared/reference/fedau_flag.md`` §1.3):

- ``average_participating``: ``η · (1/|S_t|) Σ_{S_t} Δ_n``
- ``average_all``:           ``η · (1/N) Σ_{S_t} Δ_n``
- ``known_prob``:            ``η · (1/N) Σ_{S_t} Δ_n / p_n`` (the true, clipped ``p_n``)
- MIFA (Gu et al., arXiv 2106.04159): keep the latest ``Δ_n`` of every client (0 initially);
  step ``η · (1/N) Σ_{n=1}^{N} y_n`` after storing this round's deltas (:class:`MIFAMemory`).
- FedVarp (Jhunjhunwala et al., arXiv 2207.14130): keep ``y_n`` (0 initially); step
  ``η · [(1/|S_t|) Σ_{S_t} (Δ_n − y_n) + ȳ]`` with ``y`` and ``ȳ = (1/N) Σ_n y_n`` *before* the
  round, then ``y_n ← Δ_n`` for the participants (:class:`FedVarpMemory`).

The stateless rules accept numpy arrays or torch tensors and return the same kind and float dtype;
the memories are numpy (``(N, d)`` arrays of the given dtype).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedagg.fedau import _as_vector, _check_participants, _combine, _num_rows

__all__ = [
    "FedVarpMemory",
    "MIFAMemory",
    "average_all",
    "average_participating",
    "known_prob",
]


def average_participating(deltas: Any, lr: float = 1.0) -> Any:
    """``η · (1/|S_t|) Σ_{n∈S_t} Δ_n`` (FedAvg over the participants); 0 if nobody participates.

    ``deltas: (n, d)`` numpy or torch ``-> (d,)`` of the same kind and float dtype.

    Example
    -------
    >>> average_participating(np.array([[1.0, 0.0], [0.0, 2.0]]), lr=2.0).tolist()
    [1.0, 2.0]
    """
    n = _num_rows(deltas)
    return _combine(deltas, np.full(n, lr / n) if n else np.zeros(0))


def average_all(deltas: Any, num_clients: int, lr: float = 1.0) -> Any:
    """``η · (1/N) Σ_{n∈S_t} Δ_n`` (absent clients count as zero updates).

    ``deltas: (n, d)`` numpy or torch ``-> (d,)`` of the same kind and float dtype.

    Example
    -------
    >>> average_all(np.array([[1.0, 0.0], [0.0, 2.0]]), num_clients=4).tolist()
    [0.25, 0.5]
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    n = _num_rows(deltas)
    return _combine(deltas, np.full(n, lr / num_clients))


def known_prob(deltas: Any, probabilities: Any, num_clients: int, lr: float = 1.0) -> Any:
    """``η · (1/N) Σ_{n∈S_t} Δ_n / p_n`` with the true participation probabilities.

    ``deltas: (n, d)`` numpy or torch, ``probabilities: (n,)`` in (0, 1] for the same clients
    ``-> (d,)`` of the same kind and float dtype.

    Example
    -------
    >>> known_prob(np.array([[1.0, 0.0], [0.0, 2.0]]), [0.5, 1.0], num_clients=2).tolist()
    [1.0, 1.0]
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    n = _num_rows(deltas)
    p = _as_vector(probabilities, n, "probabilities")
    if np.any(p <= 0) or np.any(p > 1):
        raise ValueError("probabilities must lie in (0, 1]")
    return _combine(deltas, lr / (num_clients * p))


class _Memory:
    """``(N, d)`` per-client memory of the latest delta, 0 initially."""

    def __init__(self, num_clients: int, dim: int, dtype: Any = np.float64) -> None:
        if num_clients < 1 or dim < 0:
            raise ValueError(f"need num_clients >= 1 and dim >= 0, got {num_clients}, {dim}")
        self.num_clients = int(num_clients)
        self.dim = int(dim)
        self.memory: np.ndarray = np.zeros((self.num_clients, self.dim), dtype=dtype)

    def _check(self, participant_ids: Any, deltas: Any) -> tuple[np.ndarray, np.ndarray]:
        ids = _check_participants(participant_ids, self.num_clients)
        x = np.asarray(deltas, dtype=self.memory.dtype)
        if x.shape != (ids.shape[0], self.dim):
            raise ValueError(f"deltas must be ({ids.shape[0]}, {self.dim}), got {x.shape}")
        return ids, x

    def state_dict(self) -> dict[str, Any]:
        """``{"memory": (N, d) copy}``."""
        return {"memory": self.memory.copy()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` with the same shape."""
        mem = np.array(state["memory"], dtype=self.memory.dtype, copy=True)
        if mem.shape != self.memory.shape:
            raise ValueError(f"memory must have shape {self.memory.shape}, got {mem.shape}")
        self.memory = mem


class MIFAMemory(_Memory):
    """MIFA: average the latest update of *every* client (Gu et al., arXiv 2106.04159).

    ``y_n ← Δ_n`` for ``n ∈ S_t``, then the step is ``η · (1/N) Σ_{n=1}^{N} y_n``; if nobody
    participates the step is 0 and ``y`` is unchanged. State: ``y: (N, d)`` (0 initially).

    Example
    -------
    >>> mifa = MIFAMemory(num_clients=2, dim=1)
    >>> mifa.step([0], [[2.0]]).tolist(), mifa.step([1], [[4.0]]).tolist()
    ([1.0], [3.0])
    """

    def step(self, participant_ids: Any, deltas: Any, lr: float = 1.0) -> np.ndarray:
        """Store ``deltas: (n, d)`` of ``participant_ids: (n,)`` and return the step ``(d,)``."""
        ids, x = self._check(participant_ids, deltas)
        if ids.size == 0:
            return np.zeros(self.dim, dtype=self.memory.dtype)
        self.memory[ids] = x
        return (lr * self.memory.mean(axis=0)).astype(self.memory.dtype, copy=False)


class FedVarpMemory(_Memory):
    """FedVarp: SAGA-style variance reduction with per-client memory (arXiv 2207.14130).

    With ``y`` and ``ȳ = (1/N) Σ_n y_n`` as at the end of the previous round, the step is
    ``η · [(1/|S_t|) Σ_{n∈S_t} (Δ_n − y_n) + ȳ]``; then ``y_n ← Δ_n`` for ``n ∈ S_t``. If nobody
    participates the step is 0 and ``y`` is unchanged. State: ``y: (N, d)`` (0 initially).

    Example
    -------
    >>> varp = FedVarpMemory(num_clients=2, dim=1)
    >>> varp.step([0], [[2.0]]).tolist(), varp.step([1], [[4.0]]).tolist()
    ([2.0], [5.0])
    """

    def step(self, participant_ids: Any, deltas: Any, lr: float = 1.0) -> np.ndarray:
        """Return the step ``(d,)`` for ``deltas: (n, d)`` of ``participant_ids: (n,)``, then store."""
        ids, x = self._check(participant_ids, deltas)
        if ids.size == 0:
            return np.zeros(self.dim, dtype=self.memory.dtype)
        y_bar = self.memory.mean(axis=0)
        correction = (x - self.memory[ids]).mean(axis=0)
        self.memory[ids] = x
        return (lr * (correction + y_bar)).astype(self.memory.dtype, copy=False)
