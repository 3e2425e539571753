"""Benchmark: the FedAU weight estimator at cross-device scale.

100,000 clients, 1,000 rounds, Bernoulli participation with ``p_n ~ U[0.05, 0.15]`` (mean 0.1, so
about 10,000 participants per round), ``K = ∞``. Times the participation process
(:func:`fedagg.participation.build_process`), :meth:`fedagg.fedau.FedAUWeights.step` and
:meth:`~fedagg.fedau.FedAUWeights.weights`, and reports the size of the estimator state (three
``(N,)`` int64 arrays) and the peak transient allocation of one step (tracemalloc, separate pass).

Run: ``python -m simulations.bench.fedau [--out section.md]``. :func:`run` returns (and prints) a
markdown section; nothing here is asserted.
"""

from __future__ import annotations

import os
import platform
import time
import tracemalloc

import numpy as np

from fedagg.fedau import FedAUWeights
from fedagg.participation import build_process, participation_rng
from simulations.cli import Parser


def _mib(nbytes: float) -> str:
    return f"{nbytes:,.0f} B ({nbytes / 2**20:.2f} MiB)"


def run(
    out_md: str | None = None, *, num_clients: int = 100_000, rounds: int = 1_000, seed: int = 0
) -> str:
    """Run the benchmark; print and return a markdown section (also written to ``out_md``)."""
    p = np.random.default_rng(seed).uniform(0.05, 0.15, num_clients)

    # pass 1: participation process alone (legacy binomial stream, reference order)
    proc = build_process("bernoulli", p, participation_rng(seed))
    traces: list[np.ndarray] = []
    t0 = time.perf_counter()
    for t in range(rounds):
        traces.append(proc.available(t))
    t_proc = time.perf_counter() - t0
    participants = np.array([ids.size for ids in traces])

    # pass 2: the estimator on the recorded trace
    est = FedAUWeights(num_clients)
    t0 = time.perf_counter()
    for t, ids in enumerate(traces):
        est.step(t, ids)
    t_step = time.perf_counter() - t0

    t0 = time.perf_counter()
    reps = 20
    for _ in range(reps):
        w = est.weights()
    t_view = (time.perf_counter() - t0) / reps

    # pass 3: peak transient allocation of one step (tracemalloc slows numpy, so separately)
    est_mem = FedAUWeights(num_clients)
    tracemalloc.start()
    peak = 0
    for t, ids in enumerate(traces[:20]):
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        est_mem.step(t, ids)
        peak = max(peak, tracemalloc.get_traced_memory()[1] - base)
    tracemalloc.stop()

    seen = est.state_dict()["interval_count"] >= 20
    ratio = float(np.mean(w[seen] * p[seen])) if seen.any() else float("nan")
    rows = [
        ("clients N / rounds", f"{num_clients:,} / {rounds:,}"),
        (
            "participants per round (mean, min–max)",
            f"{participants.mean():,.0f} ({participants.min():,}–{participants.max():,})",
        ),
        (
            "participation process `available` (bernoulli)",
            f"{t_proc:.2f} s total, {1e3 * t_proc / rounds:.2f} ms/round",
        ),
        (
            "estimator `step`",
            f"{t_step:.2f} s total, {1e3 * t_step / rounds:.3f} ms/round, "
            f"{1e9 * t_step / participants.sum():.0f} ns/participation",
        ),
        ("`weights()` view (all N)", f"{1e3 * t_view:.2f} ms"),
        ("estimator state (S, M, last: 3 × (N,) int64)", _mib(est.state_nbytes)),
        ("peak transient allocation of one `step`", _mib(peak)),
        (
            "mean ω_n·p_n (clients with ≥ 20 intervals)",
            f"{ratio:.4f} over {int(seen.sum()):,} clients (1 = unbiased)",
        ),
    ]
    lines = [
        "## FedAU weight estimator",
        "",
        f"`fedagg.fedau.FedAUWeights` (lazy S/M/last state, K = ∞), Bernoulli participation with "
        f"p_n ~ U[0.05, 0.15], seed {seed}.",
        "",
        "| quantity | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"numpy {np.__version__}; single-threaded; wall-clock `time.perf_counter`.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if out_md is not None:
        with open(out_md, "w", encoding="utf-8") as fh:
            fh.write(text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="write the markdown section to this file")
    parser.add_argument("--clients", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=1_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    run(args.out, num_clients=args.clients, rounds=args.rounds, seed=args.seed)


if __name__ == "__main__":
    main()
