"""The merging experiment driver: tables (mean ± sample std) and a tiny end-to-end run."""

from __future__ import annotations

import json

import pytest
import yaml

from simulations.experiments import merging as exp


def test_tables_are_mean_pm_sample_std_over_seeds_sorted_by_accuracy():
    row = lambda a: {"test_accuracy": a, "test_loss": 1.0, "val_accuracy": a}  # noqa: E731
    results = {0: {"init": row(0.40), "fisher": row(0.60)}, 1: {"init": row(0.50), "fisher": row(0.50)}}
    table = exp.oneshot_table(results).splitlines()
    assert table[2].startswith("| `fisher` strategy") and "55.0 ± 7.1" in table[2]
    assert table[3].startswith("| shared initial model") and "45.0 ± 7.1" in table[3]
    multi = {s: {"fedavg": {"final_test_accuracy": a, "best_test_accuracy": a, "final_test_loss": 1.0,
                            "wall_seconds": 2.0, "bytes_up": 2e6, "curve": [0.1, a]}}
             for s, a in ((0, 0.3), (1, 0.5))}
    line = exp.multiround_table(multi, 1).splitlines()[2]
    assert line == "| `fedavg` | 40.0 ± 14.1 | 40.0 ± 14.1 | 1.000 ± 0.000 | 2.0 | 2 |"


TINY = {
    "seeds": [0],
    "base": {"dataset": "mnist1d", "dataset_args": {"num_samples": 300}, "num_clients": 3,
             "partition": "dirichlet", "alpha": 0.5, "model": "cnn", "model_args": {"channels": 4},
             "batch_size": 16, "lr": 0.05, "momentum": 0.9, "engine": "inline"},
    "oneshot": {
        "warmup": {"strategy": "fedavg", "rounds": 1, "local_steps": 3},
        "finetune": {"strategy": "fisher", "rounds": 1, "local_steps": 5,
                     "strategy_args": {"max_examples": 8}},
        "methods": {"uniform_soup": {"merge_method": "uniform_soup"},
                    "fedavg_weights": {"merge_method": "linear", "weights": "num_examples"},
                    "greedy_soup": {"merge_method": "greedy_soup"},
                    "ties": {"merge_method": "ties", "model_parameters": {"density": 0.5}}},
    },
    "multiround": {"rounds": 2, "local_steps": 2,
                   "strategies": {"fedavg": {}, "fisher": {"max_examples": 8}}},
}


@pytest.mark.slow
def test_tiny_experiment_end_to_end(tmp_path, capsys):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    doc = tmp_path / "merging.md"
    doc.write_text("intro\n<!-- merging:oneshot -->\n<!-- /merging:oneshot -->\n")
    code = exp.main(["--config", str(cfg), "--out", str(tmp_path / "out"), "--docs", str(doc),
                     "--figures", str(tmp_path / "fig")])
    assert code == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    one = res["oneshot"]["0"]
    assert set(one) == {"init", "best_client", "mean_client", "fisher", "uniform_soup",
                        "fedavg_weights", "greedy_soup", "ties"}
    # the greedy soup is never worse on its own validation split than the best ingredient
    assert one["greedy_soup"]["val_accuracy"] >= one["best_client"]["val_accuracy"]
    clients = sorted((tmp_path / "out" / "seed0" / "oneshot" / "clients").iterdir())
    assert [p.name for p in clients][:3] == ["client_0.safetensors", "client_1.safetensors",
                                            "client_2.safetensors"]
    assert set(res["multiround"]["0"]) == {"fedavg", "fisher"}
    assert len(res["multiround"]["0"]["fisher"]["curve"]) == 3
    text = doc.read_text()
    assert text.startswith("intro\n<!-- merging:oneshot -->\n| method |")
    assert "<!-- merging:multiround -->\n| strategy |" in text
    assert (tmp_path / "fig" / "merging_oneshot.png").stat().st_size > 1000
    assert (tmp_path / "fig" / "merging_multiround.png").stat().st_size > 1000
