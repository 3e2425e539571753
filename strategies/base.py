"""What every fedagg strategy shares, as a mixin over Flower's Message-API strategies.

- **Seeded selection.** Each round the strategy trains ``clients_per_round`` clients drawn, with a
  generator keyed by ``(seed, "select", round)``, from the nodes the grid reports as available
  (``None`` = all of them, as FedAU and its baselines need). Availability is the environment's
  business: the grid's ``get_node_ids()`` returns only the clients that can take part this round.
- **Deterministic reply order.** Replies are sorted by node id before aggregation, so float sums do
  not depend on which client finished first.
- **One validation step** (:func:`screen_replies`): error replies are counted as failures; replies
  whose arrays do not match the broadcast model's names/shapes, are not floating point, contain
  NaN/Inf, whose update norm ``‖local − global‖`` exceeds ``max_update_norm``, or is absurd
  (> :data:`ABSURD_UPDATE_RATIO` × (‖global‖ + 1)) are rejected and logged with the client id. Only the rest reach the aggregation rule, so a non-finite update can
  never reach the global model.
- **Checkpointable state.** ``state_dict() -> dict[str, np.ndarray]`` / ``load_state_dict``.

:class:`DeltaStrategy` adds the delta convention used by all of our own rules: a client update is
``Δ_k = local_k − global`` (clients reply with their local model, like every Flower ClientApp; the
strategy subtracts the model it broadcast), the rule maps the ``(n, d)`` matrix of deltas to one
``(d,)`` aggregate, and the server applies ``global += server_lr · aggregate`` — or, with the
server optimiser on, a heavy-ball step on the aggregate (:class:`DeltaStrategy`, "Server optimiser").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from fedagg.errors import ConfigError
from fedagg.rng import numpy_rng
from strategies.arrays import Layout, metric_records, to_numpy, to_record, to_views

#: Updates with ``‖Δ‖ > ABSURD_UPDATE_RATIO · (‖global‖ + 1)`` are rejected whatever the strategy:
#: no honest client moves a model a thousand times its own size in one round.
ABSURD_UPDATE_RATIO = 1e3

#: Metric keys that are bookkeeping, not quantities to average.
NON_METRIC_KEYS = frozenset({"num-examples", "client-id"})


class _SelectedNodes(Grid):
    """A view of ``grid`` whose ``get_node_ids()`` is a fixed selection."""

    def __init__(self, grid: Grid, node_ids: Sequence[int]) -> None:
        self._grid = grid
        self._ids = list(node_ids)

    def set_run(self, run: Any) -> None:  # pragma: no cover - delegation
        self._grid.set_run(run)

    @property
    def run(self) -> Any:  # pragma: no cover - delegation
        return self._grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:  # pragma: no cover
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # pragma: no cover
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # pragma: no cover
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:  # pragma: no cover
        return self._grid.send_and_receive(messages, timeout=timeout)


class _RoundRows:
    """One round's screened replies as rows of an ``(n, d)`` float64 matrix of deltas from the
    broadcast model. Screening flattens each reply into one scratch vector (reused, so it stays in
    cache), checks it and writes its delta into the next row; the aggregation then reads the rows of
    the accepted replies instead of flattening and stacking ``n`` vectors again. Fresh every round
    (a rule may keep views of the deltas it was given)."""

    def __init__(self, n: int, layout: Layout, global_flat: np.ndarray) -> None:
        self.layout, self.global_flat = layout, global_flat
        self.global_norm = _norm(global_flat)
        self.scratch = np.empty(layout.dim)
        self.deltas: np.ndarray | None = np.empty((n, layout.dim))
        self.row: dict[int, int] = {}  # id(ArrayRecord) -> row of its delta

    def flat(self, local: dict[str, np.ndarray]) -> np.ndarray:
        """``layout.flatten(local)`` in the scratch vector (valid until the next call)."""
        return self.layout.flatten(local, out=self.scratch)

    def delta(self, record: ArrayRecord, vector: np.ndarray) -> np.ndarray:
        """``vector − global_flat`` (``vector``: ``record``'s flat model), kept in the next row."""
        if self.deltas is None or len(self.row) >= len(self.deltas):
            return vector - self.global_flat
        self.row[id(record)] = i = len(self.row)
        return np.subtract(vector, self.global_flat, out=self.deltas[i])

    def take_deltas(self, records: list[ArrayRecord], global_flat: np.ndarray) -> np.ndarray | None:
        """The ``(len(records), d)`` deltas of ``records`` (in order) if screening computed them all
        against ``global_flat``, else None. Handed out once (the caller may write into them)."""
        if self.deltas is None or global_flat is not self.global_flat:
            return None
        rows = [self.row.get(id(r), -1) for r in records]
        if not rows or min(rows) < 0:
            return None
        deltas, self.deltas = self.deltas, None
        if rows == list(range(len(rows))):
            return deltas[: len(rows)]
        return deltas[rows]


@dataclasses.dataclass
class ScreenReport:
    """Outcome of the validation step for one round."""

    accepted: list[Message]
    failures: int = 0
    rejected: int = 0
    rejected_ids: list[int] = dataclasses.field(default_factory=list)

    def metrics(self) -> dict[str, int]:
        return {"clients": len(self.accepted), "failures": self.failures, "rejected": self.rejected}


def _norm(v: np.ndarray) -> float:
    """‖v‖₂ of a vector without BLAS: ``np.linalg.norm`` goes through a threaded BLAS dot whose
    threads can stall for milliseconds when the cores are busy with local training."""
    return float(np.sqrt(np.einsum("i,i->", v, v)))


def update_problem(
    local: dict[str, np.ndarray], layout: Layout, global_flat: np.ndarray | None,
    max_update_norm: float | None, *, flat: Callable[[], np.ndarray] | None = None,
    delta: Callable[[np.ndarray], np.ndarray] | None = None, global_norm: float | None = None,
) -> str | None:
    """Why a client's local model is unusable (names/shapes, dtype, non-finite, norm), or None.
    ``flat()``: ``layout.flatten(local)`` from the caller's cache (called once names and shapes
    are known to match); ``delta(vector)``: ``vector − global_flat``, where the caller wants it
    kept (e.g. as a row of the round's delta matrix); ``global_norm``: ``‖global_flat‖`` if the
    caller has it (one per round, not one per reply)."""
    why = layout.mismatch(local)
    if why is not None:
        return why
    for name, arr in local.items():
        if np.asarray(arr).dtype.kind != "f":  # numpy's floating types (np.issubdtype(…, np.floating))
            return f"tensor {name!r} has dtype {np.asarray(arr).dtype}, expected floating point"
    vector = layout.flatten(local) if flat is None else flat()
    if not np.isfinite(vector).all():
        bad = next(n for n, a in local.items() if not np.all(np.isfinite(a)))
        return f"tensor {bad!r} contains NaN or Inf"
    if global_flat is not None:
        norm = _norm(vector - global_flat if delta is None else delta(vector))
        if max_update_norm is not None and not norm <= max_update_norm:
            return f"update norm {norm:.3g} exceeds max_update_norm={max_update_norm:.3g}"
        limit = ABSURD_UPDATE_RATIO * ((_norm(global_flat) if global_norm is None else global_norm) + 1.0)
        if not norm <= limit:
            return f"absurd update norm {norm:.3g} (> {ABSURD_UPDATE_RATIO:g} × (‖global‖ + 1))"
    return None


def reply_client_id(msg: Message) -> int:
    """The client id of a reply (its source node id)."""
    return int(msg.metadata.src_node_id)


def reply_num_examples(msg: Message) -> float:
    """``num-examples`` from the reply's (first) MetricRecord; 0 if absent."""
    for rec in metric_records(msg.content):
        if "num-examples" in rec:
            return float(rec["num-examples"])  # type: ignore[arg-type]
    return 0.0


def mean_metrics(replies: Sequence[Message]) -> dict[str, float]:
    """Example-weighted mean of every scalar metric the replies report (NaN values skipped)."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for msg in replies:
        w = max(reply_num_examples(msg), 0.0) or 1.0
        for rec in metric_records(msg.content):
            for key, val in rec.items():
                if key in NON_METRIC_KEYS or isinstance(val, list):
                    continue
                v = float(val)  # type: ignore[arg-type]
                if math.isfinite(v):
                    sums[key] = sums.get(key, 0.0) + w * v
                    weights[key] = weights.get(key, 0.0) + w
    return {k: sums[k] / weights[k] for k in sums if weights[k] > 0}


class FedaggStrategy:
    """Mixin for Flower strategies (put it first in the bases): see the module docstring.

    Parameters
    ----------
    clients_per_round : int or None (default: None)
        Clients trained per round, drawn among the available ones; None trains all available.
    seed : int (default: 0)
        Seed of the selection stream.
    min_replies : int (default: 1)
        Fewer accepted replies than this leave the global model unchanged for the round.
    max_update_norm : float or None (default: None)
        Reject updates with ``‖local − global‖₂`` above this (None: no norm bound).
    """

    arrayrecord_key: str
    configrecord_key: str

    def __init__(self, *, clients_per_round: int | None = None, seed: int = 0, min_replies: int = 1,
                 max_update_norm: float | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("fraction_train", 1.0)
        kwargs.setdefault("min_train_nodes", 1)
        kwargs.setdefault("min_available_nodes", 1)
        evaluate_fraction = kwargs.pop("fraction_evaluate", 0.0)
        super().__init__(**kwargs)  # type: ignore[call-arg]
        # Federated evaluation is off unless asked for (set after Flower's __init__, which warns
        # about a zero fraction); the server evaluates the global model on its own test set.
        self.fraction_evaluate = evaluate_fraction
        if evaluate_fraction == 0.0:
            self.min_evaluate_nodes = 0
        self.clients_per_round = clients_per_round
        self.seed = seed
        self.min_replies = min_replies
        self.max_update_norm = max_update_norm
        self.current_global: ArrayRecord | None = None
        self.last_report: ScreenReport | None = None
        self._decoded: dict[int, tuple[ArrayRecord, dict[str, np.ndarray]]] = {}
        self._views: dict[int, tuple[ArrayRecord, dict[str, np.ndarray]]] = {}
        self._flat: dict[int, tuple[ArrayRecord, np.ndarray]] = {}
        self._rows: _RoundRows | None = None

    def flat(self, record: ArrayRecord, layout: Layout) -> np.ndarray:
        """``layout.flatten(self.decoded(record))`` (float64), computed once per round."""
        hit = self._flat.get(id(record))
        if hit is None or hit[0] is not record:
            hit = (record, layout.flatten(self.views(record)))
            self._flat[id(record)] = hit
        return hit[1]

    def decoded(self, record: ArrayRecord) -> dict[str, np.ndarray]:
        """``to_numpy(record)``, decoded once per round (Flower's ``Array.numpy()`` parses bytes)."""
        hit = self._decoded.get(id(record))
        if hit is None or hit[0] is not record:
            hit = (record, to_numpy(record))
            self._decoded[id(record)] = hit
        return hit[1]

    def views(self, record: ArrayRecord) -> dict[str, np.ndarray]:
        """:meth:`decoded` without the copies: read-only views of the record's bytes, once per
        round (for checks that only read; :meth:`decoded` gives writable arrays)."""
        hit = self._decoded.get(id(record)) or self._views.get(id(record))
        if hit is None or hit[0] is not record:
            hit = (record, to_views(record))
            self._views[id(record)] = hit
        return hit[1]

    # ------------------------------------------------------------------ selection
    def select_clients(self, server_round: int, grid: Grid) -> list[int]:
        """Sorted node ids to train this round (seeded draw among the available nodes)."""
        available = sorted(int(n) for n in grid.get_node_ids())
        k = self.clients_per_round
        if k is None or k >= len(available):
            return available
        rng = numpy_rng(self.seed, "select", server_round)
        return sorted(int(i) for i in rng.choice(available, size=k, replace=False))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.current_global = arrays
        self._decoded, self._views, self._flat, self._rows = {}, {}, {}, None
        selected = self.select_clients(server_round, grid)
        if not selected:
            log(INFO, "configure_train: no client available in round %d", server_round)
            return []
        return super().configure_train(  # type: ignore[misc]
            server_round, arrays, config, _SelectedNodes(grid, selected)
        )

    # ------------------------------------------------------------------ validation
    def screen_replies(self, server_round: int, replies: Iterable[Message]) -> ScreenReport:
        """Sort replies by node id, drop failed ones, reject unusable updates (logged)."""
        ordered = sorted(replies, key=lambda m: int(m.metadata.src_node_id))
        report = ScreenReport(accepted=[])
        layout = Layout.of(self.current_global) if self.current_global is not None else None
        global_flat = None
        if layout is not None:
            global_flat = self.flat(self.current_global, layout)  # type: ignore[arg-type]
            self._rows = _RoundRows(len(ordered), layout, global_flat)
        for msg in ordered:
            cid = reply_client_id(msg)
            if msg.has_error():
                report.failures += 1
                log(WARNING, "round %d: client %d failed: %s", server_round, cid, msg.error.reason)
                continue
            why = self.reply_problem(msg, layout, global_flat)
            if why is not None:
                report.rejected += 1
                report.rejected_ids.append(cid)
                log(WARNING, "round %d: rejected update from client %d: %s", server_round, cid, why)
                continue
            report.accepted.append(msg)
        return report

    def reply_problem(self, msg: Message, layout: Layout | None,
                      global_flat: np.ndarray | None) -> str | None:
        """Why reply ``msg`` cannot be aggregated, or None. Override to check extra records."""
        content = msg.content
        record = content.get(self.arrayrecord_key)
        if not isinstance(record, ArrayRecord):
            return f"no ArrayRecord under {self.arrayrecord_key!r}"
        if len(metric_records(content)) != 1:
            return "expected exactly one MetricRecord"
        if layout is None:
            return None
        try:
            local = self.views(record)
        except Exception as exc:  # malformed bytes
            return f"unreadable arrays ({exc})"
        rows = self._rows
        if rows is not None and global_flat is rows.global_flat and layout == rows.layout:
            # the round's delta matrix (see _RoundRows): no flat vector kept per reply
            return update_problem(local, layout, global_flat, self.max_update_norm,
                                  flat=lambda: rows.flat(local), global_norm=rows.global_norm,
                                  delta=lambda vector: rows.delta(record, vector))
        return update_problem(local, layout, global_flat, self.max_update_norm,
                              flat=lambda: self.flat(record, layout))

    # ------------------------------------------------------------------ aggregation
    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        report = self.screen_replies(server_round, replies)
        self.last_report = report
        if len(report.accepted) < max(self.min_replies, 1):
            log(WARNING, "round %d: %d usable replies (< min_replies=%d); global model kept",
                server_round, len(report.accepted), self.min_replies)
            return None, MetricRecord(report.metrics())
        arrays, metrics = self.aggregate_accepted(server_round, report.accepted)
        out = MetricRecord(dict(metrics.items()) if metrics is not None else {})
        for k, v in report.metrics().items():
            out[k] = v
        return arrays, out

    def aggregate_accepted(self, server_round: int, replies: list[Message]
                           ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate validated replies; default: the wrapped Flower strategy's rule."""
        arrays, _ = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        return arrays, MetricRecord(mean_metrics(replies))

    # ------------------------------------------------------------------ state
    #: Attributes holding server-side optimiser state as a dict or list of arrays (or None);
    #: saved by the default :meth:`state_dict` (Flower's FedOpt ``m_t``/``v_t``, FedAvgM's momentum).
    state_attributes: tuple[str, ...] = ()

    def state_dict(self) -> dict[str, np.ndarray]:
        """Strategy state to checkpoint: a flat dict of numpy arrays (keys ``attr/name``)."""
        out: dict[str, np.ndarray] = {}
        for attr in self.state_attributes:
            value = getattr(self, attr, None)
            if isinstance(value, dict):
                out.update({f"{attr}/{k}": np.asarray(v).copy() for k, v in value.items()})
            elif isinstance(value, (list, tuple)):
                out.update({f"{attr}/#{i}": np.asarray(v).copy() for i, v in enumerate(value)})
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore :meth:`state_dict` output (unknown keys are an error)."""
        grouped: dict[str, dict[str, np.ndarray]] = {}
        for key, value in state.items():
            attr, _, name = key.partition("/")
            if attr not in self.state_attributes:
                raise ValueError(f"{type(self).__name__} has no state {key!r}")
            grouped.setdefault(attr, {})[name] = np.asarray(value).copy()
        for attr in self.state_attributes:
            items = grouped.get(attr)
            if not items:
                continue
            if all(k.startswith("#") for k in items):
                setattr(self, attr, [items[f"#{i}"] for i in range(len(items))])
            else:
                setattr(self, attr, items)


#: Prefix of the state keys of the server optimiser (``server_opt.momentum``).
SERVER_STATE_PREFIX = "server_opt."


def check_lr_decay(server_lr_decay: float | None, server_lr_decay_every: int | None) -> None:
    """The step-decay schedule is set completely or not at all (ConfigError naming the field)."""
    if (server_lr_decay is None) != (server_lr_decay_every is None):
        missing = "server_lr_decay_every" if server_lr_decay_every is None else "server_lr_decay"
        given = "server_lr_decay" if missing == "server_lr_decay_every" else "server_lr_decay_every"
        raise ConfigError(missing, f"required with {given} (the schedule is lr × server_lr_decay "
                          "every server_lr_decay_every rounds); set both or neither")


def step_decay(lr: float, server_round: int, factor: float | None, every: int | None) -> float:
    """``lr · factor^⌊(server_round − 1)/every⌋`` (rounds from 1); ``lr`` without a schedule.

    >>> [step_decay(1.0, t, 0.5, 2) for t in (1, 2, 3, 4, 5)]
    [1.0, 1.0, 0.5, 0.5, 0.25]
    """
    if factor is None or every is None:
        return lr
    return lr * factor ** ((int(server_round) - 1) // int(every))


class DeltaStrategy(FedaggStrategy, FedAvg):
    """Base of our own rules: ``global += server_lr · aggregate_deltas(Δ)`` with ``Δ = local − global``.

    Subclasses override :meth:`aggregate_deltas`. The default is FedAvg (McMahan et al. 2017,
    arXiv 1602.05629): the example-weighted mean of the deltas.

    Server optimiser
    ----------------
    The aggregate ``a_t`` points the way the clients moved, i.e. *against* a gradient: one client
    doing one plain SGD step ``local = global − γ ∇F`` gives ``a_t = −γ ∇F``. The server treats
    ``−a_t`` as the gradient of a torch-style SGD with momentum ``m``, weight decay ``λ`` and step
    ``η_t``, written in the aggregate's direction (``v = −torch's momentum buffer``)::

        u_t = a_t − λ · θ_{t−1}                   (weight decay: −λθ is the descent of ½λ‖θ‖²)
        v_t = m · v_{t−1} + u_t,   v = u at the first step   (heavy ball; no dampening/Nesterov)
        θ_t = θ_{t−1} + η_t · v_t
        η_t = server_lr · server_lr_decay^⌊(t − 1)/server_lr_decay_every⌋   (rounds t from 1)

    so for replies ``local = θ − g_t`` this is exactly ``torch.optim.SGD(lr=η, momentum=m,
    weight_decay=λ)`` stepping on gradients ``g_t`` (with ``torch.optim.lr_scheduler.StepLR(step_size=
    server_lr_decay_every, gamma=server_lr_decay)`` stepped once per round for the schedule).
    The schedule follows the round number ``t`` (a round that takes no step still counts; torch's
    ``StepLR`` would count steps). With ``m = λ = 0`` and no schedule it is the plain
    ``θ += server_lr · a_t`` (bit for bit).
    ``v`` is float64 strategy state (``server_opt.momentum``, ``(d,)``; in :meth:`state_dict`). A
    round that keeps the global model (too few usable replies, a non-finite aggregate or step)
    takes no step and leaves ``v`` unchanged.

    Parameters
    ----------
    server_lr : float (default: 1.0)
        Global learning rate η.
    server_momentum : float in [0, 1) or None (default: None = 0)
        Heavy-ball momentum ``m`` on the aggregate.
    server_weight_decay : float >= 0 or None (default: None = 0)
        ``λ``: subtract ``η_t · λ · θ`` each step (torch SGD's ``weight_decay``).
    server_lr_decay : float in (0, 1] or None (default: None)
        Step-decay factor of ``η`` (needs ``server_lr_decay_every``).
    server_lr_decay_every : int >= 1 or None (default: None)
        Rounds between decays (needs ``server_lr_decay``).
    **kwargs
        :class:`FedaggStrategy` and Flower ``FedAvg`` parameters.
    """

    def __init__(self, *, server_lr: float = 1.0, server_momentum: float | None = None,
                 server_weight_decay: float | None = None, server_lr_decay: float | None = None,
                 server_lr_decay_every: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.server_lr = server_lr
        m, wd = float(server_momentum or 0.0), float(server_weight_decay or 0.0)
        if not 0 <= m < 1:
            raise ConfigError("server_momentum", f"must lie in [0, 1), got {m}")
        if not (np.isfinite(wd) and wd >= 0):
            raise ConfigError("server_weight_decay", f"must be >= 0, got {wd}")
        self.server_momentum, self.server_weight_decay = m, wd
        check_lr_decay(server_lr_decay, server_lr_decay_every)
        if server_lr_decay is not None and not 0 < server_lr_decay <= 1:
            raise ConfigError("server_lr_decay", f"must lie in (0, 1], got {server_lr_decay}")
        if server_lr_decay_every is not None and not int(server_lr_decay_every) >= 1:
            raise ConfigError("server_lr_decay_every", f"must be >= 1, got {server_lr_decay_every}")
        self.server_lr_decay = None if server_lr_decay is None else float(server_lr_decay)
        self.server_lr_decay_every = (None if server_lr_decay_every is None
                                      else int(server_lr_decay_every))
        #: Heavy-ball buffer ``v`` (float64, ``(d,)``), allocated at the first step with m > 0.
        self.momentum_buffer: np.ndarray | None = None

    # ------------------------------------------------------------------ server optimiser
    def server_lr_at(self, server_round: int) -> float:
        """``η_t``: ``server_lr`` after the step-decay schedule, for round ``server_round``."""
        return step_decay(self.server_lr, server_round, self.server_lr_decay,
                          self.server_lr_decay_every)

    def server_step(self, server_round: int, global_flat: np.ndarray, aggregate: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``(θ_t, v_t)`` from ``θ_{t−1} = global_flat (d,)`` and ``a_t = aggregate (d,)`` (class
        docstring); ``v_t`` is None without momentum. Pure: commit ``v_t`` with
        :meth:`commit_step` once ``θ_t`` is accepted."""
        lr = self.server_lr_at(server_round)
        if self.server_momentum == 0.0 and self.server_weight_decay == 0.0:
            return global_flat + lr * aggregate, None
        u = aggregate - self.server_weight_decay * global_flat if self.server_weight_decay else aggregate
        if self.server_momentum == 0.0:
            return global_flat + lr * u, None
        v = self.momentum_buffer
        if v is not None and v.shape != u.shape:
            raise ValueError(f"server momentum buffer has shape {v.shape}, the model {u.shape}")
        v = u.copy() if v is None else self.server_momentum * v + u
        return global_flat + lr * v, v

    def commit_step(self, buffer: np.ndarray | None) -> None:
        """Keep the momentum buffer of an accepted :meth:`server_step`."""
        if buffer is not None:
            self.momentum_buffer = buffer

    @property
    def uses_server_optimizer(self) -> bool:
        """Whether momentum or weight decay is on (the step is more than ``θ += η_t · a_t``)."""
        return self.server_momentum > 0.0 or self.server_weight_decay > 0.0

    # ------------------------------------------------------------------ aggregation
    def aggregate_deltas(self, server_round: int, deltas: np.ndarray, num_examples: np.ndarray,
                         client_ids: list[int]) -> np.ndarray:
        """Map ``deltas: (n, d)`` (float64) to the aggregate ``(d,)``. Default: weighted mean."""
        total = num_examples.sum()
        w = num_examples / total if total > 0 else np.full(len(deltas), 1.0 / len(deltas))
        return w @ deltas

    def aggregate_accepted(self, server_round: int, replies: list[Message]
                           ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self.current_global is not None, "configure_train must run before aggregate_train"
        layout = Layout.of(self.current_global)
        g = self.flat(self.current_global, layout)
        records = [m.content[self.arrayrecord_key] for m in replies]
        deltas = None if self._rows is None else self._rows.take_deltas(records, g)  # from screening
        if deltas is None:
            deltas = np.stack([self.flat(r, layout) for r in records]) - g  # type: ignore[arg-type]
        n_ex = np.array([reply_num_examples(m) for m in replies], dtype=np.float64)
        ids = [reply_client_id(m) for m in replies]
        agg = np.asarray(self.aggregate_deltas(server_round, deltas, n_ex, ids), dtype=np.float64)
        metrics = mean_metrics(replies)
        metrics.update(self.round_metrics())
        new, buffer = None, None
        if agg.shape == g.shape:
            flat, buffer = self.server_step(server_round, g, agg)
            new = layout.unflatten(flat)
        if new is None or not all(np.all(np.isfinite(v)) for v in new.values()):
            # e.g. a NaN from the rule, or a finite float64 step that overflows float32
            log(WARNING, "round %d: aggregate is not finite; global model kept", server_round)
            metrics["aggregate_nonfinite"] = 1
            return None, MetricRecord(metrics)
        self.commit_step(buffer)
        return to_record(new), MetricRecord(metrics)

    def round_metrics(self) -> dict[str, float]:
        """Strategy-specific scalars for this round's metrics row (e.g. weight statistics)."""
        return {}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, np.ndarray]:
        """:meth:`FedaggStrategy.state_dict` plus ``server_opt.momentum`` once it exists.
        Subclasses add their own keys to ``super().state_dict()``."""
        out = super().state_dict()
        if self.momentum_buffer is not None:
            out[f"{SERVER_STATE_PREFIX}momentum"] = self.momentum_buffer.copy()
        return out

    def load_base_state(self, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Restore the state this base class owns (the momentum buffer; absent = none yet) and
        return the other entries, for the subclass's own :meth:`load_state_dict`."""
        rest = {k: v for k, v in state.items() if not k.startswith(SERVER_STATE_PREFIX)}
        own = {k: v for k, v in state.items() if k.startswith(SERVER_STATE_PREFIX)}
        buf = own.pop(f"{SERVER_STATE_PREFIX}momentum", None)
        if own:
            raise ValueError(f"{type(self).__name__} has no state {sorted(own)[0]!r}")
        if buf is not None:
            buf = np.array(buf, dtype=np.float64)
            if buf.ndim != 1:
                raise ValueError(f"server_opt.momentum must be (d,), got {buf.shape}")
        self.momentum_buffer = buf
        return rest

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore :meth:`state_dict` output (unknown keys are an error)."""
        super().load_state_dict(self.load_base_state(state))

    def summary(self) -> None:
        log(INFO, "\t├──> %s: %s, clients_per_round=%s, seed=%d",
            type(self).__name__, self.describe_server_step(), self.clients_per_round, self.seed)

    def describe_server_step(self) -> str:
        """``server_lr=…`` plus the optimiser settings that are on, for summaries."""
        parts = [f"server_lr={self.server_lr}"]
        if self.server_momentum:
            parts.append(f"server_momentum={self.server_momentum}")
        if self.server_weight_decay:
            parts.append(f"server_weight_decay={self.server_weight_decay}")
        if self.server_lr_decay is not None:
            parts.append(f"×{self.server_lr_decay} every {self.server_lr_decay_every} rounds")
        return ", ".join(parts)
