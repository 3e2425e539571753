"""FedIns end to end through the runner (inline engine, quick backbone), and the saved-run
evaluation path: per-instance predictions do not depend on the batch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array

from fedagg.models import build_model
from simulations import evaluate as evaluate_cli
from simulations.core.config import build_config
from simulations.core.results import load_arrays, read_metrics
from simulations.core.runner import Simulation
from simulations.evaluate import evaluate_run, load_run

CONFIG = {
    "strategy": "fedins", "model": "fedins", "engine": "inline", "seed": 3,
    "model_args": {"backbone": "mnist1d-transformer-quick", "pool_size": 4, "top_k": 2},
    "strategy_args": {"lam": 0.1, "weighting": "uniform"},
    "rounds": 2, "num_clients": 4, "local_steps": 3, "batch_size": 16, "lr": 0.3,
    "partition": "domain", "partition_args": {"domains_per_client": 2, "alpha": 0.5},
    "test_fraction": 0.0,
}


@pytest.fixture(scope="module")
def fedins_run(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("fedins") / "run"
    result = Simulation(build_config({**CONFIG, "out": str(out)})).run()
    return result


def _payload(arrays: dict[str, np.ndarray]) -> int:
    return sum(len(Array(np.ascontiguousarray(v)).data) for v in arrays.values())


def test_fedins_run_end_to_end(fedins_run, tmp_path):
    run = fedins_run.run_dir
    init = build_model("fedins", (40,), 10, seed=3, params=CONFIG["model_args"])
    pool_names = {n for n, _ in init.named_pool_parameters()}
    saved = load_arrays(run / "model.safetensors")
    assert set(saved) == pool_names == set(fedins_run.arrays)
    # the pool trained: every group moved away from its (seeded) init
    start = {k: v.numpy() for k, v in init.federated_state_dict().items()}
    for name in ("keys", "head_weight", "head_bias", f"net.{init.sites[0]}.scale"):
        assert np.abs(saved[name] - start[name]).max() > 1e-4, name
    rows = read_metrics(run)
    train = [r for r in rows if r["phase"] == "train"]
    assert [r["round"] for r in train] == [1, 2] and all(r["clients"] == 4 for r in train)
    # only the pool travels, both ways, every round
    per_client = _payload(saved)
    assert all(r["bytes_down"] == 4 * per_client == r["bytes_up"] for r in train)
    # N·(2·Σ_sites C + D + K·D + K): the quick backbone (d = 16, MLP 32) has 176 SSF channels
    assert sum(v.size for v in saved.values()) == 4 * (2 * 176 + 16 + 10 * 16 + 10) == 2152
    assert all(np.isfinite(r["train_cos"]) and -1 <= r["train_cos"] <= 1 for r in train)
    assert 0.1 < fedins_run.final_accuracy <= 1.0
    # same seed, same final pool (bit for bit)
    again = Simulation(build_config({**CONFIG, "out": str(tmp_path / "again")})).run()
    assert all(np.array_equal(again.arrays[k], v) for k, v in fedins_run.arrays.items())


def test_saved_run_evaluation_is_batch_invariant(fedins_run):
    run = fedins_run.run_dir
    whole = evaluate_run(run, batch_size=1000)
    alone = evaluate_run(run, batch_size=1, limit=300)  # every sample on its own
    odd = evaluate_run(run, batch_size=7)
    assert len(whole.labels) == 1000 and len(alone.labels) == 300 and not alone.complete
    for other in (alone, odd):
        n = len(other.labels)
        np.testing.assert_array_equal(other.predictions, whole.predictions[:n])
        np.testing.assert_array_equal(other.slots, whole.slots[:n])
        np.testing.assert_allclose(other.logits, whole.logits[:n], rtol=0, atol=1e-5)
    # the offline path reproduces the accuracy the server logged for the final round
    assert whole.accuracy == pytest.approx(fedins_run.final_accuracy, abs=1e-12)
    assert whole.slots.shape == (1000, 2) and whole.pool_size == 4
    hist = whole.slot_histogram()
    assert hist.shape == (4, 4)
    np.testing.assert_allclose(hist.sum(axis=1), 2.0)  # each sample picks k = 2 slots
    per_domain = whole.per_domain()
    assert sorted(per_domain) == [0, 1, 2, 3] and sum(n for _, n in per_domain.values()) == 1000


def test_batch_selection_would_fail_the_invariance(fedins_run):
    """Negative control: the reference's batch-averaged selection depends on the batch."""
    _, model, data = load_run(fedins_run.run_dir)
    x = torch.as_tensor(data.test.x[:200])
    with torch.no_grad():
        batched = model.forward_with_match(x, selection="batch")[0]
        single = torch.cat([model.forward_with_match(x[i:i + 1], selection="batch")[0]
                            for i in range(len(x))])
        per_instance = model.forward_with_match(x)[0]
    assert (batched - single).abs().max() > 1e-3
    torch.testing.assert_close(single, per_instance, rtol=0, atol=1e-5)  # B = 1: same thing


def test_evaluate_cli(fedins_run, tmp_path, capsys):
    run = str(fedins_run.run_dir)
    assert evaluate_cli.main([run, "--per-domain", "--slots", "--batch-size", "64"]) == 0
    out = capsys.readouterr().out
    acc = 100 * fedins_run.final_accuracy
    assert f"test accuracy: {acc:.2f} %" in out and "(reproduced)" in out
    assert "domain 3:" in out and "top-2 of 4" in out
    assert evaluate_cli.main([run, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["accuracy"] == pytest.approx(fedins_run.final_accuracy)
    assert len(summary["slot_histogram"]) == 4
    # one-line errors, exit code 2
    assert evaluate_cli.main([str(tmp_path / "missing")]) == 2
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.yaml").write_text((fedins_run.run_dir / "config.yaml").read_text())
    assert evaluate_cli.main([str(tmp_path / "half")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("error: run_dir:") for e in err)
