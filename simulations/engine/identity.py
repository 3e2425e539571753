"""Flower's per-process task identity: see :mod:`strategies.identity` (its one home)."""

from strategies.identity import DEFAULT_RUN_ID, ensure_task_identity

__all__ = ["DEFAULT_RUN_ID", "ensure_task_identity"]
