"""Client availability processes and per-client participation probabilities.

In FedAU (Wang & Ji, "A Lightweight Method for Tackling Unknown Participation Statistics in
Federated Averaging", arXiv 2306.03401) participation is a property of the environment: each client
``n`` is available in round ``t`` according to its own random process with (unknown to the server)
stationary probability ``p_n``. This module provides

- the processes (:data:`PROCESSES`, built with :func:`build_process`), one object for the whole
  population:

  ``bernoulli``  ``1{n ∈ S_t} ~ Bernoulli(p_n)`` independently across rounds and clients;

  ``markov``     a two-state chain with ``P(off→on) = a``, ``P(on→off) = a(1/p_n − 1)`` (stationary
                 probability ``p_n``); where ``P(on→off) > 1`` both are divided by it. The initial
                 state is ``Bernoulli(p_n)`` and each round the state is updated before it is read;

  ``cyclic``     on for ``A_n = max(1, round(L·p_n))`` rounds, then off for ``max(1, L − A_n)``
                 rounds, starting off with a random phase;

  ``always``     every client in every round (no draws);

- the probabilities ``p_n`` (:data:`PROBABILITIES`, built with :func:`build_probabilities`):
  ``heterogeneous`` (correlated with the label mix, :func:`heterogeneous_probabilities`),
  ``constant`` and ``explicit``.

Random streams
--------------
The processes consume a legacy ``np.random.RandomState`` in exactly the order of the IBM/fedau
reference (``../shared/reference/fedau_flag.md`` §5.1): construction draws per client in client
order, then every round one ``sample()`` per client in index order (bernoulli: one
``binomial(1, p_n)``; markov: one ``binomial`` with the transition probability of the current state;
cyclic: none). The draws are vectorised (numpy's legacy ``binomial``/``randint`` on an array of
parameters call the same per-element routine in index order, so they consume the stream exactly as
the reference's per-client calls do). Hence, with the same ``RandomState`` the traces match the
reference bit for bit; :func:`participation_rng` derives a stream from the run seed.

Example
-------
>>> rng = np.random.RandomState(1)
>>> proc = build_process("bernoulli", np.array([0.05, 0.1, 0.3, 0.9]), rng)
>>> [proc.available(t).tolist() for t in range(3)]
[[3], [3], [3]]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from fedagg.errors import ConfigError
from fedagg.registry import REQUIRED, Param, Registry
from fedagg.rng import derive_seed

RandomStream = np.random.RandomState | np.random.Generator

__all__ = [
    "PROBABILITIES",
    "PROCESSES",
    "AlwaysProcess",
    "AvailabilityProcess",
    "BernoulliProcess",
    "CyclicProcess",
    "MarkovProcess",
    "build_probabilities",
    "build_process",
    "constant_probabilities",
    "explicit_probabilities",
    "heterogeneous_probabilities",
    "participation_rng",
    "probability_kinds",
    "process_names",
]


# --------------------------------------------------------------------------------------------
# random streams
# --------------------------------------------------------------------------------------------


def participation_rng(seed: int, *keys: int | str) -> np.random.RandomState:
    """A legacy ``RandomState`` for the participation stream of run ``seed``.

    The stream is ``MT19937`` seeded from ``derive_seed(seed, "participation", *keys)`` and wrapped
    in ``RandomState`` so that the legacy distributions (the ones the reference uses) apply. To
    reproduce a reference trace exactly, pass ``np.random.RandomState(s)`` to the consumers instead.

    Example
    -------
    >>> a = participation_rng(0).random_sample()
    >>> a == participation_rng(0).random_sample()
    True
    """
    bitgen = np.random.MT19937(derive_seed(seed, "participation", *keys))
    return np.random.RandomState(bitgen)


def _as_random_state(rng: RandomStream) -> np.random.RandomState:
    """``rng`` itself if legacy; otherwise a ``RandomState`` seeded by one draw from ``rng``."""
    if isinstance(rng, np.random.RandomState):
        return rng
    if isinstance(rng, np.random.Generator):
        return np.random.RandomState(np.random.MT19937(int(rng.integers(0, 2**63 - 1))))
    raise TypeError(f"expected np.random.RandomState or Generator, got {type(rng).__name__}")


def _rng_state(rng: np.random.RandomState) -> dict[str, Any]:
    state = rng.get_state(legacy=False)
    inner = state["state"]
    return {
        "bit_generator": state["bit_generator"],
        "state": {"key": np.array(inner["key"], copy=True), "pos": int(inner["pos"])},
        "has_gauss": int(state["has_gauss"]),
        "gauss": float(state["gauss"]),
    }


def _check_p(p: Any, what: str = "p") -> np.ndarray:
    arr = np.array(p, dtype=np.float64, copy=True)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a 1-D array of probabilities, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0) or np.any(arr > 1):
        raise ValueError(f"{what} must lie in [0, 1]")
    arr.setflags(write=False)
    return arr


# --------------------------------------------------------------------------------------------
# availability processes
# --------------------------------------------------------------------------------------------


class AvailabilityProcess:
    """Base class: a per-client availability process for a population of ``N`` clients.

    Parameters
    ----------
    p : (N,) array_like of float in [0, 1]
        Stationary availability probability ``p_n`` of every client (copied, read-only).
    rng : np.random.RandomState or np.random.Generator
        The participation stream. A ``RandomState`` is used as is (and owned by the process from
        now on: :meth:`state_dict` captures and :meth:`load_state_dict` overwrites its state); a
        ``Generator`` is turned into a fresh ``RandomState`` by one draw.
    first_round : int, default 0
        The round number of the first call to :meth:`available` (Flower counts from 1).

    Notes
    -----
    Construction performs the per-client initial draws (client order). Then
    ``available(first_round)``, ``available(first_round + 1)``, ... must be called in this order,
    each round exactly once: a round is one step of the process (one ``sample()`` per client in the
    reference), whether or not anybody is available.
    """

    name: ClassVar[str] = ""

    def __init__(self, p: Any, rng: RandomStream, *, first_round: int = 0) -> None:
        self.p: np.ndarray = _check_p(p)
        self.rng: np.random.RandomState = _as_random_state(rng)
        self.next_round: int = int(first_round)
        self._init_state()

    @property
    def num_clients(self) -> int:
        """``N``, the population size."""
        return int(self.p.shape[0])

    # -- subclass hooks -------------------------------------------------------------------------
    def _init_state(self) -> None:
        """Construction draws (client order)."""

    def _advance(self) -> np.ndarray:
        """One round: ``(N,)`` bool availability mask; consumes the stream in client order."""
        raise NotImplementedError

    def _extra_state(self) -> dict[str, np.ndarray]:
        return {}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        del state

    # -- public API -----------------------------------------------------------------------------
    def available(self, round: int) -> np.ndarray:
        """Ids of the clients available in ``round``: ``{n : 1{n ∈ S_round} = 1}``.

        Parameters
        ----------
        round : int
            Must equal :attr:`next_round` (rounds are consecutive, each requested once).

        Returns
        -------
        (k,) int64 array
            Sorted client ids, ``0 <= id < N``.
        """
        if int(round) != self.next_round:
            raise ValueError(
                f"{self.name}: round {round} requested, expected round {self.next_round} "
                "(rounds must be requested consecutively, each once)"
            )
        mask = self._advance()
        self.next_round += 1
        return np.flatnonzero(mask).astype(np.int64, copy=False)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-exactly: round counter, per-client state, RNG state.

        Returns a dict with keys ``process`` (str), ``num_clients`` (int), ``next_round`` (int),
        ``rng`` (the ``RandomState`` state as a dict with a ``(624,) uint32`` key) and the
        process-specific arrays (``state: (N,) bool`` for markov and cyclic, ``counter: (N,) int64``
        for cyclic). Arrays are copies.
        """
        out: dict[str, Any] = {
            "process": self.name,
            "num_clients": self.num_clients,
            "next_round": self.next_round,
            "rng": _rng_state(self.rng),
        }
        out.update({k: np.array(v, copy=True) for k, v in self._extra_state().items()})
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` of a process of the same kind and population size."""
        if state.get("process") != self.name:
            raise ValueError(f"state is for process {state.get('process')!r}, not {self.name!r}")
        if int(state["num_clients"]) != self.num_clients:
            raise ValueError(
                f"state has {state['num_clients']} clients, this process has {self.num_clients}"
            )
        self._load_extra_state(state)
        rng_state = state["rng"]
        self.rng.set_state(
            {
                "bit_generator": rng_state["bit_generator"],
                "state": {
                    "key": np.array(rng_state["state"]["key"], dtype=np.uint32, copy=True),
                    "pos": int(rng_state["state"]["pos"]),
                },
                "has_gauss": int(rng_state["has_gauss"]),
                "gauss": float(rng_state["gauss"]),
            }
        )
        self.next_round = int(state["next_round"])

    def _check_array(self, state: Mapping[str, Any], key: str, dtype: Any) -> np.ndarray:
        arr = np.array(state[key], dtype=dtype, copy=True)
        if arr.shape != (self.num_clients,):
            raise ValueError(f"state[{key!r}] must have shape ({self.num_clients},)")
        return arr

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_clients={self.num_clients}, next_round={self.next_round})"


PROCESSES: Registry[AvailabilityProcess] = Registry("participation")


class BernoulliProcess(AvailabilityProcess):
    """``1{n ∈ S_t} ~ Bernoulli(p_n)``, independent across rounds and clients.

    Draws: none at construction; each round one ``binomial(1, p_n)`` per client in client order
    (FedAU, arXiv 2306.03401; reference ``bernoulli``).

    Example
    -------
    >>> proc = BernoulliProcess([0.0, 1.0], np.random.RandomState(0))
    >>> proc.available(0).tolist()
    [1]
    """

    name = "bernoulli"

    def _advance(self) -> np.ndarray:
        return self.rng.binomial(1, self.p).astype(bool)


class MarkovProcess(AvailabilityProcess):
    """Two-state Markov availability with stationary probability ``p_n``.

    ``P(off→on) = a``, ``P(on→off) = a(1/p_n − 1)``, so ``π(on) = p_n``. Where
    ``a(1/p_n − 1) > 1`` both are divided by it: ``P(on→off) = 1``, ``P(off→on) = a / (a(1/p_n − 1))``
    (``p_n = 0`` gives ``P(off→on) = 0``). Construction draws the initial state
    ``binomial(1, p_n)`` per client; each round draws one ``binomial`` per client with the
    transition probability of its current state (a 1 flips it) and *then* reads the state
    (FedAU, arXiv 2306.03401; reference ``markov-a``, default ``a = 0.05``).

    Parameters
    ----------
    p, rng, first_round
        See :class:`AvailabilityProcess`.
    a : float in (0, 1], default 0.05
        Off→on transition probability (before renormalisation).

    Example
    -------
    >>> proc = MarkovProcess([1.0, 0.0], np.random.RandomState(0), a=0.05)
    >>> proc.available(0).tolist()
    [0]
    """

    name = "markov"

    def __init__(
        self, p: Any, rng: RandomStream, *, a: float = 0.05, first_round: int = 0
    ) -> None:
        if not 0 < a <= 1:
            raise ValueError(f"a must be in (0, 1], got {a}")
        self.a = float(a)
        super().__init__(p, rng, first_round=first_round)

    def _init_state(self) -> None:
        a = self.a
        with np.errstate(divide="ignore"):
            to_inactive = a * (1.0 / self.p - 1.0)  # p = 0 -> inf
        to_active = np.full_like(self.p, a)
        over = to_inactive > 1
        to_active[over] = a / to_inactive[over]
        to_inactive[over] = 1.0
        self.to_active: np.ndarray = to_active
        self.to_inactive: np.ndarray = to_inactive
        self.state: np.ndarray = self.rng.binomial(1, self.p).astype(bool)

    def _advance(self) -> np.ndarray:
        prob = np.where(self.state, self.to_inactive, self.to_active)
        flip = self.rng.binomial(1, prob).astype(bool)
        self.state ^= flip
        return self.state.copy()

    def _extra_state(self) -> dict[str, np.ndarray]:
        return {"state": self.state}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.state = self._check_array(state, "state", bool)


class CyclicProcess(AvailabilityProcess):
    """Deterministic on/off cycles of period about ``L`` with a random phase.

    Client ``n`` is on for ``A_n = max(1, round(L·p_n))`` rounds (round half to even), then off for
    ``B_n = max(1, L − A_n)`` rounds. It starts off with ``counter_n = randint(B_n)`` (one draw per
    client, client order; ``randint(1)`` consumes nothing). Each round, without drawing: if
    ``counter_n == 0`` toggle the state and set ``counter_n`` to ``A_n`` (now on) or ``B_n`` (now
    off); then ``counter_n −= 1`` and read the state. The long-run rate is ``A_n / (A_n + B_n)``,
    which differs from ``p_n`` at small ``L`` (``L = 10, p = 0.05`` gives 0.1)
    (FedAU, arXiv 2306.03401; reference ``cyclic-L``, default ``L = 100``).

    Parameters
    ----------
    p, rng, first_round
        See :class:`AvailabilityProcess`.
    period : int >= 1, default 100
        ``L``.

    Example
    -------
    >>> proc = CyclicProcess([0.9], np.random.RandomState(0), period=10)
    >>> "".join(str(len(proc.available(t))) for t in range(12))
    '111111111011'
    """

    name = "cyclic"

    def __init__(
        self, p: Any, rng: RandomStream, *, period: int = 100, first_round: int = 0
    ) -> None:
        if int(period) != period or period < 1:
            raise ValueError(f"period must be an integer >= 1, got {period}")
        self.period = int(period)
        super().__init__(p, rng, first_round=first_round)

    def _init_state(self) -> None:
        L = self.period
        self.active_len: np.ndarray = np.maximum(1, np.round(L * self.p)).astype(np.int64)
        self.inactive_len: np.ndarray = np.maximum(1, L - self.active_len).astype(np.int64)
        self.state: np.ndarray = np.zeros(self.num_clients, dtype=bool)
        self.counter: np.ndarray = np.asarray(
            self.rng.randint(self.inactive_len), dtype=np.int64
        ).reshape(self.num_clients)

    def _advance(self) -> np.ndarray:
        zero = self.counter == 0
        self.state[zero] = ~self.state[zero]
        self.counter[zero] = np.where(
            self.state[zero], self.active_len[zero], self.inactive_len[zero]
        )
        self.counter -= 1
        return self.state.copy()

    def _extra_state(self) -> dict[str, np.ndarray]:
        return {"state": self.state, "counter": self.counter}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.state = self._check_array(state, "state", bool)
        self.counter = self._check_array(state, "counter", np.int64)


class AlwaysProcess(AvailabilityProcess):
    """Every client is available in every round (``p_n`` is ignored); no draws.

    Example
    -------
    >>> AlwaysProcess(np.zeros(3), np.random.RandomState(0)).available(0).tolist()
    [0, 1, 2]
    """

    name = "always"

    def _advance(self) -> np.ndarray:
        return np.ones(self.num_clients, dtype=bool)


PROCESSES.add("bernoulli", BernoulliProcess, doc="Independent Bernoulli(p_n) each round.")
PROCESSES.add(
    "markov",
    MarkovProcess,
    params=[
        Param("a", float, 0.05, "off→on transition probability", low=0.0, low_open=True, high=1.0),
    ],
    doc="Two-state Markov chain with stationary probability p_n (P(off→on)=a).",
)
PROCESSES.add(
    "cyclic",
    CyclicProcess,
    params=[Param("period", int, 100, "cycle length L (on round(L·p_n), off the rest)", low=1)],
    doc="On for max(1, round(L·p_n)) rounds, off for max(1, L − that), random phase.",
)
PROCESSES.add("always", AlwaysProcess, doc="Every client in every round.")


def process_names() -> list[str]:
    """Registered availability processes, sorted."""
    return PROCESSES.names()


def build_process(
    name: str,
    p: Any,
    rng: RandomStream,
    *,
    first_round: int = 0,
    field: str = "participation",
    **params: Any,
) -> AvailabilityProcess:
    """Build the availability process ``name`` for probabilities ``p: (N,)``.

    ``params`` are validated against the declaration in :data:`PROCESSES` (a typo or an
    out-of-range value raises :class:`~fedagg.errors.ConfigError` naming ``field``).

    Example
    -------
    >>> proc = build_process("cyclic", [0.5, 0.5], np.random.RandomState(0), period=4)
    >>> proc.num_clients
    2
    """
    entry = PROCESSES.entry(name, field=field)
    kwargs = entry.resolve(params, where=f"{field}.{name}" if field else name)
    return entry.factory(p, rng, first_round=first_round, **kwargs)


# --------------------------------------------------------------------------------------------
# participation probabilities
# --------------------------------------------------------------------------------------------


def heterogeneous_probabilities(
    histograms: np.ndarray,
    rng: RandomStream,
    alpha: float = 0.1,
    mean: float = 0.1,
    floor: float = 0.02,
) -> np.ndarray:
    """Participation probabilities correlated with each client's label mix (FedAU §2.1).

    One draw ``m ~ Dir(α·1_C)`` (``rng.dirichlet(α·1_C, size=1)``), then

        ``p_n = min(1, max(floor, C · mean · Σ_c π_{n,c} m_c))``

    where ``π_n = histograms[n]`` are the client's label fractions. ``E[C·Σ_c π_{n,c} m_c] = 1``
    when ``π_n`` sums to 1, so the mean before clipping is about ``mean``. The upper clip at 1 is
    ours; the reference would fail on such values (Wang & Ji, arXiv 2306.03401; IBM/fedau
    ``data_participation_each_node``). Called right after the Dirichlet partition on the same
    ``RandomState`` this reproduces the reference exactly.

    Parameters
    ----------
    histograms : (N, C) array of float
        Label fractions per client (rows of empty clients are 0, giving ``floor``).
    rng : np.random.RandomState or np.random.Generator
        One ``dirichlet`` call is consumed.
    alpha, mean, floor : float
        ``α_p > 0``, target mean in (0, 1], lower bound in [0, 1].

    Returns
    -------
    (N,) float64 array in [floor, 1].

    Example
    -------
    >>> hist = np.eye(2)[[0, 0, 1]]
    >>> heterogeneous_probabilities(hist, np.random.RandomState(0), mean=0.3).round(3).tolist()
    [0.169, 0.169, 0.431]
    """
    hist = np.asarray(histograms, dtype=np.float64)
    if hist.ndim != 2:
        raise ValueError(f"histograms must be (N, C), got shape {hist.shape}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    num_classes = hist.shape[1]
    m = rng.dirichlet(alpha * np.ones(num_classes), size=1)[0]  # (C,)
    p = np.maximum(floor, num_classes * mean * (hist @ m))
    return np.minimum(p, 1.0)


def constant_probabilities(num_clients: int, p: float) -> np.ndarray:
    """``p_n = p`` for every client: ``(N,)`` float64.

    Example
    -------
    >>> constant_probabilities(3, 0.1).tolist()
    [0.1, 0.1, 0.1]
    """
    if not 0 <= p <= 1:
        raise ValueError(f"p must be in [0, 1], got {p}")
    return np.full(int(num_clients), float(p))


def explicit_probabilities(num_clients: int, p: Sequence[float]) -> np.ndarray:
    """The given ``p_n`` (length ``N``, each in [0, 1]) as a ``(N,)`` float64 array.

    Example
    -------
    >>> explicit_probabilities(2, [0.5, 1]).tolist()
    [0.5, 1.0]
    """
    arr = _check_p(p)
    if arr.shape[0] != num_clients:
        raise ValueError(f"expected {num_clients} probabilities, got {arr.shape[0]}")
    return np.array(arr)


def _spec_heterogeneous(
    num_clients: int,
    histograms: np.ndarray | None,
    rng: RandomStream | None,
    *,
    alpha: float,
    mean: float,
    floor: float,
) -> np.ndarray:
    if histograms is None or rng is None:
        raise ValueError("'heterogeneous' probabilities need the label histograms and an rng")
    if np.shape(histograms)[0] != num_clients:
        raise ValueError(f"histograms have {np.shape(histograms)[0]} rows, expected {num_clients}")
    return heterogeneous_probabilities(histograms, rng, alpha=alpha, mean=mean, floor=floor)


def _spec_constant(
    num_clients: int, histograms: np.ndarray | None, rng: RandomStream | None, *, p: float
) -> np.ndarray:
    del histograms, rng
    return constant_probabilities(num_clients, p)


def _spec_explicit(
    num_clients: int, histograms: np.ndarray | None, rng: RandomStream | None, *, p: list
) -> np.ndarray:
    del histograms, rng
    return explicit_probabilities(num_clients, p)


PROBABILITIES: Registry[np.ndarray] = Registry("participation probabilities")
PROBABILITIES.add(
    "heterogeneous",
    _spec_heterogeneous,
    params=[
        Param("alpha", float, 0.1, "Dirichlet concentration α_p of the class weights m",
              low=0.0, low_open=True),
        Param("mean", float, 0.1, "target mean of p_n before clipping", low=0.0, low_open=True,
              high=1.0),
        Param("floor", float, 0.02, "lower bound p_min on every p_n", low=0.0, high=1.0),
    ],
    doc="p_n = max(floor, C·mean·Σ_c π_{n,c} m_c), m ~ Dir(α·1_C) (FedAU, label-correlated).",
)
PROBABILITIES.add(
    "constant",
    _spec_constant,
    params=[Param("p", float, REQUIRED, "the probability of every client", low=0.0, high=1.0)],
    doc="p_n = p for every client.",
)
PROBABILITIES.add(
    "explicit",
    _spec_explicit,
    params=[Param("p", list, REQUIRED, "one probability per client, each in [0, 1]")],
    doc="p_n given one per client.",
)


def probability_kinds() -> list[str]:
    """Registered kinds of probability specs, sorted."""
    return PROBABILITIES.names()


def build_probabilities(
    spec: Mapping[str, Any],
    num_clients: int,
    *,
    histograms: np.ndarray | None = None,
    rng: RandomStream | None = None,
    field: str = "participation.probabilities",
) -> np.ndarray:
    """``p: (N,)`` float64 from a spec ``{"kind": <name>, **params}``.

    Kinds: ``heterogeneous`` (``alpha``, ``mean``, ``floor``; needs ``histograms: (N, C)`` and
    ``rng``), ``constant`` (``p``), ``explicit`` (``p``: list of ``N`` values). Bad specs raise
    :class:`~fedagg.errors.ConfigError` naming ``field`` and the offending key.

    Example
    -------
    >>> build_probabilities({"kind": "constant", "p": 0.25}, 2).tolist()
    [0.25, 0.25]
    """
    if not isinstance(spec, Mapping):
        raise ConfigError(field, f"expected a mapping with a 'kind' key, got {spec!r}")
    if "kind" not in spec:
        raise ConfigError(
            f"{field}.kind", f"required; allowed: {', '.join(PROBABILITIES.names())}"
        )
    kind = spec["kind"]
    entry = PROBABILITIES.entry(kind, field=f"{field}.kind")
    params = {k: v for k, v in spec.items() if k != "kind"}
    kwargs = entry.resolve(params, where=field)
    if kind == "explicit":
        values = kwargs["p"]
        if len(values) != num_clients:
            raise ConfigError(f"{field}.p", f"expected {num_clients} values, got {len(values)}")
        try:
            arr = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            raise ConfigError(f"{field}.p", f"expected numbers, got {values!r}") from None
        if arr.ndim != 1 or not np.all(np.isfinite(arr)) or np.any((arr < 0) | (arr > 1)):
            raise ConfigError(f"{field}.p", "every value must be a number in [0, 1]")
    return entry.factory(num_clients, histograms, rng, **kwargs)
