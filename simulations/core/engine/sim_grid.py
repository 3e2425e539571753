"""``SimGrid``: a Flower ``Grid`` whose nodes are virtual clients run by an executor.

Strategies talk to it exactly as to Flower's own grids (``get_node_ids``, ``push_messages``,
``pull_messages``, ``send_and_receive``). Node id == client id (0 … N−1). Each client's Flower
``Context.state`` is kept here, so a client keeps its state whichever worker runs it next.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from simulations.core.engine.executors import Executor, Job, JobResult
from strategies.flower_compat import DEFAULT_RUN_ID, ensure_task_identity, set_message_id


@dataclasses.dataclass
class Exchange:
    """Accounting of the last ``send_and_receive``: messages sent, replies, errors, timeouts."""

    sent: int = 0
    replies: int = 0
    errors: int = 0
    timeouts: int = 0
    client_seconds: dict[int, float] = dataclasses.field(default_factory=dict)


class SimGrid(Grid):
    """Flower Grid over ``num_clients`` virtual clients executed by ``executor``."""

    def __init__(self, num_clients: int, executor: Executor, *, run_id: int = DEFAULT_RUN_ID,
                 work: Callable[[int], float] | None = None) -> None:
        ensure_task_identity(run_id)
        self.num_clients = num_clients
        self.executor = executor
        self._run = Run.create_empty(run_id)
        self._work = work or (lambda cid: 1.0)
        self._ids = itertools.count()
        self._states: dict[int, RecordDict] = {}
        self._done: dict[str, JobResult] = {}
        self.last_exchange = Exchange()

    # ------------------------------------------------------------------ Grid API
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return range(self.num_clients)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        jobs, ids = [], []
        for msg in messages:
            cid = int(msg.metadata.dst_node_id)
            if not 0 <= cid < self.num_clients:
                raise ValueError(f"message for unknown node {cid} (nodes are 0..{self.num_clients - 1})")
            mid = f"m{next(self._ids)}"
            set_message_id(msg, mid)
            jobs.append(Job(mid, cid, msg, self._states.get(cid), float(self._work(cid))))
            ids.append(mid)
        self.executor.submit(jobs)
        return ids

    def _store(self, results: list[JobResult]) -> None:
        for res in results:
            if res.state is not None:
                self._states[res.client_id] = res.state
            self._done[res.message_id] = res

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self._store(self.executor.poll())
        return [self._done.pop(mid).reply for mid in list(message_ids) if mid in self._done]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        ids = list(self.push_messages(messages))
        self._store(self.executor.wait(timeout))
        replies, ex = [], Exchange(sent=len(ids))
        for mid in ids:
            res = self._done.pop(mid, None)
            if res is None:
                ex.timeouts += 1
                continue
            replies.append(res.reply)
            ex.replies += 1
            ex.errors += int(res.reply.has_error())
            ex.client_seconds[res.client_id] = res.seconds
        if ex.timeouts:
            self.executor.abandon()
        self.last_exchange = ex
        return replies

    def worker_restarts(self) -> int:
        """Workers replaced so far (crashed or killed after a timeout); 0 without workers."""
        return int(getattr(self.executor, "restarts", 0))

    def shutdown(self) -> None:
        self.executor.shutdown()
