"""Run one simulation: environment + strategy + engine + results.

:class:`Simulation` holds the server side of a run (strategy, environment, evaluation, results) and
:meth:`Simulation.serve` is the round loop. The loop is the same for every engine: :meth:`Simulation.run`
hands it to the engine (``engine.run(cfg, runtime, serve)``, :mod:`simulations.core.engine`), which calls
it with its grid: our :class:`~simulations.core.engine.sim_grid.SimGrid` on ``inline`` and ``ray``,
Flower's own grid inside the ``ServerApp`` that ``flwr.simulation.run_simulation`` drives on
``flower``. The runner imports the engines; they never import it.

Random streams (all from ``seed``): the partition, then the participation probabilities and the
availability process consume one ``RandomState(seed)`` in the IBM/fedau order; client selection,
local training and attacks use generators keyed by ``(seed, purpose, round, client)``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

import strategies
from fedagg.data import FederatedData, load_federated
from fedagg.errors import ConfigError
from fedagg.participation import build_probabilities, build_process
from fedagg.training import evaluate, load_numpy_state, state_to_numpy
from simulations.core.byzantine import build_corruption
from simulations.core.checkpoint import Checkpoint, read_latest, write_checkpoint
from simulations.core.client_app import ClientRuntime, make_client_app
from simulations.core.config import RunConfig, config_changes, dump_yaml, load_config
from simulations.core.engine import choose_engine, get_engine
from simulations.core.environment import EnvironmentGrid
from simulations.core.results import RunWriter, save_arrays
from simulations.core.simtime import SimClock
from strategies.arrays import to_numpy, to_record

log = logging.getLogger("fedagg")


@dataclasses.dataclass
class RunResult:
    """What a finished run returns (also on disk in ``run_dir``)."""

    run_dir: Path
    arrays: dict[str, np.ndarray]
    rows: list[dict[str, Any]]
    summary: dict[str, Any]

    @property
    def final_accuracy(self) -> float:
        return float(self.summary["final_test_accuracy"])


class RunError(RuntimeError):
    """The run cannot go on (e.g. too few clients replied); the message says why."""


class Simulation:
    """The server side of one run (see module docstring).

    ``resume=True`` continues the run in ``cfg.out`` from its newest intact checkpoint; ``cfg`` must
    equal the run's ``config.yaml`` but for ``rounds``. ``overwrite=True`` clears the run directory
    first. The directory is locked from the end of ``__init__`` until :meth:`run` returns.
    """

    def __init__(self, cfg: RunConfig, *, overwrite: bool = False, progress: bool = False,
                 on_round: Callable[[dict[str, Any]], None] | None = None, resume: bool = False) -> None:
        self.run_dir = cfg.run_dir()
        self.cfg = cfg = cfg.model_copy(update={"out": str(self.run_dir)})
        self.progress = progress
        self.on_round = on_round
        RunWriter.check(self.run_dir, overwrite=overwrite, resume=resume)
        self._stored_rounds = cfg.rounds  # of config.yaml; a resume may change rounds
        self.checkpoint: Checkpoint | None = self._resume_point() if resume else None
        stream = np.random.RandomState(cfg.seed % 2**32)
        self.data: FederatedData = load_federated(
            cfg.dataset, cfg.num_clients, cfg.seed, partition=cfg.partition,
            partition_args=cfg.resolved_partition_args(), dataset_args=cfg.dataset_args,
            test_fraction=cfg.test_fraction, rng=stream,
        )
        self.runtime = ClientRuntime(cfg)
        self.runtime.set_data(self.data)
        self.probabilities, self.participation = self._participation(stream)
        self.strategy = strategies.build_run(cfg, **self._offered())
        self.corrupt = build_corruption(cfg)
        self.runtime.model()  # builds the model now, so bad model_args fail before any file is written
        self.test_x = torch.as_tensor(self.data.test.x, device=self.runtime.device)
        self.test_y = torch.as_tensor(self.data.test.y, device=self.runtime.device)
        # Everything above validated the input; only now does anything touch the disk.
        self.writer = RunWriter(self.run_dir, overwrite=overwrite, resume=resume)
        try:
            if self.checkpoint is None or self._stored_rounds != cfg.rounds:  # (re)write it
                self.writer.write_config(dump_yaml(cfg))
            if self.checkpoint is not None:
                self._restore(self.checkpoint)
        except BaseException:
            self.writer.close()
            raise

    def _resume_point(self) -> Checkpoint:
        """The checkpoint to continue from; refuses a config that differs from the run's
        ``config.yaml`` in anything but ``rounds``, and ``rounds`` below the checkpoint's round."""
        stored = load_config(self.run_dir / "config.yaml", {"out": str(self.run_dir)})
        changed = [k for k, _, _ in config_changes(self.cfg.model_dump(mode="json"),
                                                   stored.model_dump(mode="json"))
                   if k not in ("out", "rounds")]
        if changed:
            raise ConfigError("resume", f"the config differs from {self.run_dir / 'config.yaml'} "
                              f"in {', '.join(changed)}; resume with the run's own config "
                              "(only rounds may change)")
        self._stored_rounds = stored.rounds
        ckpt = read_latest(self.run_dir)
        if self.cfg.rounds < ckpt.round:
            raise ConfigError("resume", f"rounds={self.cfg.rounds} is below the checkpoint's round "
                              f"{ckpt.round}; pass rounds >= {ckpt.round}")
        return ckpt

    def _restore(self, ckpt: Checkpoint) -> None:
        """Put strategy, participation process and metrics back to the checkpoint's state."""
        if hasattr(self.strategy, "load_state_dict"):
            self.strategy.load_state_dict(ckpt.strategy_state)
        if self.participation is not None and ckpt.process_state is not None:
            self.participation.load_state_dict(ckpt.process_state)
        self.writer.rows = []
        for row in ckpt.rows:
            self.writer.log_round(row)

    # ------------------------------------------------------------------ set-up
    def _participation(self, stream: np.random.RandomState) -> tuple[np.ndarray, Any]:
        part = self.cfg.participation
        n = self.cfg.num_clients
        if part.process == "always":
            return np.ones(n), None
        p = build_probabilities(part.probabilities, n, histograms=self.data.label_histograms(), rng=stream)
        return p, build_process(part.process, p, stream, first_round=1, **part.args)

    def _offered(self) -> dict[str, Any]:
        """What the environment offers to strategies that declare it (:func:`strategies.build_run`):
        ``num_byzantine`` (robust rules: the default ``f``), ``probabilities`` (true p_n, for the
        known-p baseline) and ``validation`` (a server-side validation split, for soups)."""
        offered: dict[str, Any] = {"num_byzantine": self.cfg.num_byzantine,
                                   "probabilities": self.probabilities.tolist()}
        if strategies.REGISTRY.entry(self.cfg.strategy).param("validation") is not None:
            offered["validation"] = self.validation()
        return offered

    def validation(self) -> ServerValidation:
        """Server validation data: the union of the clients' held-out parts (never the test set)."""
        idx = np.concatenate([np.asarray(t, dtype=np.int64) for t in self.data.client_test])
        val = self.data.pool.subset(np.sort(idx))
        return ServerValidation(val.x, val.y, self.runtime)

    def available(self, server_round: int) -> list[int]:
        """Clients available in ``server_round`` (all of them without a participation process)."""
        if self.participation is None:
            return list(range(self.cfg.num_clients))
        return [int(c) for c in self.participation.available(server_round)]

    def initial_arrays(self) -> ArrayRecord:
        return to_record(state_to_numpy(self.runtime.model()))

    def train_config(self) -> ConfigRecord:
        c = self.cfg
        return ConfigRecord({"lr": c.lr, "local-steps": c.local_steps, "batch-size": c.batch_size,
                             "momentum": c.momentum, "weight-decay": c.weight_decay})

    def reported(self, arrays: ArrayRecord) -> ArrayRecord:
        """The model the server evaluates and saves: ``strategy.server_model(arrays)`` for a
        strategy that reports another model than the one it broadcasts (temporal-soup reports its
        running mean of globals), else the global model ``arrays`` itself."""
        fn = getattr(self.strategy, "server_model", None)
        return fn(arrays) if callable(fn) else arrays

    def evaluate(self, arrays: ArrayRecord) -> tuple[float, float]:
        """Server test loss and accuracy of the global model ``arrays``."""
        model = self.runtime.model()
        load_numpy_state(model, to_numpy(arrays), strict=False)
        return evaluate(model, self.test_x, self.test_y)

    # ------------------------------------------------------------------ the round loop
    def serve(self, grid: Grid, node_of_client: dict[int, int] | None = None) -> ArrayRecord:
        """Run all rounds on ``grid``; return the final global model."""
        cfg = self.cfg
        clock = SimClock(cfg, self.runtime.profiles)
        env = EnvironmentGrid(grid, cfg.num_clients, node_of_client=node_of_client,
                              available=self.available, corrupt=self.corrupt, clock=clock)
        if self.checkpoint is None:
            first = 1
            arrays = self.initial_arrays()
            loss, acc = self.evaluate(self.reported(arrays))
            self._log({"round": 0, "phase": "init", "clients": 0, "train_loss": float("nan"),
                       "test_loss": loss, "test_accuracy": acc, "seconds": 0.0, "sim_time": 0.0})
        else:
            first = self.checkpoint.round + 1
            # safetensors returns names sorted; keep the model's tensor order, which fixes the
            # layout of flat update vectors (per-client memories, Flag's init) across a resume
            order = list(self.initial_arrays().keys())
            arrays = to_record({k: self.checkpoint.arrays[k] for k in order})
            clock.time = float(self.checkpoint.rows[-1].get("sim_time", 0.0)) if self.checkpoint.rows else 0.0
        bar = _Progress(cfg.rounds, enabled=self.progress)
        bar.advance(first - 1, float("nan"))
        try:
            for rnd in range(first, cfg.rounds + 1):
                t0 = time.perf_counter()
                available = env.begin_round(rnd)
                messages = self.strategy.configure_train(rnd, arrays, self.train_config(), env)
                replies = env.send_and_receive(messages, timeout=cfg.round_timeout)
                new_arrays, metrics = self.strategy.aggregate_train(rnd, replies)
                if new_arrays is not None:
                    arrays = new_arrays
                row: dict[str, Any] = {"round": rnd, "phase": "train"}
                extra = dict(metrics.items()) if metrics is not None else {}
                row["clients"] = int(extra.pop("clients", env.last_exchange.replies))
                row["train_loss"] = float(extra.pop("train_loss", float("nan")))
                if cfg.evaluates(rnd):
                    row["test_loss"], row["test_accuracy"] = self.evaluate(self.reported(arrays))
                else:
                    row["test_loss"] = row["test_accuracy"] = float("nan")
                if cfg.evaluate_clients > 0:
                    row.update(self._federated_evaluate(rnd, arrays, env))
                row["seconds"] = time.perf_counter() - t0
                ex = env.last_exchange
                row.update({"available": len(available), "sent": ex.sent, "timeouts": ex.timeouts,
                            "stragglers": ex.stragglers, "sim_seconds": ex.sim_seconds,
                            "sim_time": clock.time, "bytes_down": ex.bytes_down, "bytes_up": ex.bytes_up})
                if self.corrupt is not None:
                    row["byzantine"] = self.corrupt.counts.get(rnd, 0)
                if cfg.profiles:  # slowest client of each profile (simulated seconds)
                    row.update({f"sim_seconds_{k}": v for k, v in sorted(ex.profile_seconds.items())})
                restarts = getattr(grid, "worker_restarts", None)
                if restarts is not None:
                    row["worker_restarts"] = restarts()
                row.update(extra)
                if self._stops(row) and not cfg.evaluates(rnd):
                    # the run stops here: test the model it ends with (the last row says where
                    # it stood, e.g. after a divergence, not the last scheduled evaluation)
                    row["test_loss"], row["test_accuracy"] = self.evaluate(self.reported(arrays))
                self._log(row)
                bar.advance(rnd, row["test_accuracy"])
                self._check_replies(rnd, row)
                if cfg.checkpoint_every and rnd % cfg.checkpoint_every == 0:
                    self.save_checkpoint(rnd, arrays)
        finally:
            bar.close()
            self.writer.flush()  # the completed rounds' metrics, also after an interruption
        return arrays

    def _stops(self, row: dict[str, Any]) -> bool:
        """Whether messages went out but fewer than ``min_replies`` usable replies came back."""
        return int(row.get("sent", 0)) > 0 and int(row.get("clients", 0)) < self.cfg.min_replies

    def _check_replies(self, rnd: int, row: dict[str, Any]) -> None:
        """Fail the run when messages went out but fewer than ``min_replies`` usable replies came back."""
        sent, usable = int(row.get("sent", 0)), int(row.get("clients", 0))
        if self._stops(row):
            raise RunError(
                f"round {rnd}: {usable} usable replies from {sent} clients (min_replies="
                f"{self.cfg.min_replies}; failures {row.get('failures', 0)}, timeouts "
                f"{row.get('timeouts', 0)}, rejected {row.get('rejected', 0)}); "
                f"completed rounds are in {self.run_dir}"
            )

    def save_checkpoint(self, rnd: int, arrays: ArrayRecord) -> None:
        """Write the state after round ``rnd`` to ``checkpoints/`` (atomically)."""
        state = self.strategy.state_dict() if hasattr(self.strategy, "state_dict") else {}
        proc = self.participation.state_dict() if self.participation is not None else None
        ckpt = Checkpoint(rnd, to_numpy(arrays), dict(state), proc, list(self.writer.rows))
        self.writer.flush()
        write_checkpoint(self.run_dir, ckpt, keep=self.cfg.keep_checkpoints)

    def _federated_evaluate(self, rnd: int, arrays: ArrayRecord, env: EnvironmentGrid) -> dict[str, float]:
        rng = np.random.default_rng([self.cfg.seed, rnd, 7])
        ids = env.get_node_ids()
        k = max(1, int(round(self.cfg.evaluate_clients * len(list(ids)))))
        chosen = sorted(rng.choice(list(ids), size=min(k, len(list(ids))), replace=False).tolist())
        content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": rnd})})
        msgs = [Message(content, int(c), MessageType.EVALUATE) for c in chosen]
        replies = [m for m in env.send_and_receive(msgs, timeout=self.cfg.round_timeout) if not m.has_error()]
        agg = strategies.base.mean_metrics(replies)
        return {"client_test_loss": agg.get("test_loss", float("nan")),
                "client_test_accuracy": agg.get("test_accuracy", float("nan"))}

    def _log(self, row: dict[str, Any]) -> None:
        self.writer.log_round(row)
        if self.on_round is not None:
            self.on_round(row)

    # ------------------------------------------------------------------ engines
    def run(self, grid: Grid | None = None, node_of_client: dict[int, int] | None = None) -> RunResult:
        """Run on the configured engine and write the results; release the directory's lock. A
        Flower ServerApp passes its own ``grid`` (and ``node_of_client``, see :meth:`serve`) to run
        the round loop on it instead."""
        try:
            return self._run(grid, node_of_client)
        finally:
            self.writer.close()

    def _run(self, grid: Grid | None, node_of_client: dict[int, int] | None) -> RunResult:
        t0 = time.perf_counter()
        self.engine, why = ("flower", "a Flower ServerApp's grid") if grid is not None else choose_engine(self.cfg)
        if self.progress:
            print(f"engine: {self.engine} ({why})", file=sys.stderr)
        try:
            if grid is None:
                arrays = get_engine(self.engine).run(self.cfg, self.runtime, self.serve)
            else:
                arrays = self.serve(grid, node_of_client)
        except ConfigError:
            self._discard_if_empty()  # the engine refused the input before round 1
            raise
        final = to_numpy(self.reported(arrays))
        self.writer.write_model(final, metadata={"fedagg": json.dumps({"strategy": self.cfg.strategy, "seed": self.cfg.seed})})
        state = self.strategy.state_dict() if hasattr(self.strategy, "state_dict") else {}
        if state:
            save_arrays(self.run_dir / "strategy_state.safetensors",
                        {k: np.asarray(v) for k, v in state.items()})
        rows = self.writer.rows
        last = rows[-1]
        summary = {
            "strategy": self.cfg.strategy, "dataset": self.cfg.dataset, "seed": self.cfg.seed,
            "engine": self.engine, "rounds": self.cfg.rounds, "num_clients": self.cfg.num_clients,
            "final_test_accuracy": last["test_accuracy"], "final_test_loss": last["test_loss"],
            "best_test_accuracy": max(r["test_accuracy"] for r in rows if r["test_accuracy"] == r["test_accuracy"]),
            "wall_seconds": time.perf_counter() - t0,
            "model_parameters": int(sum(v.size for v in final.values())),
        }
        self.writer.write_summary(summary)
        return RunResult(self.run_dir, final, rows, summary)

    def _discard_if_empty(self) -> None:
        if not self.writer.rows:
            (self.run_dir / "config.yaml").unlink(missing_ok=True)
            self.writer.close()
            try:
                self.run_dir.rmdir()
            except OSError:
                pass

    def client_app(self) -> Any:
        """The run's ClientApp; it shares this process's runtime (data, model) when run inline."""
        return make_client_app(self.cfg, runtime=self.runtime)


