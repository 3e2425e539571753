"""Where client work runs: in this process (``inline``) or in Ray actors (``ray``).

An executor receives :class:`Job` s (one instruction message for one virtual client) and returns
:class:`JobResult` s (the ClientApp's reply). The ClientApp is the real ``flwr.clientapp.ClientApp``;
an exception inside it becomes an error reply, as in Flower's own runtime.

Ray executor design (see ``docs/architecture.md``):

- a fixed pool of long-lived actors, each hosting *many* virtual clients: one ClientApp, one
  :class:`~simulations.core.client_app.ClientRuntime`, so data partitions stay resident and one model
  instance per worker is loaded in place for every client it runs;
- the round's broadcast content (global weights + config) is put in the object store **once** and
  every actor deserialises it once per round;
- jobs (longest expected work first) are dealt into a few chunks per worker — one Ray round trip
  per chunk, not per client — and chunks go to the least-loaded actor of the client's pool, with at
  most ``depth`` chunks queued per actor, so a slow chunk does not stall the others;
- a client exception is an error reply for that client only; a crashed actor is replaced and the
  clients of its chunk get error replies; after a timeout, actors still busy are killed and replaced
  (their clients count as timeouts).
"""

from __future__ import annotations

import dataclasses
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from strategies.flower_compat import DEFAULT_RUN_ID


@dataclasses.dataclass
class Job:
    """One instruction message for virtual client ``client_id``."""

    message_id: str
    client_id: int
    message: Message
    state: RecordDict | None = None
    work: float = 1.0


@dataclasses.dataclass
class JobResult:
    """The reply to job ``message_id`` and the client's updated context state."""

    message_id: str
    client_id: int
    reply: Message
    state: RecordDict | None
    seconds: float


def client_context(client_id: int, num_clients: int, state: RecordDict | None,
                   run_id: int = DEFAULT_RUN_ID) -> Context:
    """The Flower Context of virtual client ``client_id`` (node id = client id)."""
    return Context(
        run_id=run_id, node_id=client_id,
        node_config={"partition-id": client_id, "num-partitions": num_clients},
        state=state if state is not None else RecordDict(), run_config={},
    )


def error_reply(message: Message, exc: BaseException) -> Message:
    """The error reply Flower's runtime sends when a ClientApp raises ``exc``."""
    tb = traceback.extract_tb(exc.__traceback__)
    at = f" (at {tb[-1].filename}:{tb[-1].lineno})" if tb else ""
    reason = f"{type(exc).__name__}: {exc}{at}"
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)


def run_client(app: ClientApp, message: Message, client_id: int, num_clients: int,
               state: RecordDict | None) -> tuple[Message, RecordDict | None, float]:
    """Call the ClientApp; an exception becomes an error reply (like Flower's runtime)."""
    ctx = client_context(client_id, num_clients, state)
    t0 = time.perf_counter()
    try:
        reply = app(message, ctx)
    except Exception as exc:  # noqa: BLE001 - any client failure becomes an error reply
        reply = error_reply(message, exc)
    seconds = time.perf_counter() - t0
    new_state = ctx.state if len(ctx.state) else None
    return reply, new_state, seconds


def run_clients(app: ClientApp, messages: list[Message], client_ids: list[int], num_clients: int,
                states: list[RecordDict | None]) -> list[tuple[Message, RecordDict | None, float]]:
    """Serve several messages; train messages that share one broadcast go through the runtime's
    batched path (``ClientRuntime.train_batch``: one computation for all of them) when the task
    and model allow it, everything else through the ClientApp one message at a time. One reply per
    message, in order; a batched client's seconds are its share of the batch's wall time."""
    runtime = getattr(app, "fedagg_runtime", None)
    out: list[tuple[Message, RecordDict | None, float] | None] = [None] * len(messages)
    if runtime is not None:
        groups: dict[int, list[int]] = {}
        for i, msg in enumerate(messages):
            if msg.metadata.message_type == MessageType.TRAIN:
                groups.setdefault(id(msg.content), []).append(i)
        for members in groups.values():
            if runtime.batch_reason(messages[members[0]].content) is not None:
                continue
            t0 = time.perf_counter()
            replies = runtime.train_batch([messages[i] for i in members], [client_ids[i] for i in members])
            share = (time.perf_counter() - t0) / len(members)
            for i, reply in zip(members, replies, strict=True):
                if isinstance(reply, Exception):
                    reply = error_reply(messages[i], reply)
                out[i] = (reply, states[i], share)
    for i, msg in enumerate(messages):
        if out[i] is None:
            out[i] = run_client(app, msg, client_ids[i], num_clients, states[i])
    return out  # type: ignore[return-value]


