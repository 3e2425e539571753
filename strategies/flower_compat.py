"""Every contact with Flower internals, in one module, so the ``flwr`` pin moves by editing this file.

Flower's public API covers building and reading Messages and records; a simulator also needs a few
things that are not public, and does them here only:

- **Task identity** (:func:`ensure_task_identity`): ``flwr.app.Message(...)`` reads
  ``TaskIdentity.run_id``/``node_id``/``task_id`` when a strategy builds an instruction message.
  Flower's own runtimes set them; outside them (our engines' driver process, tests, notebooks) we do.
- **Message metadata a Grid sets** (:func:`set_message_id`, :func:`set_source_node`): a Grid gives
  every instruction its id and every reply its source node; ``Metadata`` exposes them read-only.
- **Arrays and records built without per-item checks** (:func:`new_array`, :func:`fill_record`): the caller guarantees the items
  are valid; the record ends up exactly as Flower's own ``__setitem__`` would leave it.

``tests/test_layering.py`` checks that no other module reaches into Flower's private fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

DEFAULT_RUN_ID = 1


def ensure_task_identity(run_id: int = DEFAULT_RUN_ID) -> None:
    """Make this process a ServerApp task of run ``run_id`` (idempotent)."""
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID


def set_message_id(msg: Message, message_id: str) -> None:
    """Give an instruction ``msg`` its id, as a Grid does when it pushes it."""
    msg.metadata.__dict__["_message_id"] = message_id


def set_source_node(msg: Message, node_id: int) -> None:
    """Make reply ``msg`` come from node ``node_id`` (Metadata's ``src_node_id`` is read-only)."""
    msg.metadata.__dict__["_src_node_id"] = node_id


def new_array(dtype: str, shape: tuple[int, ...], stype: str, data: bytes) -> Array:
    """``Array(dtype=, shape=, stype=, data=)`` (the public 4-field constructor) without its
    argument juggling; the caller guarantees the fields are consistent."""
    out = Array.__new__(Array)
    out.__dict__.update(dtype=dtype, shape=shape, stype=stype, data=data)
    return out


def fill_record(record: ArrayRecord | MetricRecord | RecordDict, items: Mapping[str, Any]) -> None:
    """``record[k] = v`` for every item, skipping Flower's per-item checks: the caller guarantees
    they pass (str keys; values of the record's type). Falls back to item assignment if Flower's
    record no longer keeps its items in ``_data`` or is not empty."""
    data = record.__dict__.get("_data")
    if type(data) is dict and not data:
        data.update(items)
        if isinstance(record, ArrayRecord):
            record.__dict__["_is_dirty"] = True  # as ArrayRecord.__setitem__ marks it
        return
    for k, v in items.items():
        record[k] = v  # type: ignore[index, assignment]