@dataclasses.dataclass
class ServerValidation:
    """A server-held validation split and how to score a global model on it.

    ``x: (n, ...)``, ``y: (n,)`` numpy arrays; ``score(arrays)`` → accuracy in [0, 1] and
    ``loss(arrays)`` → mean cross-entropy of the model with federated state ``arrays``;
    ``model()`` is the server's model instance (load weights with
    :func:`fedagg.training.load_numpy_state`).
    """

    x: np.ndarray
    y: np.ndarray
    runtime: ClientRuntime

    def model(self) -> torch.nn.Module:
        return self.runtime.model()

    def _eval(self, arrays: dict[str, np.ndarray]) -> tuple[float, float]:
        model = self.runtime.model()
        load_numpy_state(model, arrays, strict=False)
        dev = self.runtime.device
        return evaluate(model, torch.as_tensor(self.x, device=dev), torch.as_tensor(self.y, device=dev))

    def score(self, arrays: dict[str, np.ndarray]) -> float:
        return self._eval(arrays)[1]

    def loss(self, arrays: dict[str, np.ndarray]) -> float:
        return self._eval(arrays)[0]


class _Progress:
    """A rich progress bar over rounds showing the latest accuracy (no-op when disabled)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self._bar = None
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._bar = Progress(TextColumn("[bold]round"), MofNCompleteColumn(), BarColumn(),
                                 TextColumn("{task.fields[acc]}"), TimeElapsedColumn(), transient=False)
            self._bar.start()
            self._task = self._bar.add_task("rounds", total=total, acc="")

    def advance(self, rnd: int, acc: float) -> None:
        if self._bar is not None:
            text = f"test acc {100 * acc:5.1f} %" if acc == acc else ""
            self._bar.update(self._task, completed=rnd, acc=text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
