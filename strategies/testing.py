"""Drive a strategy without clients: build the messages a round would exchange.

Useful in unit tests of strategies (ours and users'): ``replies_for(strategy, round, global, locals)``
runs ``configure_train`` against a fake grid and answers every message with the given local model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from strategies.arrays import to_record
from strategies.flower_compat import ensure_task_identity, set_message_id


class FakeGrid(Grid):
    """A grid whose available nodes are ``node_ids``; it never sends anything."""

    def __init__(self, node_ids: Iterable[int]) -> None:
        ensure_task_identity()
        self._ids = list(node_ids)

    def set_run(self, run: Any) -> None:  # pragma: no cover
        pass

    @property
    def run(self) -> Any:  # pragma: no cover
        return None

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:  # pragma: no cover
        return Message(content, dst_node_id, message_type)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:  # pragma: no cover
        raise NotImplementedError


def reply(instruction: Message, arrays: Mapping[str, np.ndarray] | ArrayRecord | None,
          num_examples: int = 1, metrics: Mapping[str, float] | None = None,
          extra: Mapping[str, ArrayRecord] | None = None) -> Message:
    """A ClientApp-style reply to ``instruction`` (``arrays`` None: an error reply)."""
    if arrays is None:
        return Message(Error(code=0, reason="injected failure"), reply_to=instruction)
    record = arrays if isinstance(arrays, ArrayRecord) else to_record(arrays)
    m = {"num-examples": num_examples, "train_loss": 0.0, **(metrics or {})}
    content = RecordDict({"arrays": record, "metrics": MetricRecord(m), **(extra or {})})
    return Message(content, reply_to=instruction)


def run_round(strategy: Any, server_round: int, global_arrays: Mapping[str, np.ndarray],
              local_models: Mapping[int, Mapping[str, np.ndarray] | None],
              num_examples: Mapping[int, int] | None = None,
              available: Sequence[int] | None = None) -> tuple[ArrayRecord | None, MetricRecord | None]:
    """One round of ``strategy`` where client ``k`` replies ``local_models[k]`` (None: failure).

    Clients trained are those the strategy selects among ``available`` (default: all keys of
    ``local_models``); returns ``aggregate_train``'s result.
    """
    ids = sorted(local_models) if available is None else list(available)
    msgs = list(strategy.configure_train(server_round, to_record(dict(global_arrays)),
                                         ConfigRecord(), FakeGrid(ids)))
    for i, m in enumerate(msgs):
        set_message_id(m, f"fake-{server_round}-{i}")
    replies = [reply(m, local_models[int(m.metadata.dst_node_id)],
                     (num_examples or {}).get(int(m.metadata.dst_node_id), 1)) for m in msgs]
    return strategy.aggregate_train(server_round, replies)
