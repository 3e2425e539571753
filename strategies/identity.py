"""Flower's per-process task identity, set in one place.

``flwr.app.Message(...)`` reads ``TaskIdentity.run_id``/``node_id``/``task_id`` when a strategy builds
an instruction message. Flower's own runtimes set them; outside them (our engine's driver process,
tests, notebooks) :func:`ensure_task_identity` does.
"""

from __future__ import annotations

from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

DEFAULT_RUN_ID = 1


def ensure_task_identity(run_id: int = DEFAULT_RUN_ID) -> None:
    """Make this process a ServerApp task of run ``run_id`` (idempotent)."""
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
