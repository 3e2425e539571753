"""Benchmark: many clients on one machine.

1,000 and 10,000 clients, 10 % trained per round, MNIST-1D (large enough for ~5 samples per client),
the MLP, 5 local steps, FedAvg, on the Ray engine. Reports, per population size:

- time per round (mean over rounds 2…R; round 1 includes worker warm-up);
- the server process's peak resident memory (``ru_maxrss``);
- what an idle client costs the server: its partition index arrays (bytes per client), its Flower
  context state (none unless the ClientApp stores some) — and that no model exists per client: the
  server holds one model instance whatever the population (counted with ``gc``).

Run: ``python -m simulations.bench scale``.
"""

from __future__ import annotations

import gc
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from simulations.bench.report import machine

SIZES = (1_000, 10_000)


def one(num_clients: int, rounds: int, engine: str) -> dict[str, Any]:
    from simulations.core.config import load_config
    from simulations.core.runner import Simulation

    samples = max(5_000, 6 * num_clients)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, {
            "num_clients": num_clients, "clients_per_round": num_clients // 10, "rounds": rounds,
            "model": "mlp", "local_steps": 5, "lr": 0.05, "momentum": 0.0,  # the workload as documented
            "engine": engine, "dataset_args": {"num_samples": samples},
            "out": str(Path(tmp) / "run"),
        })
        t0 = time.perf_counter()
        sim = Simulation(cfg)
        setup = time.perf_counter() - t0
        idx_bytes = sum(a.nbytes + sys.getsizeof(a) for a in [*sim.data.client_train, *sim.data.client_test])
        res = sim.run()
        models = sum(1 for o in gc.get_objects() if type(o).__name__ == "MLP")  # no isinstance: lazy torch objects warn
        per_round = [r["seconds"] for r in res.rows[2:]]
    return {
        "clients": num_clients, "per_round": float(np.mean(per_round)), "first_round": res.rows[1]["seconds"],
        "setup": setup, "samples": samples, "idle_bytes": idx_bytes / num_clients,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "server_models": models, "accuracy": res.final_accuracy,
    }


def run(out_md: str | None = None, sizes: tuple[int, ...] = SIZES, rounds: int = 6,
        engine: str = "ray") -> str:
    """Run each population size (smallest first: peak memory is cumulative); return markdown."""
    import logging

    logging.getLogger("flwr").setLevel(logging.WARNING)
    results = [one(n, rounds, engine) for n in sorted(sizes)]
    lines = [
        "## Scale",
        "",
        f"FedAvg, MLP, 5 local steps, 10 % of clients per round, {rounds} rounds, engine `{engine}`, "
        f"MNIST-1D with 6 samples per client (at least 5,000). Machine: {machine()}.",
        "",
        "| clients | per round | s / round (rounds 2…) | round 1 (warm-up) s | set-up s | server peak RSS (MiB) "
        "| idle client cost (bytes) | server model instances |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['clients']:,} | {r['clients'] // 10:,} | {r['per_round']:.2f} | {r['first_round']:.2f} | "
            f"{r['setup']:.1f} | {r['peak_rss_mib']:.0f} | {r['idle_bytes']:.0f} | {r['server_models']} |"
        )
    lines += [
        "",
        "- An idle client costs the server only its partition indices (train + test index arrays); "
        "no model, optimiser or tensor exists per client: one model instance serves the server, one "
        "per worker serves every client it runs, and workers cache the data tensors of at most "
        "256 recently used clients.",
        "- Peak RSS is cumulative over the process (the larger population runs second).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if out_md:
        Path(out_md).write_text(text)
    return text


if __name__ == "__main__":
    run()
