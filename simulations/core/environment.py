"""The environment of a federation: what the server does not control.

``EnvironmentGrid`` wraps any Flower ``Grid`` (our ``SimGrid`` or the grid ``run_simulation`` hands a
ServerApp) and adds, for every strategy alike:

- **client ids as node ids** — strategies see node id == client (partition) id, on every engine, so
  seeded client selection and per-client state (FedAU, MIFA, …) mean the same thing everywhere;
- **availability** — each round ``get_node_ids()`` returns only the clients the participation process
  makes available; stock Flower strategies sample among them, FedAU trains all of them;
- **Byzantine clients** — a hook that sees the round's replies (and the broadcast model) and replaces
  the Byzantine clients' updates before the strategy sees them (omniscient attacks);
- **accounting** — messages sent, replies, errors and timeouts of the last exchange.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from simulations.core.simtime import SimClock
from strategies.arrays import array_records
from strategies.flower_compat import set_source_node

#: ``available(round) -> client ids`` (sorted).
AvailabilityFn = Callable[[int], Sequence[int]]
#: ``corrupt(round, replies, broadcast) -> replies``: replaces Byzantine clients' replies.
CorruptFn = Callable[[int, list[Message], RecordDict | None], list[Message]]


@dataclasses.dataclass
class ExchangeStats:
    """What happened in the last ``send_and_receive`` (bytes count array payloads only)."""

    sent: int = 0
    replies: int = 0
    errors: int = 0
    timeouts: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    stragglers: int = 0
    sim_seconds: float = 0.0
    profile_seconds: dict[str, float] = dataclasses.field(default_factory=dict)


def payload_bytes(content: RecordDict) -> int:
    """Bytes of the arrays a message carries (all its ArrayRecords)."""
    return int(sum(len(a.data) for rec in array_records(content).values() for a in rec.values()))


def _payload(msg: Message, sizes: dict[int, int]) -> int:
    """:func:`payload_bytes` of ``msg``'s content (0 for an error reply), cached in ``sizes`` by
    content object (valid while the messages of one exchange are alive)."""
    if not msg.has_content():
        return 0
    content = msg.content
    size = sizes.get(id(content))
    if size is None:
        size = sizes[id(content)] = payload_bytes(content)
    return size


class EnvironmentGrid(Grid):
    """A Grid view that applies availability, Byzantine replacement and id translation."""

    def __init__(self, inner: Grid, num_clients: int, *, node_of_client: dict[int, int] | None = None,
                 available: AvailabilityFn | None = None, corrupt: CorruptFn | None = None,
                 clock: SimClock | None = None) -> None:
        self.inner = inner
        self.num_clients = num_clients
        self._node_of = dict(node_of_client) if node_of_client else {c: c for c in range(num_clients)}
        self._client_of = {n: c for c, n in self._node_of.items()}
        self._available_fn = available
        self._corrupt = corrupt
        self.clock = clock
        self.round = 0
        self._available: list[int] = list(range(num_clients))
        self.last_exchange = ExchangeStats()

    # ------------------------------------------------------------------ rounds
    def begin_round(self, server_round: int) -> list[int]:
        """Enter ``server_round``: ask the participation process who is available."""
        self.round = server_round
        if self._available_fn is None:
            self._available = list(range(self.num_clients))
        else:
            self._available = sorted(int(c) for c in self._available_fn(server_round))
        return list(self._available)

    # ------------------------------------------------------------------ Grid API
    def set_run(self, run: object) -> None:
        self.inner.set_run(run)  # type: ignore[arg-type]

    @property
    def run(self) -> object:  # type: ignore[override]
        return self.inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._available)

    def _to_inner(self, messages: Iterable[Message]) -> list[Message]:
        out = []
        for msg in messages:
            cid = int(msg.metadata.dst_node_id)
            if cid not in self._node_of:
                raise ValueError(f"message for unknown client {cid}")
            msg.metadata.dst_node_id = self._node_of[cid]
            out.append(msg)
        return out

    def _from_inner(self, replies: Iterable[Message]) -> list[Message]:
        out = []
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            set_source_node(msg, self._client_of.get(node, node))
            out.append(msg)
        return out

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(self._to_inner(messages))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._from_inner(self.inner.pull_messages(message_ids))

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        msgs = list(messages)
        broadcast = msgs[0].content if msgs else None
        is_train = bool(msgs) and msgs[0].metadata.message_type == MessageType.TRAIN
        replies = self._from_inner(self.inner.send_and_receive(self._to_inner(msgs), timeout=timeout))
        sizes: dict[int, int] = {}  # id(content) -> payload bytes: a broadcast is counted once
        self.last_exchange = ExchangeStats(
            sent=len(msgs), replies=len(replies), errors=sum(m.has_error() for m in replies),
            timeouts=len(msgs) - len(replies),
            bytes_down=sum(_payload(m, sizes) for m in msgs),
            bytes_up=sum(_payload(m, sizes) for m in replies),
        )
        if is_train and self.clock is not None:
            replies = self._apply_clock(msgs, replies, sizes)
        if is_train and self._corrupt is not None:
            replies = self._corrupt(self.round, replies, broadcast)
        return replies

    def _apply_clock(self, msgs: list[Message], replies: list[Message],
                     payloads: dict[int, int] | None = None) -> list[Message]:
        """Simulated round time; drop the replies of stragglers past the deadline."""
        assert self.clock is not None
        payloads = {} if payloads is None else payloads
        down = {int(m.metadata.dst_node_id): _payload(m, payloads) for m in msgs}
        down = {self._client_of.get(n, n): b for n, b in down.items()}
        sizes = {int(r.metadata.src_node_id): (down.get(int(r.metadata.src_node_id), 0), _payload(r, payloads))
                 for r in replies if r.has_content()}
        timing = self.clock.settle(self.round, sizes)
        late = set(timing.stragglers)
        self.last_exchange.stragglers = len(late)
        self.last_exchange.sim_seconds = timing.seconds
        per: dict[str, float] = {}
        for cid, secs in timing.durations.items():
            name = self.clock.table.of(cid).name
            per[name] = max(per.get(name, 0.0), secs)
        self.last_exchange.profile_seconds = per
        return [r for r in replies if int(r.metadata.src_node_id) not in late]
