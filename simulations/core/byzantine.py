"""Byzantine clients in the runner: who they are, and what they send.

Byzantine behaviour is a property of the environment (``../shared/design.md``): strategies never
know who is Byzantine. Two mechanisms, both configured by the run's ``attack``, ``attack_args`` and
``num_byzantine`` keys (``--attack alie --num-byzantine 3``):

- **Model-update attacks** (every :mod:`fedagg.attacks` attack except data attacks) run in the
  environment's ``corrupt(round, replies, broadcast)`` hook (:class:`Corruption`, built by
  :func:`build_corruption`), after the round's replies arrived and before the strategy sees them.
  Updates are deltas ``Δ = local − global`` against the broadcast model. The Byzantine clients
  train honestly first; their honest deltas are the attack's ``own`` argument. An *omniscient*
  attack (``attack.omniscient``: ALIE, IPM, min-max, sign flip ``flavour=mean``, ...) also sees the
  honest deltas of the round, i.e. the replies of the other clients that actually arrived
  (failed or non-finite replies excluded; if none arrived, the attackers' own deltas stand in).
  A non-omniscient attack gets only ``own`` and an all-zero ``(h, d)`` stand-in for the honest
  deltas (their number h is all it learns). The attack returns one delta per Byzantine reply; the reply's ArrayRecord is replaced by
  ``global + Δ_byz`` (cast to the model's dtypes), everything else in the reply is kept.
  Randomness: ``fedagg.rng.numpy_rng(seed, "attack", round)``.
- **Data attacks** (``labelflip``) run inside the Byzantine clients: :func:`data_attack` returns
  the labels a client trains on (``y' = (C − 1) − y`` for Byzantine clients, unchanged otherwise).

Which clients are Byzantine is deterministic from the seed (:func:`byzantine_ids`): the first
``f`` clients of a permutation drawn from ``numpy_rng(seed, "byzantine")``, so for one seed the
Byzantine set of ``f`` is contained in that of ``f + 1``. The hook records how many replies of each
round came from Byzantine clients (``counts``); the runner writes it as the ``byzantine`` column of
``metrics.csv``.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Message, RecordDict

from fedagg import attacks
from fedagg.errors import ConfigError
from fedagg.rng import numpy_rng
from simulations.core.config import RunConfig
from strategies.arrays import Layout, to_numpy, to_record

log = logging.getLogger("fedagg")

#: The ArrayRecord of a train message that holds the model (Flower's default key).
ARRAYS_KEY = "arrays"


def byzantine_ids(seed: int, num_clients: int, f: int) -> list[int]:
    """The ``f`` Byzantine client ids of a run, sorted; deterministic from ``seed``.

    The first ``f`` entries of a permutation of ``range(num_clients)`` drawn from
    ``numpy_rng(seed, "byzantine")`` (nested in ``f`` for a fixed seed).

    >>> byzantine_ids(0, 15, 3) == byzantine_ids(0, 15, 3)
    True
    >>> set(byzantine_ids(0, 15, 2)) <= set(byzantine_ids(0, 15, 3))
    True
    """
    if not 0 <= f <= num_clients:
        raise ValueError(f"byzantine_ids: need 0 <= f <= num_clients, got f={f}, N={num_clients}")
    perm = numpy_rng(int(seed), "byzantine").permutation(int(num_clients))
    return sorted(int(c) for c in perm[:f])


def build_attack(cfg: RunConfig) -> attacks.Attack | None:
    """The run's attack object (None without ``attack``); ConfigError names ``attack``/``attack_args``."""
    if cfg.attack is None:
        return None
    entry = attacks.REGISTRY.entry(cfg.attack, field="attack")
    params = entry.resolve(cfg.attack_args, where="attack_args")
    try:
        return entry.factory(**params)
    except ConfigError as exc:  # e.g. alie.z -> attack_args.z
        raise ConfigError(f"attack_args.{exc.field.rsplit('.', 1)[-1]}", exc.message) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError("attack_args", str(exc)) from None


def validate_attack(cfg: RunConfig) -> None:
    """Config-time checks of ``attack``/``attack_args``/``num_byzantine`` (ConfigError, exit 2)."""
    attack = build_attack(cfg)
    f, n = cfg.num_byzantine, cfg.num_clients
    if attack is None or f == 0 or attack.data_attack:
        return
    rng = np.random.default_rng(0)
    try:  # a dry run on a full round of random deltas catches infeasible settings early
        attack(rng.normal(size=(n - f, 4)), f, np.random.default_rng(0), own=rng.normal(size=(f, 4)))
    except ConfigError as exc:
        raise ConfigError(f"attack_args.{exc.field.rsplit('.', 1)[-1]}", exc.message) from None
    except ValueError as exc:
        raise ConfigError("attack_args", f"{attack.summary()} cannot run with num_byzantine={f}, "
                          f"num_clients={n}: {exc}") from None


