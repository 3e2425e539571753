"""FedIns (Feng et al., "Towards Instance-adaptive Inference for Federated Learning", ICCV 2023,
arXiv 2308.06051): clients train an SSF pool over a frozen pretrained backbone, the server averages
the pools slot by slot.

Run it with ``--strategy fedins``, which selects ``--model fedins`` (another model is an error at
config load; see ``Needs`` in :mod:`strategies.registry`): the model kind ``fedins``
(:mod:`fedagg.models.fedins`) makes the federated state exactly the pool tensors (SSF scale/shift
pools ``(N, C)`` at every site, keys ``(N, D)``, head pools ``(N, K, D)`` and ``(N, K)``), so the
broadcast and the replies carry nothing else and the frozen backbone is never touched by the server.
The strategy asks clients for the ``fedins`` task (``simulations/core/tasks/fedins.py``: local steps on
the pool with ``(1 − λ)·CE + λ·(1 − Σ_{top-k} cos)``).

Aggregation, in the delta form of every fedagg rule (``Δ_m = local_m − global``): slots are
index-aligned because every client starts each round from the same broadcast pool, so slot ``i`` of
every client is averaged with slot ``i`` (``fedins_merging.md`` §2.4, §7):

    global ← global + server_lr · Σ_m w_m Δ_m,
    w_m = 1/M ("uniform", the reference)  or  n_m / Σ n ("num_examples", FedAvg).

With ``server_lr = 1`` this is the reference's ``server[name] = Σ_m w_m · client_m[name]``.

Example
-------
>>> s = build_fedins(num_clients=3, seed=0, server_lr=1.0, clients_per_round=None, min_replies=1,
...                  max_update_norm=None, lam=0.1, weighting="uniform", optimizer="sgd")
>>> import numpy as np
>>> s.aggregate_deltas(1, np.array([[0., 3.], [3., 0.]]), np.array([1., 2.]), [0, 1]).tolist()
[1.5, 1.5]

The baselines need no strategy of their own: single SSF, head-only and full fine-tuning are
``--strategy fedavg`` with ``--model ssf``, ``head-only`` or ``finetune`` (their federated state is
the SSF vectors + head, the head, or the whole model).
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.supercore import log

from fedagg.errors import ConfigError, unknown_name
from fedagg.registry import Param
from strategies.base import DeltaStrategy
from strategies.registry import Needs, register

__all__ = ["WEIGHTINGS", "FedIns", "build_fedins"]

WEIGHTINGS = ("uniform", "num_examples")


class FedIns(DeltaStrategy):
    """Slot-wise averaging of FedIns pools (see the module docstring).

    Parameters
    ----------
    lam : float (default: 0.1)
        λ of the surrogate loss, sent to the clients as ``fedins-lambda``.
    weighting : {"uniform", "num_examples"} (default: "uniform")
        Client weights of the average: ``1/M`` (reference) or ``n_m / Σ n`` (FedAvg).
    optimizer : {"sgd", "adam"} (default: "sgd")
        Local optimiser of the pool (sent as ``optimizer``); lr etc. from the run config.
    **kwargs
        :class:`~strategies.base.DeltaStrategy` parameters.
    """

    def __init__(self, *, lam: float = 0.1, weighting: str = "uniform", optimizer: str = "sgd",
                 **kwargs: Any) -> None:
        if weighting not in WEIGHTINGS:
            raise unknown_name("strategy_args.weighting", weighting, WEIGHTINGS)
        super().__init__(**kwargs)
        self.lam = lam
        self.weighting = weighting
        self.optimizer = optimizer

    def configure_train(self, server_round: int, arrays: Any, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if "keys" not in arrays or "head_weight" not in arrays:
            raise ConfigError("model", "strategy 'fedins' needs model: fedins (its federated state "
                              "is the SSF pool: keys, head_weight, ...)")
        cfg = ConfigRecord(dict(config.items()))
        cfg["task"] = "fedins"
        cfg["fedins-lambda"] = float(self.lam)
        cfg["optimizer"] = self.optimizer
        return super().configure_train(server_round, arrays, cfg, grid)

    def aggregate_deltas(self, server_round: int, deltas: np.ndarray, num_examples: np.ndarray,
                         client_ids: list[int]) -> np.ndarray:
        """``(n, d) → (d,)``: the uniform mean, or the example-weighted mean, of the pool deltas."""
        if self.weighting == "uniform":
            return deltas.mean(axis=0)
        return super().aggregate_deltas(server_round, deltas, num_examples, client_ids)

    def summary(self) -> None:
        log(INFO, "\t├──> FedIns: λ=%s, weighting=%s, optimizer=%s, server_lr=%s",
            self.lam, self.weighting, self.optimizer, self.server_lr)


@register(
    "fedins",
    params=[
        Param("lam", float, 0.1, "λ: weight of the key-matching surrogate (reference 0.1)",
              low=0.0, high=1.0),
        Param("weighting", str, "uniform", "client weights of the slot-wise average",
              choices=WEIGHTINGS),
        Param("optimizer", str, "sgd", "local optimiser of the pool", choices=("sgd", "adam")),
    ],
    doc="FedIns: clients train an instance-adaptive SSF pool (model fedins, selected by default); "
        "the server averages the pools slot-wise.",
    needs=Needs(models=("fedins",)),
)
def build_fedins(*, num_clients: int, lam: float, weighting: str, optimizer: str,
                 **common: Any) -> FedIns:
    del num_clients
    return FedIns(lam=lam, weighting=weighting, optimizer=optimizer, **common)
