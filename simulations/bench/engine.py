"""Benchmark: whole processes of each runner, side by side, against the naive per-client loop.

Three workloads (MNIST-1D, MLP [128, 64], 5 local SGD steps of batch 16), each run as separate
processes one after the other on this machine:

- ``fedau``: the FedAU study's setting (100 clients, Dirichlet α = 0.1, heterogeneous Bernoulli
  availability with mean p = 0.1, evaluation every 5 rounds), 1,000 rounds;
- ``cross-device``: 1,000 clients, 100 drawn per round, FedAvg, 100 rounds;
- ``flower``: 20 clients, all per round, FedAvg, 10 rounds: stock ``run_simulation`` against ours.

Runners: ``naive`` (:mod:`simulations.bench.naive`: plain torch, one client after the other),
``default`` (``python -m simulations.run`` with no ``--engine``: ``auto``), ``ray`` and, on the
last workload, ``flower`` (stock ``flwr.simulation.run_simulation``). Whole process = wall time of
the process (imports, data, start-up, rounds, writing results); round loop = the rounds alone
(``seconds`` in metrics.csv; the naive loop times its own). Run: ``python -m simulations.bench engine``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from simulations.bench.report import machine
from simulations.core.results import read_metrics

_MODEL = {"dataset": "mnist1d", "dataset_args": {"num_samples": 10000}, "test_fraction": 0.0,
          "model": "mlp", "local_steps": 5, "batch_size": 16, "lr": 0.2, "momentum": 0.0, "seed": 0}

WORKLOADS: dict[str, dict[str, Any]] = {
    "fedau": {**_MODEL, "strategy": "fedau", "num_clients": 100, "partition": "dirichlet", "alpha": 0.1,
              "rounds": 1000, "eval_every": 5,
              "participation": {"process": "bernoulli", "probabilities": {
                  "kind": "heterogeneous", "alpha": 0.1, "mean": 0.1, "floor": 0.02}}},
    "cross-device": {**_MODEL, "strategy": "fedavg", "num_clients": 1000, "clients_per_round": 100,
                     "partition": "dirichlet", "alpha": 0.1, "rounds": 100, "eval_every": 5},
    "flower": {**_MODEL, "strategy": "fedavg", "num_clients": 20, "rounds": 10, "eval_every": 1},
}

#: Runners per workload (stock Flower takes minutes per hundred rounds: only on the short one).
RUNNERS = {"fedau": ("naive", "default", "ray"), "cross-device": ("naive", "default", "ray"),
           "flower": ("naive", "default", "flower")}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                               env.get("PYTHONPATH", "")])})
    return env


def run_process(runner: str, w: dict[str, Any], tmp: Path) -> dict[str, float]:
    """One runner on workload ``w`` as a fresh process: whole, loop and start-up seconds, accuracy."""
    if runner == "naive":
        cmd = [sys.executable, "-m", "simulations.bench.naive", json.dumps(w)]
    else:
        out = tmp / runner
        cfg = tmp / f"{runner}.yaml"
        cfg.write_text(json.dumps({**w, "out": str(out)}))  # JSON is YAML
        cmd = [sys.executable, "-m", "simulations.run", "--config", str(cfg), "--no-progress"]
        if runner != "default":
            cmd += ["--engine", runner]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    whole = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{runner} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    if runner == "naive":
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        loop, acc = float(res["loop_seconds"]), float(res["accuracy"])
        engine = "—"
    else:
        rows = read_metrics(tmp / runner)
        loop = float(sum(r["seconds"] for r in rows))
        summary = json.loads((tmp / runner / "summary.json").read_text())
        acc, engine = float(summary["final_test_accuracy"]), str(summary["engine"])
    return {"whole": whole, "loop": loop, "startup": whole - loop, "accuracy": acc, "engine": engine}


def client_rounds(name: str, w: dict[str, Any], tmp: Path) -> int:
    """Client-rounds a workload trained (from the default runner's metrics)."""
    return int(sum(r["clients"] for r in read_metrics(tmp / "default") if r["phase"] == "train"))


def measure(name: str) -> str:
    """One workload's table (markdown), every runner measured now, one after the other."""
    w = WORKLOADS[name]
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        res = {r: run_process(r, w, tmp) for r in RUNNERS[name]}
        cr = client_rounds(name, w, tmp)
    naive = res["naive"]
    lines = [f"### `{name}`: {w['num_clients']} clients, {w['rounds']} rounds, {w['strategy']} "
             f"({cr:,} client-rounds)", "",
             "| runner | engine | whole process (s) | round loop (s) | start-up etc. (s) | "
             "whole / naive | loop ms per client-round | final accuracy |",
             "|---|---|---|---|---|---|---|---|"]
    for runner, r in res.items():
        lines.append(f"| {runner} | {r['engine']} | {r['whole']:.1f} | {r['loop']:.1f} | {r['startup']:.1f} | "
                     f"{r['whole'] / naive['whole']:.2f}× | {1000 * r['loop'] / cr:.2f} | "
                     f"{100 * r['accuracy']:.1f} % |")
    lines.append("")
    d = res["default"]
    lines.append(f"- default / naive, whole process: **{d['whole'] / naive['whole']:.2f}×**; round loop: "
                 f"**{d['loop'] / naive['loop']:.2f}×**")
    if "flower" in res:
        f = res["flower"]
        lines.append(f"- stock run_simulation / default, whole process: **{f['whole'] / d['whole']:.1f}×**; "
                     f"round loop: **{f['loop'] / d['loop']:.1f}×**")
    if "ray" in res:
        lines.append(f"- ray / naive, whole process: {res['ray']['whole'] / naive['whole']:.2f}×; "
                     f"Ray start-up and workers: {res['ray']['startup'] - d['startup']:.1f} s more than default")
    return "\n".join(lines) + "\n"


def run(names: tuple[str, ...] = tuple(WORKLOADS)) -> str:
    """All workloads; returns the markdown section for docs/benchmarks.md."""
    parts = ["## Engines against the naive loop (whole processes)", "",
             f"Machine: {machine()}. Each runner is a fresh process, run one after the other in one "
             "session; nothing else was running. The naive loop and the runners train the same clients "
             "on the same minibatches (FedAU aggregates with its own weights, the naive loop averages).", ""]
    for name in names:
        parts.append(measure(name))
    parts.append(NOTE)
    text = "\n".join(parts)
    print(text)
    return text


NOTE = """### Reading the numbers

- `default` is `python -m simulations.run` without `--engine`: `auto` picks the in-process worker
  (no Ray start-up), which trains each round's clients as batched computations
  (`fedagg.batched`: stacked parameters, one forward/backward for all clients) and passes Flower
  Messages with records encoded without `np.save`/`np.load`.
- `start-up etc.` is everything outside the rounds: imports (torch, Flower), data, model, the first
  evaluation and writing the run directory; for `ray` also starting Ray and its workers.
"""


if __name__ == "__main__":
    run()
