"""Benchmark: time per call of every robust aggregation rule at n = 15 and d ∈ {10⁵, 10⁶}.

For each d, the updates are 12 honest N(0.1, 1) vectors and 3 ``random`` (U[0, 1)) attackers,
float64 ``(15, d)``; rules that take ``f`` get ``f = 3``. Every rule is timed on the same matrix
(best of ``repeats`` calls after one warm-up call, one BLAS thread, so the ratios do not depend on
how busy the other core is). Reported: milliseconds per call and the ratio to ``mean``.

The Flag Aggregator gets a closer look: the fast path (``solver="gram"``: one ``X Xᵀ``, one
``X R`` with the ``d × m`` random init, an eigendecomposition of a ``p × p`` matrix and one final
``αᵀ X``) against the straightforward IRLS (``solver="svd"``: the explicit ``d × p`` column-scaled
matrix and ``numpy.linalg.svd``), their largest output difference (relative to the output norm),
and the cost of the fast path's two ``(p, d)``-sized products alone (``X Xᵀ``, ``X R``), the floor
of any implementation of the reference with its random init.

Run: ``python -m simulations.bench aggregators`` (writes the section into docs/benchmarks.md) or
``python -m simulations.bench.aggregators``. :func:`run` prints and returns a markdown section;
nothing here is asserted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from fedagg.aggregators import build
from fedagg.aggregators._common import gram
from simulations.cli import Parser

N, F = 15, 3
#: (label, aggregator name, params). Rules that do not declare f are built without it.
RULES: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("mean", "mean", {}),
    ("median", "median", {}),
    ("trimmed-mean", "trimmed-mean", {"f": F}),
    ("meamed", "meamed", {"f": F}),
    ("phocas", "phocas", {"f": F}),
    ("krum", "krum", {"f": F}),
    ("multikrum", "multikrum", {"f": F}),
    ("bulyan (paper)", "bulyan", {"f": F}),
    ("bulyan (flower)", "bulyan", {"f": F, "variant": "flower"}),
    ("bulyan (garfield)", "bulyan", {"f": F, "variant": "garfield"}),
    ("geomedian", "geomedian", {}),
    ("centered-clipping", "centered-clipping", {"tau": 1.0}),
    ("nnm+trimmed-mean", "nnm+trimmed-mean", {"f": F}),
    ("flag (fast path)", "flag", {}),
    ("flag, init svd", "flag", {"init": "svd"}),
)


def updates(d: int, seed: int = 0) -> np.ndarray:
    """``(15, d)`` float64: 12 honest N(0.1, 1) rows, then 3 U[0, 1) attackers."""
    rng = np.random.default_rng(seed)
    X = rng.normal(0.1, 1.0, size=(N, d))
    X[N - F:] = rng.random((F, d))
    return X


def best_time(fn: Callable[[], Any], repeats: int) -> float:
    """Best wall time (seconds) of ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _limit_threads() -> Any:
    try:
        from threadpoolctl import threadpool_limits

        return threadpool_limits(1)
    except ImportError:  # pragma: no cover - optional
        return None


