"""The default run learns (docs/quickstart.md): FedAvg, 10 IID clients of MNIST-1D, the 1-D CNN,
20 rounds of 20 local SGD steps (lr 0.1, momentum 0.9, batch 32). Measured on the inline engine:
80.6 % (seed 0); FedAU with a participation process and otherwise default settings: 76.2 %."""

from __future__ import annotations

import pytest

from simulations.core.config import RunConfig, load_config
from simulations.core.runner import Simulation

pytestmark = pytest.mark.slow


def test_default_config_is_the_documented_one() -> None:
    cfg = RunConfig()
    assert (cfg.strategy, cfg.dataset, cfg.partition, cfg.model, cfg.num_clients) == \
        ("fedavg", "mnist1d", "iid", "cnn", 10)
    assert (cfg.rounds, cfg.local_steps, cfg.batch_size, cfg.lr, cfg.momentum) == (20, 20, 32, 0.1, 0.9)
    assert cfg.participation.process == "always" and cfg.engine == "auto"


def test_default_run_learns(tmp_path) -> None:
    """Only the engine (inline: the same numbers as ray, without its start-up) and the output
    directory differ from ``python -m simulations.run``."""
    result = Simulation(load_config(None, {"engine": "inline", "out": str(tmp_path / "d")})).run()
    assert result.summary["rounds"] == 20
    assert result.final_accuracy >= 0.75, result.final_accuracy  # chance: 0.10


def test_fedau_with_a_participation_process_learns_on_defaults(tmp_path) -> None:
    """FedAU's setting (clients available with unknown heterogeneous probabilities, here of mean
    0.5: about 5 of the 10 clients per round), every training setting at its default."""
    cfg = load_config(None, {"engine": "inline", "strategy": "fedau", "participation.process": "bernoulli",
                             "participation.probabilities.mean": 0.5, "out": str(tmp_path / "f")})
    result = Simulation(cfg).run()
    available = [r["available"] for r in result.rows if r["phase"] == "train"]
    assert 1 <= sum(available) / len(available) <= 8  # partial participation did happen
    assert result.final_accuracy >= 0.6, result.final_accuracy
