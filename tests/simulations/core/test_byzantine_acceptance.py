"""Acceptance (issue 5), small scale: FA with f = 3 `random` attackers on MNIST-1D stays within 5
points of its f = 0 accuracy while the mean collapses.

The setting is one cell of ``simulations/configs/robust_mnist1d.yaml`` (seed 0): 15 clients, MLP,
20 rounds; FA with the reference output scale and its own server_lr 0.3 (docs/robust.md).
"""

from __future__ import annotations

import pytest

from simulations.core.config import load_config
from simulations.core.runner import Simulation

BASE = {"engine": "inline", "dataset": "mnist1d", "num_clients": 15, "partition": "iid",
        "model": "mlp", "rounds": 20, "local_steps": 5, "batch_size": 64, "lr": 0.2,
        "momentum": 0.9, "eval_every": 20, "seed": 0}


def final_accuracy(tmp_path, name: str, **over) -> float:
    cfg = load_config(None, {**BASE, **over, "out": str(tmp_path / name)})
    return Simulation(cfg).run().final_accuracy


@pytest.mark.slow
def test_flag_survives_random_attackers_while_mean_collapses(tmp_path) -> None:
    fa0 = final_accuracy(tmp_path, "fa0", strategy="flag", server_lr=0.3)
    fa3 = final_accuracy(tmp_path, "fa3", strategy="flag", server_lr=0.3, attack="random",
                         num_byzantine=3)
    mean3 = final_accuracy(tmp_path, "mean3", strategy="mean", attack="random", num_byzantine=3)
    assert fa0 > 0.3  # it learned something (chance is 0.1)
    assert fa3 >= fa0 - 0.05, (fa0, fa3)
    assert mean3 < 0.2, mean3  # the mean is dragged to chance level