def plan_chunks(jobs: list[Job], batch_limit: int | None,
                pool_of: Callable[[int], int] | None = None,
                alone: Callable[[Job], bool] | None = None) -> list[list[Job]]:
    """Cut jobs into the calls a worker serves: with ``batch_limit``, train jobs that share a
    broadcast (and a worker pool) are sorted by client id and cut into ``ceil(n / batch_limit)``
    near-equal chunks, each one batched computation; every other job, and every job ``alone``
    picks (a client whose injected hang or worker kill fires: it takes down only itself, as a
    hung or crashed device would), is a chunk of its own. The cut depends only on the jobs, never
    on the engine or its worker count, so a client's batch (and its floating-point result) is the
    same on every engine."""
    pool_of = pool_of or (lambda cid: 0)
    groups: dict[tuple[int, int], list[Job]] = {}
    chunks: list[list[Job]] = []
    for job in jobs:
        if (batch_limit is not None and job.message.metadata.message_type == MessageType.TRAIN
                and not (alone is not None and alone(job))):
            groups.setdefault((pool_of(job.client_id), id(job.message.content)), []).append(job)
        else:
            chunks.append([job])
    for members in groups.values():
        members.sort(key=lambda j: j.client_id)
        k = -(-len(members) // batch_limit)  # type: ignore[operator]
        size, extra = divmod(len(members), k)
        start = 0
        for i in range(k):
            end = start + size + (1 if i < extra else 0)
            chunks.append(members[start:end])
            start = end
    return chunks


class Executor(Protocol):
    """Runs jobs; ``wait`` returns the results finished so far (blocking up to ``timeout``)."""

    def submit(self, jobs: list[Job]) -> None: ...

    def wait(self, timeout: float | None) -> list[JobResult]: ...

    def poll(self) -> list[JobResult]: ...

    def abandon(self) -> list[Job]: ...

    def shutdown(self) -> None: ...


class InlineExecutor:
    """Runs every job in this process: the train jobs of a broadcast as batched chunks
    (:func:`plan_chunks`, ``batch_limit`` None: one job at a time), longest expected work first."""

    def __init__(self, app: ClientApp, num_clients: int, threads: int = 1,
                 batch_limit: int | None = None, pool_of: Callable[[int], int] | None = None) -> None:
        self.app = app
        self.num_clients = num_clients
        self.threads = threads
        self.batch_limit = batch_limit
        self.pool_of = pool_of  # profiles: chunks as the Ray engine's pools cut them
        self._queue: deque[list[Job]] = deque()

    def submit(self, jobs: list[Job]) -> None:
        chunks = plan_chunks(jobs, self.batch_limit, self.pool_of)
        self._queue.extend(sorted(chunks, key=lambda c: -sum(j.work for j in c)))

    def _run(self, jobs: list[Job]) -> list[JobResult]:
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)  # as in a 1-CPU Ray worker: same floating-point results
        try:
            results = run_clients(self.app, [j.message for j in jobs], [j.client_id for j in jobs],
                                  self.num_clients, [j.state for j in jobs])
        finally:
            torch.set_num_threads(threads)
        return [JobResult(j.message_id, j.client_id, reply, state, secs)
                for j, (reply, state, secs) in zip(jobs, results, strict=True)]

    def wait(self, timeout: float | None) -> list[JobResult]:
        """Run queued chunks until none is left or ``timeout`` has passed (checked between chunks)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        out: list[JobResult] = []
        while self._queue and (deadline is None or time.monotonic() < deadline):
            out.extend(self._run(self._queue.popleft()))
        return out

    def poll(self) -> list[JobResult]:
        return self.wait(None)

    def abandon(self) -> list[Job]:
        jobs = [job for chunk in self._queue for job in chunk]
        self._queue.clear()
        return jobs

    def shutdown(self) -> None:
        self._queue.clear()


# ----------------------------------------------------------------------------------------- Ray
def _worker_class() -> Any:
    import ray

    @ray.remote
    class ClientWorker:
        """A Ray actor hosting many virtual clients of one run."""

        def __init__(self, app: ClientApp, num_clients: int, threads: int) -> None:
            import torch

            torch.set_num_threads(max(1, threads))
            from simulations.core.client_app import warm_up

            warm_up(app)
            self.app = app
            self.num_clients = num_clients
            self._content: dict[str, RecordDict] = {}

        def ready(self) -> bool:
            return True

        def run(self, content_box: list[Any], items: list[tuple[Any, int, RecordDict | None]]
                ) -> list[tuple[Message, RecordDict | None, float]]:
            """Run a chunk of clients that share one broadcast content (one round trip)."""
            ref = content_box[0]
            key = ref.hex()
            if key not in self._content:
                if len(self._content) > 4:
                    self._content.clear()
                self._content[key] = ray.get(ref)
            messages = [Message(content=self._content[key], metadata=metadata) for metadata, _, _ in items]
            return run_clients(self.app, messages, [cid for _, cid, _ in items], self.num_clients,
                               [state for _, _, state in items])

    return ClientWorker


@dataclasses.dataclass(frozen=True)
class WorkerPool:
    """Identical Ray actors hosting a group of clients: ``workers`` actors with ``options``
    (``num_cpus``, ``num_gpus``, ``resources``) each."""

    name: str
    workers: int
    options: dict[str, Any]


class RayExecutor:
    """Runs jobs in pools of Ray actors (see module docstring).

    ``pools`` lists the worker pools (one per client profile); ``pool_of(client_id)`` says which
    pool hosts a client. With a single pool every client runs anywhere.
    """

    def __init__(self, app: ClientApp, num_clients: int, pools: list[WorkerPool], *,
                 pool_of: Callable[[int], int] | None = None, depth: int = 2,
                 chunks_per_worker: int = 2, batch_limit: int | None = None,
                 alone: Callable[[Job], bool] | None = None) -> None:
        import ray

        self._ray = ray
        self.app = app
        self.num_clients = num_clients
        self.depth = depth
        self.chunks_per_worker = chunks_per_worker
        self.batch_limit = batch_limit
        self.alone = alone
        self.pools = pools
        self._pool_of = pool_of or (lambda cid: 0)
        cls = _worker_class()

        def maker(options: dict[str, Any]) -> Callable[[], Any]:
            threads = max(1, int(options.get("num_cpus", 1)))
            return lambda: cls.options(**options).remote(app, num_clients, threads)

        self._makers: list[Callable[[], Any]] = []
        self._actor_pool: list[int] = []  # actor index -> pool index
        for p_idx, pool in enumerate(pools):
            for _ in range(pool.workers):
                self._makers.append(maker(pool.options))
                self._actor_pool.append(p_idx)
        self.actors = [make() for make in self._makers]
        ray.get([a.ready.remote() for a in self.actors])
        self._members = [[i for i, p in enumerate(self._actor_pool) if p == k] for k in range(len(pools))]
        self._queues: list[deque[list[Job]]] = [deque() for _ in pools]
        self._inflight: dict[Any, tuple[int, list[Job], Any]] = {}  # ref -> (actor, chunk, handle)
        self._load = [0] * len(self.actors)
        self._content_refs: dict[int, Any] = {}
        self.restarts = 0

    def submit(self, jobs: list[Job]) -> None:
        """Queue ``jobs`` as chunks. With ``batch_limit`` the chunks are :func:`plan_chunks`'s (the
        same as the inline engine's, each one batched call on a worker). Otherwise, per pool and
        broadcast content, the jobs (longest first) are dealt into ``chunks_per_worker × workers``
        chunks, so each worker takes a few round trips per round instead of one per client while
        the pool still balances dynamically."""
        for job in jobs:
            key = id(job.message.content)
            if key not in self._content_refs:
                self._content_refs[key] = self._ray.put(job.message.content)
        if self.batch_limit is not None:
            chunks = plan_chunks(jobs, self.batch_limit, self._pool_of, self.alone)
            for chunk in sorted(chunks, key=lambda c: -sum(j.work for j in c)):
                self._queues[self._pool_of(chunk[0].client_id)].append(chunk)
            self._pump()
            return
        groups: dict[tuple[int, int], list[Job]] = {}
        for job in sorted(jobs, key=lambda j: -j.work):
            groups.setdefault((self._pool_of(job.client_id), id(job.message.content)), []).append(job)
        for (pool, _), members in groups.items():
            k = min(len(members), self.chunks_per_worker * max(1, len(self._members[pool])))
            chunks: list[list[Job]] = [[] for _ in range(k)]
            for i, job in enumerate(members):  # deal longest-first: chunk sums stay balanced
                chunks[i % k].append(job)
            self._queues[pool].extend(chunks)
        self._pump()

    def _pump(self) -> None:
        for queue, members in zip(self._queues, self._members, strict=True):
            while queue and members:
                idx = min(members, key=lambda i: (self._load[i], i))
                if self._load[idx] >= self.depth:
                    break
                chunk = queue.popleft()
                ref = self._content_refs[id(chunk[0].message.content)]
                actor = self.actors[idx]
                items = [(j.message.metadata, j.client_id, j.state) for j in chunk]
                fut = actor.run.remote([ref], items)
                self._inflight[fut] = (idx, chunk, actor)
                self._load[idx] += 1

    def _collect(self, ready: list[Any]) -> list[JobResult]:
        out = []
        for fut in ready:
            idx, chunk, actor = self._inflight.pop(fut)
            self._load[idx] -= 1
            try:
                results = self._ray.get(fut)
            except (self._ray.exceptions.RayActorError, self._ray.exceptions.RayTaskError) as exc:
                died = isinstance(exc, self._ray.exceptions.RayActorError)
                what = "Ray worker died while running" if died else "Ray task failed for"
                results = []
                for job in chunk:
                    reason = f"{what} client {job.client_id}: {exc}"
                    results.append((Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                                            reply_to=job.message), job.state, 0.0))
                if died and self.actors[idx] is actor:  # replace once, not once per job
                    self._replace(idx)
            for job, (reply, state, secs) in zip(chunk, results, strict=True):
                out.append(JobResult(job.message_id, job.client_id, reply, state, secs))
        if not any(self._queues) and not self._inflight:
            self._content_refs.clear()
        return out

    def _replace(self, idx: int) -> None:
        """Kill actor ``idx`` (if alive) and start a fresh one; its other jobs are lost."""
        try:
            self._ray.kill(self.actors[idx], no_restart=True)
        except Exception:  # noqa: BLE001 - already dead
            pass
        self.actors[idx] = self._makers[idx]()
        self.restarts += 1

    def wait(self, timeout: float | None) -> list[JobResult]:
        deadline = None if timeout is None else time.monotonic() + timeout
        out: list[JobResult] = []
        while self._inflight:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _ = self._ray.wait(list(self._inflight), num_returns=1, timeout=remaining)
            if not ready:
                break
            more, _ = self._ray.wait(list(self._inflight), num_returns=len(self._inflight), timeout=0)
            out.extend(self._collect(list(dict.fromkeys([*ready, *more]))))
            self._pump()
        return out

    def poll(self) -> list[JobResult]:
        if not self._inflight:
            return []
        ready, _ = self._ray.wait(list(self._inflight), num_returns=len(self._inflight), timeout=0)
        out = self._collect(ready)
        self._pump()
        return out

    def abandon(self) -> list[Job]:
        """Drop queued jobs and kill actors still running a job (after a timeout)."""
        dropped = [job for q in self._queues for chunk in q for job in chunk]
        for q in self._queues:
            q.clear()
        busy = sorted({idx for idx, _, _ in self._inflight.values()})
        dropped += [job for _, chunk, _ in self._inflight.values() for job in chunk]
        self._inflight.clear()
        for idx in busy:
            self._replace(idx)
            self._load[idx] = 0
        self._content_refs.clear()
        return dropped

    def shutdown(self) -> None:
        for actor in self.actors:
            try:
                self._ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        self.actors = []
