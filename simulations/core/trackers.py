"""Experiment trackers: a run's metrics, config and final model also go to TensorBoard / MLflow.

``python -m simulations.run --log tensorboard --log mlflow`` (or ``--log tensorboard,mlflow``; the
Flower App's ``log`` key) writes, besides the run directory:

- ``tensorboard``: event files in ``RUN_DIR/tensorboard`` (``tensorboard --logdir RUN_DIR``). Every
  numeric column of every metrics row is a scalar (tag = column, step = round); the config is the
  run's hparams (dotted keys) and a text ``config``; the final model is one histogram per tensor
  (TensorBoard has no artifact store) and the summary a text ``summary``.
- ``mlflow``: one MLflow run in experiment ``fedagg`` of the store ``MLFLOW_TRACKING_URI``, by default
  a local SQLite store ``RUN_DIR/mlruns/mlflow.db`` with artifacts in ``RUN_DIR/mlruns/artifacts``
  (``mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlruns/mlflow.db``). Every numeric column is a
  metric (step = round), the config the run's params (dotted keys), and the final model, config,
  metrics and summary files its artifacts.

Both need the optional extra ``fedagg[trackers]``; without it ``--log`` fails before the run with a
one-line error naming the extra. NaN cells (rounds without evaluation) are not logged. Trackers open
at the first metrics row, so invalid input leaves nothing of theirs on disk.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import yaml

from fedagg.errors import ConfigError, unknown_name

if TYPE_CHECKING:
    from simulations.core.config import RunConfig
    from simulations.core.runner import RunResult, Simulation

#: Tracker name → (module it needs, the package that provides it).
TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("torch.utils.tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow-skinny"),
}
#: The optional dependency group that installs every tracker.
EXTRA = "trackers"
#: MLflow experiment that runs go to.
EXPERIMENT = "fedagg"
#: Files of the run directory logged as MLflow artifacts (when present).
ARTIFACTS = ("model.safetensors", "config.yaml", "metrics.csv", "summary.json")


def parse_names(values: Iterable[str]) -> list[str]:
    """``["tensorboard,mlflow", "mlflow"]`` → ``["tensorboard", "mlflow"]`` (order kept, no repeats)."""
    names: list[str] = []
    for value in values:
        for name in value.split(","):
            name = name.strip().lower()
            if name not in TRACKERS:
                raise unknown_name("log", name, TRACKERS)
            if name not in names:
                names.append(name)
    return names


def check_installed(names: Sequence[str]) -> None:
    """Import what each tracker needs; a missing package is a ConfigError naming the extra."""
    for name in names:
        module, package = TRACKERS[name]
        try:
            importlib.import_module(module)
        except ImportError:
            raise ConfigError("log", f"{name} needs the package {package!r}: "
                              f"pip install 'fedagg[{EXTRA}]'") from None


def flat_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """Nested config → ``{dotted key: scalar}``; lists, None and empty mappings become JSON text."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flat_config(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out


def numeric_items(row: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric cells of a metrics row, except ``round`` (the step)."""
    out = {}
    for key, value in row.items():
        if key == "round" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


class Tracker(Protocol):
    """One tracker of a run."""

    def log_row(self, row: Mapping[str, Any]) -> None: ...

    def finish(self, result: RunResult) -> None: ...

    def close(self, failed: bool) -> None: ...


class TensorBoardTracker:
    """Event files in ``log_dir`` (see module docstring)."""

    def __init__(self, log_dir: Path, config: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(str(log_dir))
        # hparams: the config, with the server's test metrics as the session's metrics
        for summary in hparams(flat_config(config), {"test_accuracy": float("nan"), "test_loss": float("nan")}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", _code(yaml.safe_dump(dict(config), sort_keys=False)), 0)

    def log_row(self, row: Mapping[str, Any]) -> None:
        step = int(row["round"])
        for key, value in numeric_items(row).items():
            self.writer.add_scalar(key, value, step)

    def finish(self, result: RunResult) -> None:
        step = int(result.rows[-1]["round"]) if result.rows else 0
        for name, array in result.arrays.items():
            self.writer.add_histogram(f"model/{name}", array, step)
        self.writer.add_text("summary", _code(json.dumps(result.summary, indent=2, default=str)), step)

    def close(self, failed: bool) -> None:
        self.writer.close()


class MLflowTracker:
    """One MLflow run (see module docstring); ``store_dir`` is the default local store."""

    def __init__(self, store_dir: Path, config: Mapping[str, Any], run_name: str) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # no "creating tables" lines
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        artifacts = None
        if not uri:
            store_dir.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{store_dir.resolve() / 'mlflow.db'}"
            artifacts = (store_dir.resolve() / "artifacts").as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        exp_id = (experiment.experiment_id if experiment is not None
                  else self.client.create_experiment(EXPERIMENT, artifact_location=artifacts))
        self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
        params = [Param(k, str(v)) for k, v in flat_config(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log_row(self, row: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        step = int(row["round"])
        metrics = [Metric(k, v, now, step) for k, v in numeric_items(row).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, result: RunResult) -> None:
        for name in ARTIFACTS:
            path = Path(result.run_dir) / name
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class Trackers:
    """The trackers of one run, opened at its first metrics row.

    ``names`` are checked at once (known, installed); ``attach(sim)`` hooks them to the runner's
    ``on_round`` (after any callback already there) and replays the rows a resumed run restored;
    ``finish(result)`` logs the final model and closes them; ``close()`` closes them after a failure.
    """

    def __init__(self, names: Sequence[str], run_dir: Path, cfg: RunConfig) -> None:
        check_installed(names)
        self.names = list(names)
        self.run_dir = Path(run_dir)
        self.config = cfg.model_dump(mode="json")  # trackers log it as flat params and text
        self._open: list[Tracker] | None = None
        self._closed = False

    def attach(self, sim: Simulation) -> None:
        if not self.names:
            return
        before = sim.on_round

        def on_round(row: dict[str, Any]) -> None:
            if before is not None:
                before(row)
            self.log_row(row)

        sim.on_round = on_round
        for row in sim.writer.rows:  # a resumed run's completed rounds
            self.log_row(row)

    def _trackers(self) -> list[Tracker]:
        if self._closed:
            return []
        if self._open is None:
            self._open = []
            for name in self.names:
                if name == "tensorboard":
                    self._open.append(TensorBoardTracker(self.run_dir / "tensorboard", self.config))
                elif name == "mlflow":
                    self._open.append(MLflowTracker(self.run_dir / "mlruns", self.config, self.run_dir.name))
        return self._open

    def log_row(self, row: Mapping[str, Any]) -> None:
        for tracker in self._trackers():
            tracker.log_row(row)

    def finish(self, result: RunResult) -> None:
        for tracker in self._trackers():
            tracker.finish(result)
        self._close(failed=False)

    def close(self) -> None:
        """Close what is still open (a run that failed or was interrupted)."""
        self._close(failed=True)

    def _close(self, failed: bool) -> None:
        if not self._closed:
            self._closed = True
            for tracker in self._open or []:
                tracker.close(failed)


def _code(text: str) -> str:
    """Text as a Markdown code block (TensorBoard renders text summaries as Markdown)."""
    return "```\n" + text + "```"
