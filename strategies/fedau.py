"""FedAU and the baselines of its paper as Flower strategies (Wang & Ji, arXiv 2306.03401).

Every rule here follows the delta convention of :class:`~strategies.base.DeltaStrategy`: a client
update is ``Δ_n = local_n − global`` (formed on the server against the broadcast model), the rule
maps the participants' deltas to one aggregate and the server applies ``global += η · aggregate``
with ``η = server_lr``. ``N = num_clients`` is the total population (participating or not); ``S_t``
is the set of clients whose reply was *accepted* in round ``t`` (see "Participation" below).
The rules are unweighted by example counts, as in the reference code (IBM/fedau ``main.py``):

=========================  ===============================================================
registry name              aggregate (``global += server_lr · aggregate``)
=========================  ===============================================================
``fedau``                  ``(1/N) Σ_{n∈S_t} ω_n Δ_n``, ``ω_n`` = online mean interval
                           between participations (≈ ``1/p_n``, :class:`fedagg.fedau.FedAUWeights`)
``fedavg-participating``   ``(1/|S_t|) Σ_{n∈S_t} Δ_n``
``fedavg-all``             ``(1/N) Σ_{n∈S_t} Δ_n``
``known-p``                ``(1/N) Σ_{n∈S_t} Δ_n / p_n`` with the true ``p_n`` (an oracle)
``mifa``                   ``(1/N) Σ_{n=1}^{N} y_n`` after ``y_n ← Δ_n`` for ``n ∈ S_t``
``fedvarp``                ``(1/|S_t|) Σ_{n∈S_t} (Δ_n − y_n) + (1/N) Σ_n y_n``, then ``y_n ← Δ_n``
=========================  ===============================================================

If nobody participates the global model is kept (and no state changes besides the passage of
time, which the FedAU estimator accounts for lazily).

Participation
-------------
Participation is a property of the environment: each round the grid offers the clients that are
available, and these strategies train *all* of them (``clients_per_round = None``, the default).
If ``clients_per_round`` is set, the usual seeded sampling among the available clients applies on
top, and FedAU then learns the inverse of the probability of being *trained* (available and
sampled), so it compensates the sampling too.
A client counts as having participated in round ``t`` iff the server *accepted* its reply in round
``t``: a reply that failed (error) or was rejected by validation (wrong shapes, NaN/Inf, update
norm) is an absence, because the server never got a usable update — that is what the weights
have to compensate. A round whose accepted replies are fewer than ``min_replies`` keeps the global
model and leaves the MIFA/FedVarp memories unchanged, but FedAU still records the accepted
clients' participation (the estimator measures availability, which that round did reveal).

Client ids
----------
The stateful rules (``fedau``, ``mifa``, ``fedvarp``, ``known-p``) keep per-client rows ``0 … N−1``
and map the source node id of each reply to a row with a :class:`~strategies.node_index.NodeIndex`:

- ``node_ids=[…]`` (``N`` distinct Flower node ids, optional): row ``i`` is ``node_ids[i]``; a reply
  from any other node is an error.
- otherwise ``fedau``, ``mifa`` and ``fedvarp`` give each node a row the first time it replies
  and keep it: a node id ``k < N`` gets row ``k`` (so under the fedagg engines, where node id =
  partition id ``0 … N−1``, row = client id and results are unchanged), any other node the lowest
  free row, in order of first reply (ascending node id within a round). This is what makes them
  work unchanged in any Flower app (``run_simulation``, a SuperLink), whose node ids are random
  64-bit integers; more than ``N`` distinct nodes is an error.
- ``known-p``'s ``probabilities[i]`` must belong to a known node, so it never assigns rows on the
  fly: without ``node_ids`` the node ids must be ``0 … N−1`` (``probabilities`` indexed by node id,
  as the fedagg runner does); in another Flower app pass ``node_ids`` in the order of
  ``probabilities`` (e.g. ``sorted(grid.get_node_ids())``).

The assignment is state (``clients.node_id`` ``(N,) uint64``, ``clients.assigned`` ``(N,) bool``,
present once a node has a row), so a resumed run maps every node to the same row.

State (``state_dict()``, saved to ``strategy_state.safetensors`` at the end of a run)
--------------------------------------------------------------------------------------
- ``fedau``: ``fedau.interval_sum``, ``fedau.interval_count``, ``fedau.last_participation``
  ``(N,) int64``, ``fedau.round`` (last round with participants), ``fedau.server_round`` (last
  round aggregated), ``fedau.num_clients``, ``fedau.cutoff`` (``0`` = none) as ``(1,) int64``, plus
  ``fedau.weights: (N,) float64`` = ``ω_n`` for the next round (derived, ignored on load).
  O(1) per client: 24 bytes.
- ``mifa`` / ``fedvarp``: ``<name>.memory: (N, d) float64`` — ``8·N·d`` bytes (e.g. 100 clients ×
  14,154 parameters = 11.3 MB; 1 GB at N = 1,000 and d = 125,000), ``<name>.seen: (N,) bool``.
- The stateless rules have no state of their own.
- Every rule: ``clients.*`` (above) and ``server_opt.momentum`` (the server optimiser's buffer, see
  :class:`~strategies.base.DeltaStrategy`) when they exist.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.supercore import log

from fedagg.errors import ConfigError
from fedagg.fedau import FedAUWeights, fedau_update
from fedagg.fedau_baselines import (
    FedVarpMemory,
    MIFAMemory,
    average_all,
    average_participating,
    known_prob,
)
from fedagg.registry import Param
from strategies.base import DeltaStrategy, reply_client_id
from strategies.node_index import STATE_PREFIX as NODE_STATE_PREFIX
from strategies.node_index import NodeIndex
from strategies.registry import Needs, register

__all__ = [
    "FIRST_ROUND",
    "FedAUStrategy",
    "FedVarpStrategy",
    "KnownProbStrategy",
    "MIFAStrategy",
    "PopulationStrategy",
]

#: Flower numbers rounds from 1.
FIRST_ROUND = 1


def _scalar(state: dict[str, np.ndarray], key: str) -> int:
    if key not in state:
        raise ValueError(f"state has no key {key!r}")
    arr = np.asarray(state[key])
    if arr.size != 1:
        raise ValueError(f"state[{key!r}] must hold one value, got shape {arr.shape}")
    return int(arr.reshape(()))


class PopulationStrategy(DeltaStrategy):
    """Base of the FedAU-family rules: knows the population size ``N`` and trains every
    available client by default. ``global += server_lr · aggregate_deltas(Δ)``.

    Parameters
    ----------
    num_clients : int
        ``N``, the total population.
    node_ids : sequence of int or None (default None)
        The Flower node id of each client row ``0 … N−1`` (see "Client ids" in the module
        docstring); None assigns rows as nodes first reply (``assign_rows``) or requires node
        id == row.
    **kwargs
        :class:`~strategies.base.DeltaStrategy` parameters (``server_lr``, ``clients_per_round``,
        ``seed``, ``min_replies``, ``max_update_norm``, the server optimiser).
    """

    #: Without ``node_ids``, give unknown nodes a row on first reply (False: node id must be the row).
    assign_rows = True

    def __init__(self, *, num_clients: int, node_ids: Sequence[int] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if int(num_clients) != num_clients or num_clients < 1:
            raise ValueError(f"num_clients must be an integer >= 1, got {num_clients}")
        self.num_clients = int(num_clients)
        self.node_index = NodeIndex(self.num_clients, node_ids, assign=self.assign_rows)

    def rows(self, client_ids: Sequence[int]) -> np.ndarray:
        """Rows ``(n,) int64`` in ``[0, N)`` of the replies' node ids (assigned if new)."""
        return self.node_index.lookup(client_ids)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Base state (server optimiser) plus the node → row assignment (``clients.*``)."""
        out = super().state_dict()
        out.update(self.node_index.state_dict())
        return out

    def load_base_state(self, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rest = super().load_base_state(state)
        self.node_index.load_state_dict(
            {k: v for k, v in rest.items() if k.startswith(NODE_STATE_PREFIX)})
        return {k: v for k, v in rest.items() if not k.startswith(NODE_STATE_PREFIX)}

    def summary(self) -> None:
        log(INFO, "\t├──> %s: N=%d, %s, clients_per_round=%s, seed=%d",
            type(self).__name__, self.num_clients, self.describe_server_step(),
            self.clients_per_round, self.seed)


# ---------------------------------------------------------------------------------------- FedAU
class FedAUStrategy(PopulationStrategy):
    """FedAU (Wang & Ji, arXiv 2306.03401): ``global += η · (1/N) · Σ_{n∈S_t} ω_n Δ_n``.

    ``Δ_n = local_n − global``; ``ω_n`` is the mean length of client ``n``'s completed
    participation intervals (each capped at ``K = cutoff``), computed from rounds *before* the
    current one, 1 while none is recorded (:class:`fedagg.fedau.FedAUWeights`, lazy O(1) state).
    The estimator sees every round number: rounds in which a client is absent (not available, not
    selected, failed or rejected) count as absences even if ``aggregate_train`` saw no reply.

    Parameters
    ----------
    num_clients : int
        ``N``.
    cutoff : int >= 1 or None (default None)
        ``K``; None means ``K = ∞``. With Bernoulli(p) participation ``ω → (1 − (1−p)^K)/p``.
    **kwargs
        :class:`PopulationStrategy` parameters.

    Example
    -------
    >>> s = FedAUStrategy(num_clients=2)
    >>> s.aggregate_deltas(1, np.array([[2.0, 0.0]]), np.ones(1), [0]).tolist()   # ω = 1
    [1.0, 0.0]
    >>> s.aggregate_deltas(4, np.array([[2.0, 0.0]]), np.ones(1), [0]).tolist()   # ω = 1 (one interval of 1)
    [1.0, 0.0]
    >>> s.aggregate_deltas(5, np.array([[2.0, 0.0]]), np.ones(1), [0]).tolist()   # ω = (1 + 3)/2
    [2.0, 0.0]
    """

    def __init__(self, *, num_clients: int, cutoff: int | None = None, **kwargs: Any) -> None:
        super().__init__(num_clients=num_clients, **kwargs)
        self.estimator = FedAUWeights(self.num_clients, cutoff, first_round=FIRST_ROUND)
        self.last_weights = np.zeros(0)
        #: The last round passed to ``aggregate_train`` (participants or not).
        self.server_round = FIRST_ROUND - 1

    @property
    def cutoff(self) -> int | None:
        return self.estimator.cutoff

    def _record(self, server_round: int, client_ids: Sequence[int]) -> np.ndarray:
        ids = self.rows(client_ids)
        self.last_weights = self.estimator.step(server_round, ids)
        return self.last_weights

    def aggregate_deltas(self, server_round: int, deltas: np.ndarray, num_examples: np.ndarray,
                         client_ids: list[int]) -> np.ndarray:
        """``(1/N) Σ ω_n Δ_n`` for ``deltas: (n, d)`` of ``client_ids`` (steps the estimator)."""
        del num_examples
        w = self._record(server_round, client_ids)
        return fedau_update(deltas, w, self.num_clients)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self.last_weights = np.zeros(0)
        self.server_round = max(self.server_round, int(server_round))
        arrays, metrics = super().aggregate_train(server_round, replies)
        report = self.last_report
        if report is not None and report.accepted and self.estimator.round < server_round:
            # fewer than min_replies: the model is kept, but the participation happened
            self._record(server_round, [reply_client_id(m) for m in report.accepted])
        return arrays, metrics

    def round_metrics(self) -> dict[str, float]:
        """``fedau_weight_{mean,min,max}`` over this round's participants."""
        w = self.last_weights
        if w.size == 0:
            return {}
        return {"fedau_weight_mean": float(w.mean()), "fedau_weight_min": float(w.min()),
                "fedau_weight_max": float(w.max())}

    def weights(self) -> np.ndarray:
        """``ω_n`` every client would get in the round after the last one aggregated: ``(N,)``."""
        return self.estimator.weights(max(self.server_round, self.estimator.round) + 1)

    def state_dict(self) -> dict[str, np.ndarray]:
        """The estimator state (see the module docstring) plus the derived ``fedau.weights``."""
        st = self.estimator.state_dict()
        return {
            **super().state_dict(),
            "fedau.interval_sum": st["interval_sum"],
            "fedau.interval_count": st["interval_count"],
            "fedau.last_participation": st["last_participation"],
            "fedau.round": np.array([st["round"]], dtype=np.int64),
            "fedau.num_clients": np.array([st["num_clients"]], dtype=np.int64),
            "fedau.cutoff": np.array([st["cutoff"] or 0], dtype=np.int64),
            "fedau.server_round": np.array([self.server_round], dtype=np.int64),
            "fedau.weights": self.weights(),
        }

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore :meth:`state_dict` output (same ``N`` and ``cutoff``; ``ValueError`` else)."""
        state = self.load_base_state(state)
        cutoff = _scalar(state, "fedau.cutoff")
        self.estimator.load_state_dict({
            "interval_sum": state["fedau.interval_sum"],
            "interval_count": state["fedau.interval_count"],
            "last_participation": state["fedau.last_participation"],
            "round": _scalar(state, "fedau.round"),
            "num_clients": _scalar(state, "fedau.num_clients"),
            "cutoff": cutoff if cutoff > 0 else None,
        })
        self.server_round = _scalar(state, "fedau.server_round")

    def summary(self) -> None:
        log(INFO, "\t├──> FedAU: N=%d, cutoff K=%s, %s, clients_per_round=%s",
            self.num_clients, self.cutoff or "∞", self.describe_server_step(), self.clients_per_round)


# ------------------------------------------------------------------------- stateless baselines
class AverageParticipatingStrategy(PopulationStrategy):
    """``global += η · (1/|S_t|) Σ_{n∈S_t} Δ_n`` (unweighted FedAvg over the participants).

    Unlike ``fedavg`` (example-weighted), every participant counts equally, as in the FedAU
    reference. Under heterogeneous participation it optimises ``Σ p_n F_n / Σ p_n``, not
    ``(1/N) Σ F_n``.
    """

    def aggregate_deltas(self, server_round: int, deltas: np.ndarray, num_examples: np.ndarray,
                         client_ids: list[int]) -> np.ndarray:
        del server_round, num_examples, client_ids
        return average_participating(deltas)


class AverageAllStrategy(PopulationStrategy):
    """``global += η · (1/N) Σ_{n∈S_t} Δ_n`` (absent clients count as zero updates)."""

    def aggregate_deltas(self, server_round: int, deltas: np.ndarray, num_examples: np.ndarray,
                         client_ids: list[int]) -> np.ndarray:
        del server_round, num_examples, client_ids
        return average_all(deltas, self.num_clients)


class KnownProbStrategy(PopulationStrategy):
    """``global += η · (1/N) Σ_{n∈S_t} Δ_n / p_n`` with the *true* ``p_n`` (an oracle baseline).

    Parameters
    ----------
    probabilities : (N,) sequence of float in (0, 1]
        ``p_n``; the runner passes the run's participation probabilities. Entry ``i`` belongs
        to node ``node_ids[i]``, or, without ``node_ids``, to node id ``i`` (the fedagg engines'
        node ids are ``0 … N−1``; in another Flower app pass ``node_ids``, e.g.
        ``sorted(grid.get_node_ids())``). A reply from another node is a ``ValueError``.
    """

    assign_rows = False

    def __init__(self, *, num_clients: int, probabilities: Sequence[float], **kwargs: Any) -> None:
        super().__init__(num_clients=num_clients, **kwargs)
        p = np.asarray(probabilities, dtype=np.float64)
        if p.shape != (self.num_clients,):
            raise ConfigError("strategy_args.probabilities",
                              f"need {self.num_clients} values (one per client), got shape {p.shape}")
        if not np.all(np.isfinite(p)) or np.any(p <= 0) or np.any(p > 1):
            raise ConfigError("strategy_args.probabilities", "every p_n must lie in (0, 1]")
        self.probabilities = p
        self.probabilities.setflags(write=False)

    def aggregate_deltas(self, server_round: int, deltas: np.ndarray, num_examples: np.ndarray,
                         client_ids: list[int]) -> np.ndarray:
        del server_round, num_examples
        ids = self.rows(client_ids)
        return known_prob(deltas, self.probabilities[ids], self.num_clients)


# ---------------------------------------------------------------------------- memory baselines
class _MemoryStrategy(PopulationStrategy):
    """A rule with an ``(N, d)`` memory of each client's latest delta (allocated on first use)."""

    memory_cls: type[MIFAMemory] | type[FedVarpMemory]
    key: str

    def __init__(self, *, num_clients: int, **kwargs: Any) -> None:
        super().__init__(num_clients=num_clients, **kwargs)
        self.memory: MIFAMemory | FedVarpMemory | None = None
        self.seen = np.zeros(self.num_clients, dtype=bool)

    def _memory(self, dim: int) -> MIFAMemory | FedVarpMemory:
        if self.memory is None:
            self.memory = self.memory_cls(self.num_clients, dim)
        elif self.memory.dim != dim:
            raise ValueError(f"{self.key}: model has {dim} parameters, memory has {self.memory.dim}")
        return self.memory

    def aggregate_deltas(self, server_round: int, deltas: np.ndarray, num_examples: np.ndarray,
                         client_ids: list[int]) -> np.ndarray:
        del server_round, num_examples
        ids = self.rows(client_ids)
        step = self._memory(deltas.shape[1]).step(ids, deltas)
        self.seen[ids] = True
        return step

    def round_metrics(self) -> dict[str, float]:
        """``memory_filled``: fraction of clients with a stored update."""
        return {"memory_filled": float(self.seen.mean())}

    def state_dict(self) -> dict[str, np.ndarray]:
        out = super().state_dict()
        if self.memory is not None:
            out[f"{self.key}.memory"] = self.memory.memory.copy()
            out[f"{self.key}.seen"] = self.seen.copy()
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        state = self.load_base_state(state)
        if not state:
            self.memory, self.seen = None, np.zeros(self.num_clients, dtype=bool)
            return
        mem = np.asarray(state[f"{self.key}.memory"], dtype=np.float64)
        if mem.ndim != 2 or mem.shape[0] != self.num_clients:
            raise ValueError(f"{self.key}.memory must be ({self.num_clients}, d), got {mem.shape}")
        seen = np.asarray(state[f"{self.key}.seen"], dtype=bool)
        if seen.shape != (self.num_clients,):
            raise ValueError(f"{self.key}.seen must be ({self.num_clients},), got {seen.shape}")
        memory = self.memory_cls(self.num_clients, mem.shape[1])
        memory.load_state_dict({"memory": mem})
        self.memory, self.seen = memory, seen.copy()

    @property
    def state_nbytes(self) -> int:
        """Bytes held by the memory (``8·N·d``; 0 before the first round)."""
        return 0 if self.memory is None else int(self.memory.memory.nbytes)


