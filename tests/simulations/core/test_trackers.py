"""``--log tensorboard`` / ``--log mlflow``: what is written is read back with each tool's own reader
(TensorBoard's EventAccumulator, MLflow's client on the run's store) and compared with the run
directory; a missing optional package is a one-line error before anything is written."""

from __future__ import annotations

import math
import sys

import pytest
import yaml

from simulations import run as cli
from simulations.core.results import read_metrics
from simulations.core.trackers import flat_config, numeric_items, parse_names


def test_names_split_dedupe_and_refuse_unknown_ones() -> None:
    assert parse_names(["tensorboard,mlflow", " MLflow "]) == ["tensorboard", "mlflow"]
    with pytest.raises(ValueError, match="log: unknown value ''; allowed: mlflow, tensorboard"):
        parse_names(["tensorboard,"])


def test_config_flattens_to_dotted_scalars_and_rows_to_finite_numbers() -> None:
    assert flat_config({"a": 1, "b": {"c": "x", "d": {}}, "e": None, "f": [1, 2], "g": True}) == {
        "a": 1, "b.c": "x", "b.d": "{}", "e": "null", "f": "[1, 2]", "g": True}
    row = {"round": 3, "phase": "train", "clients": 2, "test_loss": float("nan"), "ok": True, "x": 0.5}
    assert numeric_items(row) == {"clients": 2.0, "x": 0.5}


@pytest.mark.parametrize(("tracker", "module"), [("mlflow", "mlflow"), ("tensorboard", "torch.utils.tensorboard")])
def test_a_missing_package_is_a_one_line_error_naming_the_extra(tracker, module, tmp_path, capsys,
                                                               monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    assert cli.main(["--engine", "inline", "--log", tracker, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fedagg[trackers]" in err and err.startswith(f"error: log: {tracker} ")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_every_row_the_config_and_the_model_are_read_back(tmp_path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from simulations.core.results import load_arrays

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    assert cli.main(["--engine", "inline", "--rounds", "3", "--num-clients", "3", "--model", "mlp",
                     "--local-steps", "2", "--out", str(out), "--no-progress", "--log", "tensorboard",
                     "--log", "mlflow", "dataset_args.num_samples=500", "eval_every=2"]) == 0
    rows = read_metrics(out)
    config = flat_config(yaml.safe_load((out / "config.yaml").read_text()))
    model = load_arrays(out / "model.safetensors")
    columns = [c for c in rows[0] if c not in ("round", "phase")]
    expected = {c: [(r["round"], r[c]) for r in rows if isinstance(r[c], (int, float)) and math.isfinite(r[c])]
                for c in columns}
    assert expected["test_accuracy"] and len(expected["test_accuracy"]) < len(rows)  # NaN cells skipped

    # TensorBoard: scalars per column and round, the config as hparams, one histogram per tensor
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    for column, points in expected.items():
        if not points:
            continue
        got = [(e.step, e.value) for e in acc.Scalars(column)]
        assert [s for s, _ in got] == [s for s, _ in points], column
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6, abs=1e-6), column
    start = plugin_data_pb2.HParamsPluginData.FromString(
        acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    hparams = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    # TensorBoard stores a bool hparam as a number
    assert hparams == pytest.approx({k: float(v) if isinstance(v, bool) else v for k, v in config.items()})
    for name, array in model.items():
        assert acc.Histograms(f"model/{name}")[-1].histogram_value.num == array.size

    # MLflow: one finished run of experiment fedagg in RUN_DIR/mlruns, params = config,
    # a metric history per column, the run directory's files as artifacts
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlruns' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("fedagg").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == out.name
    assert run.data.params == {k: str(v) for k, v in config.items()}
    for column, points in expected.items():
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, column))
        assert [s for s, _ in history] == [s for s, _ in points], column
        assert [v for _, v in history] == pytest.approx([v for _, v in points], rel=1e-9, abs=1e-9), column
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert names == {"model.safetensors", "config.yaml", "metrics.csv", "summary.json"}
    local = client.download_artifacts(run.info.run_id, "model.safetensors", str(tmp_path / "dl"))
    assert open(local, "rb").read() == (out / "model.safetensors").read_bytes()