def _bench_dim(d: int, reps: int, svd_repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds per call of every rule on ``updates(d)``, and the Flag Aggregator details."""
    X = updates(d)
    times = {}
    for label, name, params in RULES:
        rule = build(name, **params)
        times[label] = best_time(lambda rule=rule: rule(X), reps)
        print(f"d={d:>9,} {label:<20} {1e3 * times[label]:10.2f} ms", flush=True)
    fast = build("flag")
    slow = build("flag", solver="svd")
    y_fast, y_slow = fast(X), slow(X)
    R = fast._initial_basis(d, (N + 1) // 2, X.dtype)[0]  # the cached d × m init
    X32 = X.astype(np.float32)
    fa = {
        "svd": best_time(lambda: slow(X), svd_repeats),
        "diff": float(np.abs(y_fast - y_slow).max() / np.linalg.norm(y_slow)),
        "gram": best_time(lambda: gram(X), reps),
        "xr": best_time(lambda: X @ R, reps),
        "f32": best_time(lambda: fast(X32), reps),
        "mean32": best_time(lambda: X32.mean(axis=0), reps),
    }
    print(f"d={d:>9,} flag svd path {1e3 * fa['svd']:10.1f} ms; max |fast − svd| / ‖svd‖ = "
          f"{fa['diff']:.1e}", flush=True)
    return times, fa


def run(out_md: str | None = None, *, dims: tuple[int, ...] = (100_000, 1_000_000),
        repeats: int = 5, svd_repeats: int = 1, lam_dim: int | None = 100_000) -> str:
    """Run the benchmark; print and return a markdown section (also written to ``out_md``)."""
    from simulations.bench.report import machine

    limits = _limit_threads()
    rows: dict[str, dict[int, float]] = {label: {} for label, _, _ in RULES}
    fa: dict[int, dict[str, float]] = {}
    for d in dims:
        reps = repeats if d <= 200_000 else max(2, repeats // 2)
        times, fa[d] = _bench_dim(d, reps, svd_repeats)
        for label, t in times.items():
            rows[label][d] = t
    lam: dict[str, float] | None = None
    if lam_dim:
        X = updates(lam_dim)
        fast, slow = build("flag", lam=1.0), build("flag", lam=1.0, solver="svd")
        lam = {"fast": best_time(lambda: fast(X), repeats), "svd": best_time(lambda: slow(X), 1),
               "diff": float(np.abs(fast(X) - slow(X)).max() / np.linalg.norm(slow(X)))}
    if limits is not None:
        limits.unregister()

    def ms(t: float) -> str:
        return f"{1e3 * t:,.1f}" if t >= 0.01 else f"{1e3 * t:,.2f}"

    dl = [f"{d:,}" for d in dims]
    lines = [
        f"Machine: {machine()}. One BLAS thread; best of {repeats} calls (d ≥ 10⁶: "
        f"{max(2, repeats // 2)}) after a warm-up; n = {N} float64 updates (12 honest N(0.1, 1), "
        f"3 U[0,1) attackers), f = {F}.",
        "",
        "| rule | " + " | ".join(f"ms, d={x}" for x in dl) + " | "
        + " | ".join(f"× mean, d={x}" for x in dl) + " |",
        "|---|" + "---:|" * (2 * len(dims)),
    ]
    for label, _, _ in RULES:
        cells = [ms(rows[label][d]) for d in dims]
        ratios = [f"{rows[label][d] / rows['mean'][d]:.1f}" for d in dims]
        lines.append(f"| {label} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    lines += [
        "",
        "Flag Aggregator, fast path (`solver=gram`) vs the straightforward IRLS (`solver=svd`, thin "
        "SVD of the d × p column-scaled matrix), both from the reference random init (m = 8, "
        "λ = 0, 1 iteration):",
        "",
        "| d | fast ms | svd ms | svd / fast | max diff / ‖out‖ | fast / mean | X Xᵀ / mean "
        "| X R / mean | fast, float32 input / float32 mean |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for d in dims:
        t_fast, t_mean = rows["flag (fast path)"][d], rows["mean"][d]
        s = fa[d]
        lines.append(
            f"| {d:,} | {ms(t_fast)} | {ms(s['svd'])} | {s['svd'] / t_fast:.0f}× | {s['diff']:.1e} "
            f"| {t_fast / t_mean:.1f} | {s['gram'] / t_mean:.1f} | {s['xr'] / t_mean:.1f} "
            f"| {s['f32'] / s['mean32']:.1f} |")
    if lam is not None:
        lines += ["", f"With λ = 1 (the svd path factors the d × p² matrix of pair differences), "
                  f"d = {lam_dim:,}: fast {ms(lam['fast'])} ms, svd {ms(lam['svd'])} ms "
                  f"({lam['svd'] / lam['fast']:.0f}×), max diff / ‖out‖ = {lam['diff']:.1e}."]
    out = "\n".join(lines)
    summary = "; ".join(
        f"d={d:,}: FA/mean = {rows['flag (fast path)'][d] / rows['mean'][d]:.1f}, "
        f"svd/FA = {fa[d]['svd'] / rows['flag (fast path)'][d]:.0f}" for d in dims)
    print("\nratios:", summary)
    print(out)
    if out_md:
        with open(out_md, "w") as fh:
            fh.write(out + "\n")
    return out


def main() -> None:
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="also write the markdown section here")
    parser.add_argument("--dims", default="100000,1000000", help="comma-separated d values")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    run(args.out, dims=tuple(int(x) for x in args.dims.split(",")), repeats=args.repeats)


if __name__ == "__main__":
    main()
