"""FedAU: online estimation of aggregation weights ``ω_n ≈ 1/p_n`` and the FedAU server update.

FedAU (Wang & Ji, "A Lightweight Method for Tackling Unknown Participation Statistics in Federated
Averaging", arXiv 2306.03401) weights the update of a participating client by the running mean of
the lengths of its completed participation intervals, an estimate of ``1/p_n`` that needs no
knowledge of the participation statistics. The server step is

    ``x ← x + η · (1/N) · Σ_{n ∈ S_t} ω_n(t) Δ_n``

with ``N`` the total population (not ``|S_t|``), so that ``E[Σ_{n∈S_t} ω_n Δ_n] = Σ_n ω_n p_n Δ_n``
is unbiased for the full average when ``ω_n = 1/p_n``.

Interval bookkeeping (IBM/fedau, ``../shared/reference/fedau_flag.md`` §1.1): a client's interval
ends when it participates (length ``gap + 1``, ``gap`` the rounds absent since the previous
boundary) or after ``K`` consecutive absences (a *cut-off* interval of length ``K``), so every
recorded interval is ``min(G, K)`` and under Bernoulli participation ``E[min(G, K)] =
(1 − (1 − p)^K) / p``. The weight used in round ``t`` is the mean of the intervals completed
*before* ``t`` (no look-ahead), and 1 while none is recorded.

:class:`FedAUWeights` keeps that state lazily (§1.2) in three ``(N,)`` arrays — ``S`` (sum of
intervals), ``M`` (their count) and ``last`` (last participation round, ``first_round − 1``
initially) — and only touches the participants of a round. :func:`fedau_update` is the server
step; the baselines of the paper's experiments are in :mod:`fedagg.fedau_baselines`.

Example
-------
>>> est = FedAUWeights(2)
>>> est.step(0, [0, 1]).tolist()      # nothing recorded yet
[1.0, 1.0]
>>> est.step(3, [0]).tolist()         # client 0 recorded the interval 1 (round 0)
[1.0]
>>> est.step(4, [0, 1]).tolist()      # intervals {1, 3} and {1}
[2.0, 1.0]
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["FedAUWeights", "fedau_update"]


def _check_participants(participant_ids: Any, num_clients: int) -> np.ndarray:
    """``participant_ids`` as a 1-D int64 array of distinct ids in ``[0, num_clients)``."""
    ids = np.asarray(participant_ids)
    if ids.ndim != 1:
        raise ValueError(f"participant ids must be 1-D, got shape {ids.shape}")
    if ids.size == 0:
        return np.zeros(0, dtype=np.int64)
    if not np.issubdtype(ids.dtype, np.integer) or ids.dtype == np.bool_:
        raise ValueError(f"participant ids must be integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    if ids.min() < 0 or ids.max() >= num_clients:
        raise ValueError(f"participant ids must lie in [0, {num_clients}), got {ids.tolist()}")
    if 16 * ids.size >= num_clients:  # dense round: an O(N) mask is cheaper than sorting
        mask = np.zeros(num_clients, dtype=bool)
        mask[ids] = True
        duplicated = np.count_nonzero(mask) != ids.size
    else:
        srt = np.sort(ids)
        duplicated = bool(np.any(srt[1:] == srt[:-1]))
    if duplicated:
        values, counts = np.unique(ids, return_counts=True)
        raise ValueError(f"duplicate participant ids: {values[counts > 1].tolist()}")
    return ids


class FedAUWeights:
    """The FedAU weight estimator ``ω_n ≈ 1/p_n`` with O(1) state per client (lazy form).

    State: ``S, M, last: (N,) int64`` (interval sum, interval count, last participation round).
    When client ``n`` participates in round ``t`` (cut-off ``K``, ``K = ∞`` if ``cutoff`` is None)::

        gap  = t − last_n − 1                       # rounds absent since its last participation
        c    = gap // K;  S_n += c·K;  M_n += c     # cut-off intervals completed while absent
        ω_n  = S_n / M_n  if M_n > 0  else 1        # weight used in round t
        S_n += gap mod K + 1;  M_n += 1;  last_n = t

    This equals the per-round bookkeeping of the reference (a counter per client, incremented when
    absent, an interval appended on participation or when the counter reaches ``K``); rounds in
    which a client is not listed, including rounds never passed to :meth:`step`, count as absences
    (Wang & Ji, arXiv 2306.03401, Alg. 1; ``../shared/reference/fedau_flag.md`` §1.1–1.2).

    Parameters
    ----------
    num_clients : int
        ``N``, the total population (participants or not).
    cutoff : int >= 1 or None, default None
        ``K``; None means no cut-off (``K = ∞``). Smaller ``K`` trades bias for variance.
    first_round : int, default 0
        The first round that can be stepped; rounds before it do not exist (``last`` starts at
        ``first_round − 1``, so a client participating in ``first_round`` records an interval of 1).

    Example
    -------
    >>> est = FedAUWeights(1, cutoff=3)
    >>> [est.step(t, [0]).tolist() for t in (3, 5, 11)]
    [[3.0], [2.0], [2.25]]
    """

    def __init__(self, num_clients: int, cutoff: int | None = None, *, first_round: int = 0):
        if int(num_clients) != num_clients or num_clients < 0:
            raise ValueError(f"num_clients must be a non-negative integer, got {num_clients}")
        if cutoff is not None and (int(cutoff) != cutoff or cutoff < 1):
            raise ValueError(f"cutoff must be None or an integer >= 1, got {cutoff}")
        self.num_clients: int = int(num_clients)
        self.cutoff: int | None = None if cutoff is None else int(cutoff)
        self.first_round: int = int(first_round)
        n = self.num_clients
        self._sum = np.zeros(n, dtype=np.int64)
        self._count = np.zeros(n, dtype=np.int64)
        self._last = np.full(n, self.first_round - 1, dtype=np.int64)
        self._round: int = self.first_round - 1

    @property
    def round(self) -> int:
        """The last round passed to :meth:`step` (``first_round − 1`` before the first one)."""
        return self._round

    def step(self, round: int, participant_ids: Any) -> np.ndarray:
        """The weights ``ω_n(round)`` of the participants, then record their participation.

        Parameters
        ----------
        round : int
            Strictly greater than every earlier round (and ``>= first_round``); gaps are rounds in
            which nobody participated.
        participant_ids : (n,) array_like of int
            Distinct client ids in ``[0, N)``, any order; may be empty.

        Returns
        -------
        (n,) float64 array
            ``ω_n`` in the order of ``participant_ids``: the mean recorded interval, 1.0 where none
            is recorded yet. Nothing is modified if an argument is invalid (``ValueError``).
        """
        t = int(round)
        if t != round:
            raise ValueError(f"round must be an integer, got {round!r}")
        if t <= self._round:
            raise ValueError(
                f"round {t} is not after the last recorded round {self._round} "
                "(rounds must strictly increase)"
            )
        ids = _check_participants(participant_ids, self.num_clients)
        gap = (t - 1) - self._last[ids]  # fresh arrays: safe to update in place below
        s = self._sum[ids]
        m = self._count[ids]
        if self.cutoff is not None:
            k = self.cutoff
            cuts, gap = np.divmod(gap, k)
            s += cuts * k
            m += cuts
        w = np.divide(s, m, out=np.ones(ids.shape[0], dtype=np.float64), where=m > 0)
        s += gap
        s += 1
        m += 1
        self._sum[ids] = s
        self._count[ids] = m
        self._last[ids] = t
        self._round = t
        return w

    def weights(self, round: int | None = None) -> np.ndarray:
        """``ω_n(round)`` for every client: the weight it would get if it participated in ``round``.

        Parameters
        ----------
        round : int or None
            A round after the last recorded one; default ``self.round + 1`` (the next round).
            It only matters with a cut-off, whose intervals accrue while a client is absent.

        Returns
        -------
        (N,) float64 array
            ``(S_n + c_n·K) / (M_n + c_n)`` with ``c_n = (round − last_n − 1) // K`` (``c_n = 0``
            without cut-off), 1.0 where that count is 0. The state is not modified.

        Example
        -------
        >>> est = FedAUWeights(2, cutoff=3)
        >>> _ = est.step(0, [0])            # client 0 records the interval 1
        >>> est.weights().tolist()          # in round 1
        [1.0, 1.0]
        >>> est.weights(round=7).tolist()   # two cut-offs (3, 3) accrued for each by round 7
        [2.3333333333333335, 3.0]
        """
        t = self._round + 1 if round is None else int(round)
        if t <= self._round:
            raise ValueError(f"round {t} is not after the last recorded round {self._round}")
        s, m = self._sum, self._count
        if self.cutoff is not None:
            k = self.cutoff
            cuts = (t - self._last - 1) // k
            s = s + cuts * k
            m = m + cuts
        return np.divide(s, m, out=np.ones(self.num_clients, dtype=np.float64), where=m > 0)

    @property
    def state_nbytes(self) -> int:
        """Bytes held by the state arrays ``S, M, last`` (``3 · 8 · N``)."""
        return int(self._sum.nbytes + self._count.nbytes + self._last.nbytes)

    def state_dict(self) -> dict[str, Any]:
        """Copies of the state: ``interval_sum, interval_count, last_participation: (N,) int64``,
        ``round: int`` (last recorded round), ``num_clients: int`` and ``cutoff: int | None``."""
        return {
            "interval_sum": self._sum.copy(),
            "interval_count": self._count.copy(),
            "last_participation": self._last.copy(),
            "round": self._round,
            "num_clients": self.num_clients,
            "cutoff": self.cutoff,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (same ``num_clients`` and ``cutoff``; ``ValueError`` else)."""
        if int(state["num_clients"]) != self.num_clients:
            raise ValueError(
                f"state has {state['num_clients']} clients, estimator has {self.num_clients}"
            )
        cutoff = state.get("cutoff")
        if (None if cutoff is None else int(cutoff)) != self.cutoff:
            raise ValueError(f"state has cutoff {cutoff}, estimator has {self.cutoff}")
        arrays = []
        for key in ("interval_sum", "interval_count", "last_participation"):
            arr = np.array(state[key], dtype=np.int64, copy=True)
            if arr.shape != (self.num_clients,):
                raise ValueError(f"state[{key!r}] must have shape ({self.num_clients},)")
            arrays.append(arr)
        self._sum, self._count, self._last = arrays
        self._round = int(state["round"])

    def __repr__(self) -> str:
        return f"FedAUWeights(num_clients={self.num_clients}, cutoff={self.cutoff}, round={self._round})"


