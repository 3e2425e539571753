"""Client tasks of the merging family.

``fisher`` — what a client does for the ``fisher`` strategy (FedFish, Dhawan et al., arXiv
2311.10291; one-shot FedFisher, Jhunjhunwala et al., AISTATS 2024): local SGD exactly like the
default ``train`` task, then the diagonal Fisher **at the local model on the client's own training
data** (:func:`fedagg.merging.diagonal_fisher`, Matena & Raffel, arXiv 2111.09832). The reply holds

- ``arrays``: the local model (the server forms ``Δ = local − global`` as for every strategy),
- ``fisher``: an ArrayRecord with the same names, shapes and dtypes as ``arrays`` holding
  ``F̂ = (1/N) Σ_{n≤N} F(x_n)`` (mean over ``N = min(max_examples, n_train)`` examples);
  entries the estimator does not cover (buffers, frozen parameters) are 0,
- ``metrics``: ``num-examples``, ``train_loss``, ``client-id``, ``fisher_examples``,
  ``fisher_mean`` (mean Fisher over all coordinates).

Train-config keys it reads (the ``fisher`` strategy sets them): ``fisher-estimator``
(``true`` | ``sampled`` | ``empirical``, default ``true``), ``fisher-max-examples`` (default 256)
and ``fisher-batch-size`` (default 32). When the client has more than ``max_examples`` examples, a
subset is drawn with the generator ``(seed, "fisher-subset", round, client)``; the ``sampled``
estimator draws its labels from ``(seed, "fisher-labels", round, client)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, MetricRecord, RecordDict

from fedagg.merging import diagonal_fisher
from fedagg.training import federated_state, load_numpy_state, local_sgd, state_to_numpy
from strategies.arrays import to_record

if TYPE_CHECKING:
    from simulations.core.client_app import ClientRuntime

#: Defaults of the train-config keys this task reads.
FISHER_DEFAULTS = {"fisher-estimator": "true", "fisher-max-examples": 256, "fisher-batch-size": 32}


def client_fisher(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, estimator: str,
    max_examples: int, batch_size: int, subset: torch.Generator, labels: torch.Generator,
) -> tuple[dict[str, np.ndarray], int]:
    """Diagonal Fisher of ``model`` on (a seeded subset of) ``x: (n, ...)``, ``y: (n,)``.

    Returns ``({name: array}`` keyed and shaped like the model's federated state, float dtype of
    each entry; 0 where no gradient flows``), number of examples used)``.
    """
    n = len(y)
    if n > max_examples:
        idx = torch.randperm(n, generator=subset)[:max_examples].sort().values.to(x.device)
        x, y = x[idx], y[idx]
    fisher = diagonal_fisher(
        model, x, estimator=estimator,  # type: ignore[arg-type]
        labels=y if estimator == "empirical" else None,
        generator=labels if estimator == "sampled" else None,
        batch_size=batch_size, reduction="mean",
    )
    out: dict[str, np.ndarray] = {}
    for name, tensor in federated_state(model).items():
        f = fisher.get(name)
        arr = np.zeros(tuple(tensor.shape), dtype=tensor.detach().cpu().numpy().dtype)
        if f is not None:
            arr[...] = f.detach().cpu().numpy()
        out[name] = arr
    return out, int(len(y))


def fisher_task(rt: ClientRuntime, cid: int, content: RecordDict, context: Context) -> RecordDict:
    """Load the global model, run local SGD, estimate the diagonal Fisher; see module docstring."""
    config = content.config_records.get("config", ConfigRecord())
    model = rt.model()
    load_numpy_state(model, rt.broadcast_state(content))
    t = rt.tensors(cid)
    server_round = int(config.get("server-round", 0))
    loss = local_sgd(model, t.x, t.y, rt.train_config(config),
                     rt.generator("local-train", server_round, cid))
    local = state_to_numpy(model)
    if len(t.y) == 0:  # nothing to estimate from: a zero Fisher (the server falls back to global)
        fisher = {k: np.zeros_like(v) for k, v in local.items()}
        used = 0
    else:
        fisher, used = client_fisher(
            model, t.x, t.y,
            estimator=str(config.get("fisher-estimator", FISHER_DEFAULTS["fisher-estimator"])),
            max_examples=int(config.get("fisher-max-examples", FISHER_DEFAULTS["fisher-max-examples"])),
            batch_size=int(config.get("fisher-batch-size", FISHER_DEFAULTS["fisher-batch-size"])),
            subset=rt.generator("fisher-subset", server_round, cid),
            labels=rt.generator("fisher-labels", server_round, cid),
        )
    total = sum(v.size for v in fisher.values())
    fmean = float(sum(float(v.sum(dtype=np.float64)) for v in fisher.values()) / max(total, 1))
    metrics = {"num-examples": int(len(t.y)), "train_loss": float(loss), "client-id": cid,
               "fisher_examples": used, "fisher_mean": fmean}
    return RecordDict({"arrays": to_record(local), "fisher": to_record(fisher),
                       "metrics": MetricRecord(metrics)})
