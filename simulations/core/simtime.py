"""Simulated wall-clock time of synchronous rounds, from client profiles.

A client-round of client ``k`` (profile ``P``) lasts

    compute = steps · batch_size · seconds_per_sample / P.speed
    comm    = 2 · latency + 8 · (bytes_down + bytes_up) / (P.bandwidth_mbps · 10⁶)
    T_k     = (compute + comm) · J_k,   J_k ~ LogNormal(0, jitter) from (seed, "simtime", round, k)

The round lasts ``max_k T_k`` over the clients that replied; with a ``deadline``, clients with
``T_k > deadline`` are stragglers: their replies are dropped before aggregation (counted in
``stragglers``) and the round lasts ``deadline``. The clock is deterministic, so it does not
depend on the engine or on how busy the machine is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from fedagg.rng import numpy_rng
from simulations.core.config import RunConfig
from simulations.core.profiles import ProfileTable


@dataclasses.dataclass
class RoundTime:
    """Simulated outcome of one round."""

    seconds: float
    kept: list[int]
    stragglers: list[int]
    durations: dict[int, float]


class SimClock:
    """Simulated time of the run (``time``: seconds since the start, cumulative)."""

    def __init__(self, config: RunConfig, table: ProfileTable | None = None) -> None:
        self.config = config
        st = config.simulated_time
        self.seconds_per_sample = st.seconds_per_sample
        self.latency = st.latency
        self.jitter = st.jitter
        self.deadline = st.deadline
        self.table = table or ProfileTable(config)
        self.time = 0.0

    def client_seconds(self, server_round: int, cid: int, bytes_down: int, bytes_up: int) -> float:
        """Simulated duration of client ``cid``'s round (see module docstring)."""
        prof = self.table.of(cid)
        steps = prof.local_steps if prof.local_steps is not None else self.config.local_steps
        batch = prof.batch_size if prof.batch_size is not None else self.config.batch_size
        compute = steps * batch * self.seconds_per_sample / prof.speed
        comm = 2 * self.latency + 8.0 * (bytes_down + bytes_up) / (prof.bandwidth_mbps * 1e6)
        factor = 1.0
        if self.jitter > 0:
            factor = float(numpy_rng(self.config.seed, "simtime", server_round, cid)
                           .lognormal(0.0, self.jitter))
        return (compute + comm) * factor

    def settle(self, server_round: int, sizes: Mapping[int, tuple[int, int]]) -> RoundTime:
        """Time the round for clients ``{cid: (bytes_down, bytes_up)}``; advance :attr:`time`."""
        durations = {cid: self.client_seconds(server_round, cid, d, u) for cid, (d, u) in sizes.items()}
        if self.deadline is None:
            kept, late = sorted(durations), []
            seconds = max(durations.values(), default=0.0)
        else:
            limit = float(self.deadline)
            kept = sorted(c for c, t in durations.items() if t <= limit)
            late = sorted(c for c, t in durations.items() if t > limit)
            seconds = limit if late else max((durations[c] for c in kept), default=0.0)
        self.time += seconds
        return RoundTime(seconds, kept, late, durations)


def expected_work(table: ProfileTable, config: RunConfig, cid: int) -> float:
    """Real cost of client ``cid``'s local training, ``steps · batch_size`` (for longest-first
    dispatch to workers; the simulated ``speed`` does not slow real computation)."""
    prof = table.of(cid)
    steps = prof.local_steps if prof.local_steps is not None else config.local_steps
    batch = prof.batch_size if prof.batch_size is not None else config.batch_size
    return float(np.float64(steps) * batch)