class MIFAStrategy(_MemoryStrategy):
    """MIFA (Gu et al., arXiv 2106.04159): ``y_n ← Δ_n`` for ``n ∈ S_t``, then
    ``global += η · (1/N) Σ_{n=1}^{N} y_n`` (``y_n = 0`` until client ``n`` first participates).
    Memory ``(N, d)`` float64."""

    memory_cls = MIFAMemory
    key = "mifa"


class FedVarpStrategy(_MemoryStrategy):
    """FedVarp (Jhunjhunwala et al., arXiv 2207.14130):
    ``global += η · [(1/|S_t|) Σ_{n∈S_t} (Δ_n − y_n) + (1/N) Σ_n y_n]`` with ``y`` before the
    round, then ``y_n ← Δ_n`` for ``n ∈ S_t``. Memory ``(N, d)`` float64."""

    memory_cls = FedVarpMemory
    key = "fedvarp"


# ------------------------------------------------------------------------------------ registry
#: These rules compensate unequal participation: pointless when every client takes every round.
_PARTICIPATION = Needs(participation=True)
_SELECTS_ALL = (" Trains every available client (clients_per_round null); Δ = local − global, "
                "global += server_lr · aggregate.")


#: Row of each Flower node in the per-client state (module docstring, "Client ids").
_NODE_IDS = Param("node_ids", list, None, "Flower node id of each client row 0..N-1 (null: node ids "
                  "0..N-1 as in the fedagg engines, else rows by first reply; known-p: in the order "
                  "of probabilities)", nullable=True)