class Corruption:
    """The ``corrupt(round, replies, broadcast) -> replies`` hook of a run with an attack.

    Attributes: ``attack`` (:class:`fedagg.attacks.Attack`), ``ids`` (Byzantine client ids, a
    frozenset), ``seed``, ``counts`` (``{round: Byzantine replies that round}``).
    """

    def __init__(self, attack: attacks.Attack, ids: list[int], seed: int) -> None:
        self.attack = attack
        self.ids = frozenset(ids)
        self.seed = int(seed)
        self.counts: dict[int, int] = {}

    def __call__(self, server_round: int, replies: list[Message],
                 broadcast: RecordDict | None) -> list[Message]:
        # sorted by client id: the attack's input does not depend on the order replies arrived in
        ordered = sorted(replies, key=lambda m: int(m.metadata.src_node_id))
        byz = [m for m in ordered if not m.has_error() and int(m.metadata.src_node_id) in self.ids]
        self.counts[server_round] = len(byz)
        if not byz or self.attack.data_attack or broadcast is None:
            return replies
        key = ARRAYS_KEY if ARRAYS_KEY in broadcast.array_records else next(
            iter(broadcast.array_records), None)
        if key is None:
            return replies
        global_arrays = to_numpy(broadcast.array_records[key])
        layout = Layout.of(global_arrays)
        g = layout.flatten(global_arrays)

        def delta(msg: Message) -> np.ndarray | None:
            rec = msg.content.array_records.get(key)
            if rec is None:
                return None
            local = to_numpy(rec)
            if layout.mismatch(local) is not None:
                return None
            d = layout.flatten(local) - g
            return d if np.all(np.isfinite(d)) else None

        own_list = [(m, delta(m)) for m in byz]
        own_list = [(m, d) for m, d in own_list if d is not None]
        if not own_list:
            return replies
        own = np.stack([d for _, d in own_list])
        f = own.shape[0]
        honest_list = [delta(m) for m in ordered
                       if not m.has_error() and int(m.metadata.src_node_id) not in self.ids]
        honest_list = [d for d in honest_list if d is not None]
        if not honest_list:
            honest = own
        elif self.attack.omniscient:
            honest = np.stack(honest_list)
        else:  # shape only (h, d): a non-omniscient attack knows how many honest clients replied
            honest = np.broadcast_to(np.zeros(1), (len(honest_list), own.shape[1]))
        try:
            bad = np.asarray(self.attack(honest, f, numpy_rng(self.seed, "attack", server_round),
                                         own=own), dtype=np.float64)
        except ValueError as exc:
            log.warning("round %d: attack %s could not run on %d Byzantine and %d honest updates "
                        "(%s); Byzantine replies left honest", server_round, self.attack.summary(),
                        f, len(honest), exc)
            return replies
        with np.errstate(over="ignore", invalid="ignore"):
            for (msg, _), d in zip(own_list, bad, strict=True):
                new = layout.unflatten(g + d)
                content = RecordDict({k: v for k, v in msg.content.items() if k != key})
                content[key] = to_record(new)
                msg.content = content
        return replies


def build_corruption(cfg: RunConfig) -> Corruption | None:
    """The ``corrupt`` hook for ``cfg`` (None without an attack); see :class:`Corruption`."""
    attack = build_attack(cfg)
    if attack is None:
        return None
    ids = byzantine_ids(cfg.seed, cfg.num_clients, cfg.num_byzantine)
    return Corruption(attack, ids, cfg.seed)


def data_attack(cfg: RunConfig, cid: int, y: np.ndarray,
                num_classes: int | None = None) -> np.ndarray:
    """Labels client ``cid`` trains on: flipped (``(C − 1) − y``) for a Byzantine client of a
    run whose attack is a data attack (``labelflip``), unchanged otherwise.

    ``num_classes`` is the dataset's class count C (the attack's ``num_classes`` argument
    overrides it).
    """
    if cfg.attack is None or cfg.num_byzantine == 0:
        return y
    attack = build_attack(cfg)
    if attack is None or not attack.data_attack:
        return y
    if cid not in byzantine_ids(cfg.seed, cfg.num_clients, cfg.num_byzantine):
        return y
    return attack.labels(y, num_classes)  # type: ignore[attr-defined, no-any-return]
