"""Batched local training: many clients that start from the same weights, trained in one computation.

:func:`batched_local_sgd` gives every client exactly what :func:`fedagg.training.local_sgd` would
(SGD with momentum and weight decay, FedProx, per-client clipping, the same minibatches from each
client's own generator), to float32 rounding; :func:`fedagg.ssf.training.batched_train_pool` does the
same for FedIns pools. :func:`can_batch` says when a model must take the per-client path instead.
See :mod:`fedagg.batched.core` for the update rule.

Example
-------
>>> import torch
>>> from fedagg.models import build_model
>>> from fedagg.training import LocalTrainConfig
>>> model = build_model("mlp", (8,), 3, seed=0, params={"hidden": [16]})
>>> g = torch.Generator().manual_seed(0)
>>> jobs = [ClientJob(torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g),
...                   LocalTrainConfig(steps=2, batch_size=4), torch.Generator().manual_seed(i))
...         for i, n in enumerate([10, 3, 0])]
>>> out = batched_local_sgd(model, jobs)
>>> out.states["head.weight"].shape  # (clients, *shape)
torch.Size([3, 3, 16])
>>> out.losses[2] != out.losses[2]  # no data: nan, weights untouched
True
"""

from fedagg.batched.core import (
    BatchedResult,
    ClientJob,
    PerSampleLoss,
    batched_local_sgd,
    can_batch,
)

__all__ = ["BatchedResult", "ClientJob", "PerSampleLoss", "batched_local_sgd", "can_batch"]
