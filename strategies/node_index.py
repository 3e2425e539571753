"""Dense client indices ``0 … N−1`` for Flower node ids, for strategies with per-client state.

Flower node ids are arbitrary unsigned 64-bit integers (random in ``run_simulation`` and on a
SuperLink); the fedagg engines use the partition ids ``0 … N−1`` as node ids. A
:class:`NodeIndex` maps node ids to the rows of a strategy's ``(N, …)`` state:

- **explicit** (``node_ids`` given): index ``i`` is ``node_ids[i]``; any other node is an error.
- **dynamic** (``node_ids=None``, ``assign=True``): a node gets its index the first time it is
  looked up and keeps it. A node id ``k`` in ``[0, N)`` gets index ``k`` if that index is still
  free, so with the fedagg engines (node id = partition id) index == node id; any other node gets
  the lowest free index, in the order the nodes first appear (sorted by node id within a call).
  More than ``N`` distinct nodes is an error.
- **identity** (``node_ids=None``, ``assign=False``): index == node id; a node id outside
  ``[0, N)`` is an error (for state that the user indexes by client, e.g. known-p's ``p_n``).

The assignment is state: :meth:`state_dict` / :meth:`load_state_dict` (keys ``clients.node_id``
``(N,) uint64`` and ``clients.assigned`` ``(N,) bool``) make a resumed run map every node as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedagg.errors import ConfigError

__all__ = ["STATE_PREFIX", "NodeIndex"]

#: Prefix of the keys :meth:`NodeIndex.state_dict` writes.
STATE_PREFIX = "clients."
_MAX_NODE_ID = 2**64 - 1


def _node_id(value: object, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(field, f"node ids are integers, got {value!r}")
    if not 0 <= int(value) <= _MAX_NODE_ID:
        raise ConfigError(field, f"node ids are unsigned 64-bit integers, got {value}")
    return int(value)


class NodeIndex:
    """Node id → dense index in ``[0, num_clients)`` (see the module docstring).

    Parameters
    ----------
    num_clients : int
        ``N``, the number of indices.
    node_ids : sequence of int or None
        The node id of each index (``N`` distinct values); None for the dynamic / identity rule.
    assign : bool (default True)
        Without ``node_ids``: assign indices on first appearance (True) or require node id ==
        index (False).
    field : str
        Config field named in errors about ``node_ids``.
    """

    def __init__(self, num_clients: int, node_ids: Sequence[int] | None = None, *,
                 assign: bool = True, field: str = "strategy_args.node_ids") -> None:
        self.num_clients = int(num_clients)
        self.assign = assign
        self.fixed = node_ids is not None
        self._index: dict[int, int] = {}
        if node_ids is not None:
            ids = [_node_id(v, field) for v in node_ids]
            if len(ids) != self.num_clients:
                raise ConfigError(field, f"need {self.num_clients} node ids (one per client), "
                                  f"got {len(ids)}")
            if len(set(ids)) != len(ids):
                raise ConfigError(field, "node ids must be distinct")
            self._index = {nid: i for i, nid in enumerate(ids)}

    def __len__(self) -> int:
        """Number of node ids with an index."""
        return len(self._index)

    def lookup(self, node_ids: Sequence[int]) -> np.ndarray:
        """Indices ``(n,) int64`` of ``node_ids``, assigning new ones under the dynamic rule."""
        ids = [int(v) for v in node_ids]
        if not self.fixed and self.assign:
            self._assign([v for v in sorted(set(ids)) if v not in self._index])
        out = np.empty(len(ids), dtype=np.int64)
        for j, nid in enumerate(ids):
            idx = self._index.get(nid)
            if idx is None and not self.fixed and 0 <= nid < self.num_clients:
                idx = nid  # identity rule
            if idx is None:
                raise ValueError(self._unknown(nid))
            out[j] = idx
        return out

    def _unknown(self, nid: int) -> str:
        if self.fixed:
            return f"node {nid} is not in node_ids (the {self.num_clients} nodes this strategy indexes)"
        return (f"node id {nid} is not a client id in [0, {self.num_clients}); pass node_ids=[...] "
                "(the node id of each client, in the order of the per-client parameters)")

    def _assign(self, new: list[int]) -> None:
        taken = set(self._index.values())
        # first pass: small ids keep their own index; second pass: lowest free index
        rest = []
        for nid in new:
            if 0 <= nid < self.num_clients and nid not in taken:
                self._index[nid] = nid
                taken.add(nid)
            else:
                rest.append(nid)
        free = (i for i in range(self.num_clients) if i not in taken)
        for nid in rest:
            idx = next(free, None)
            if idx is None:
                raise ValueError(f"more than num_clients={self.num_clients} distinct nodes replied "
                                 f"(node {nid} has no free index); set num_clients to the number "
                                 "of nodes")
            self._index[nid] = idx

    def node_ids(self) -> np.ndarray:
        """``(N,) uint64``: the node id at each index (0 where none is assigned yet)."""
        out = np.zeros(self.num_clients, dtype=np.uint64)
        for nid, idx in self._index.items():
            out[idx] = nid
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        """The dynamic assignment (``{}`` for explicit node ids or before any assignment)."""
        if self.fixed or not self._index:
            return {}
        assigned = np.zeros(self.num_clients, dtype=bool)
        assigned[list(self._index.values())] = True
        return {f"{STATE_PREFIX}node_id": self.node_ids(), f"{STATE_PREFIX}assigned": assigned}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore :meth:`state_dict` output; ``{}`` clears a dynamic assignment."""
        if self.fixed:
            if state:
                raise ValueError("this strategy has explicit node_ids; the state holds an assignment")
            return
        if not state:
            self._index = {}
            return
        keys = {f"{STATE_PREFIX}node_id", f"{STATE_PREFIX}assigned"}
        if set(state) != keys:
            raise ValueError(f"node index state needs keys {sorted(keys)}, got {sorted(state)}")
        ids = np.asarray(state[f"{STATE_PREFIX}node_id"], dtype=np.uint64)
        assigned = np.asarray(state[f"{STATE_PREFIX}assigned"], dtype=bool)
        if ids.shape != (self.num_clients,) or assigned.shape != (self.num_clients,):
            raise ValueError(f"node index state must be ({self.num_clients},), got {ids.shape}, "
                             f"{assigned.shape}")
        index = {int(ids[i]): i for i in np.flatnonzero(assigned)}
        if len(index) != int(assigned.sum()):
            raise ValueError("node index state assigns one node id to several indices")
        self._index = index