@register("fedau", needs=_PARTICIPATION,
          params=[Param("cutoff", int, None, "cut-off K of the participation intervals (null: ∞)",
                        low=1, nullable=True), _NODE_IDS],
          doc="FedAU (arXiv 2306.03401): (1/N) Σ_{S_t} ω_n Δ_n with ω_n ≈ 1/p_n estimated online "
              "from participation intervals." + _SELECTS_ALL)
def build_fedau(**params: Any) -> FedAUStrategy:
    return FedAUStrategy(**params)


@register("fedavg-participating", needs=_PARTICIPATION,
          doc="Unweighted mean of the participants' deltas (1/|S_t|) Σ_{S_t} Δ_n (FedAU baseline)."
              + _SELECTS_ALL)
def build_fedavg_participating(**params: Any) -> AverageParticipatingStrategy:
    return AverageParticipatingStrategy(**params)


@register("fedavg-all", needs=_PARTICIPATION,
          doc="(1/N) Σ_{S_t} Δ_n: absent clients count as zero updates (FedAU baseline)."
              + _SELECTS_ALL)
def build_fedavg_all(**params: Any) -> AverageAllStrategy:
    return AverageAllStrategy(**params)


@register("known-p", needs=_PARTICIPATION,
          params=[Param("probabilities", list, None,
                        "true participation probabilities p_n (filled in by the runner)",
                        nullable=True), _NODE_IDS],
          doc="(1/N) Σ_{S_t} Δ_n / p_n with the true p_n (oracle FedAU baseline)." + _SELECTS_ALL)
def build_known_p(probabilities: list[float] | None, **params: Any) -> KnownProbStrategy:
    if probabilities is None:
        raise ConfigError("strategy_args.probabilities",
                          "known-p needs the true p_n (the runner passes the run's participation "
                          "probabilities; pass them yourself outside the runner)")
    return KnownProbStrategy(probabilities=probabilities, **params)


@register("mifa", needs=_PARTICIPATION, params=[_NODE_IDS],
          doc="MIFA (arXiv 2106.04159): mean over all N of each client's latest delta; (N, d) "
              "memory." + _SELECTS_ALL)
def build_mifa(**params: Any) -> MIFAStrategy:
    return MIFAStrategy(**params)


@register("fedvarp", needs=_PARTICIPATION, params=[_NODE_IDS],
          doc="FedVarp (arXiv 2207.14130): SAGA-style correction with each client's latest delta; "
              "(N, d) memory." + _SELECTS_ALL)
def build_fedvarp(**params: Any) -> FedVarpStrategy:
    return FedVarpStrategy(**params)
