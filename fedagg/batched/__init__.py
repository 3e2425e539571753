"""TEMPORARY stub (replaced by the real batched implementation at merge): same API, per-client loop."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from fedagg.training import LocalTrainConfig, federated_state, local_sgd


@dataclasses.dataclass
class ClientJob:
    x: torch.Tensor
    y: torch.Tensor
    cfg: LocalTrainConfig
    generator: torch.Generator


@dataclasses.dataclass
class BatchedResult:
    states: dict[str, torch.Tensor]
    losses: list[float]
    metrics: list[dict[str, float]]

    def client(self, i: int) -> dict[str, np.ndarray]:
        return {k: v[i].detach().cpu().numpy().copy() for k, v in self.states.items()}


def can_batch(model: nn.Module) -> str | None:
    return None


def batched_local_sgd(model: nn.Module, jobs: Sequence[ClientJob], *, loss_fn=None) -> BatchedResult:
    outs, losses = [], []
    for job in jobs:
        m = copy.deepcopy(model)
        losses.append(local_sgd(m, job.x, job.y, job.cfg, job.generator))
        outs.append({k: v.detach().clone() for k, v in federated_state(m).items()})
    names = list(federated_state(model))
    states = {k: torch.stack([o[k] for o in outs]) for k in names}
    return BatchedResult(states, losses, [{} for _ in jobs])