# --------------------------------------------------------------------------------------------
# server update
# --------------------------------------------------------------------------------------------

def _is_torch(x: Any) -> bool:
    """Whether ``x`` is a torch tensor, without importing torch (slow) when nobody else has."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _combine(deltas: Any, coef: np.ndarray) -> Any:
    """``Σ_i coef_i · deltas_i``: ``(n, d), (n,) -> (d,)`` in the kind and float dtype of ``deltas``.

    Integer inputs give float64 (numpy) or the default float dtype (torch).
    """
    if _is_torch(deltas):
        import torch

        if deltas.ndim != 2 or deltas.shape[0] != coef.shape[0]:
            raise ValueError(f"deltas must be ({coef.shape[0]}, d), got {tuple(deltas.shape)}")
        x = deltas if deltas.is_floating_point() else deltas.to(torch.get_default_dtype())
        c = torch.as_tensor(coef, dtype=x.dtype, device=x.device)
        return c @ x
    x = np.asarray(deltas)
    if x.ndim != 2 or x.shape[0] != coef.shape[0]:
        raise ValueError(f"deltas must be ({coef.shape[0]}, d), got {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    return coef.astype(x.dtype) @ x


def _as_vector(values: Any, n: int, what: str) -> np.ndarray:
    if _is_torch(values):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values, dtype=np.float64)
    if arr.shape != (n,):
        raise ValueError(f"{what} must have shape ({n},), got {arr.shape}")
    return arr


def _num_rows(deltas: Any) -> int:
    shape = tuple(deltas.shape) if hasattr(deltas, "shape") else np.shape(deltas)
    if len(shape) != 2:
        raise ValueError(f"deltas must be (n, d), got shape {shape}")
    return int(shape[0])


def fedau_update(deltas: Any, weights: Any, num_clients: int, lr: float = 1.0) -> Any:
    """The FedAU server step ``η · (1/N) · Σ_{n ∈ S_t} ω_n Δ_n``.

    (Wang & Ji, arXiv 2306.03401, Alg. 1.) Note the division by the population size ``N``, not by
    the number of participants; no participants give a zero step.

    Parameters
    ----------
    deltas : (n, d) numpy array or torch tensor
        ``Δ_n = local − global`` of the participants.
    weights : (n,) array_like
        ``ω_n``, e.g. from :meth:`FedAUWeights.step`.
    num_clients : int
        ``N``.
    lr : float, default 1.0
        Server learning rate ``η``.

    Returns
    -------
    (d,) array of the same kind (numpy/torch) and float dtype as ``deltas``.

    Example
    -------
    >>> fedau_update(np.array([[1.0, 0.0], [0.0, 2.0]]), [2.0, 1.0], num_clients=4).tolist()
    [0.5, 0.5]
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    n = _num_rows(deltas)
    w = _as_vector(weights, n, "weights")
    return _combine(deltas, w * (lr / num_clients))
