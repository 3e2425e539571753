"""``python -m simulations.experiments.robust_leak``: where each robust rule's aggregate points
when ``random`` attackers join real honest updates (docs/robust.md, "Why FA loses to `random`").

    python -m simulations.experiments.robust_leak RUN_DIR [--attackers 3] [--seed 0]

Takes the model and data of a finished run directory (its ``config.yaml`` and
``model.safetensors``; the model at initialisation too), computes the honest updates of
``num_clients − attackers`` clients (one minibatch gradient each, sent as ``Δ = −g``, the
parameter-server protocol of the study), adds ``attackers`` updates drawn U[0, 1) per
coordinate (the `random` attack), and prints per rule: the aggregate's norm, its cosine with the
honest mean, its component along the attackers' common direction ``1/√d`` and that component's
share of the norm (the *leak*). A constant leak is a bias that server momentum accumulates.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from simulations.cli import Parser

#: Rules compared, with the tolerance ``f`` they are given (None: the rule takes none).
RULES: tuple[tuple[str, bool], ...] = (
    ("mean", False), ("flag", False), ("multikrum", True), ("bulyan", True), ("median", False),
    ("trimmed-mean", True), ("meamed", True), ("phocas", True), ("geomedian", False),
)


def leak_rows(honest: np.ndarray, attackers: np.ndarray,
              rules: Sequence[tuple[str, bool]] = RULES) -> list[dict[str, float | str]]:
    """One row per rule for updates ``honest`` ``(h, d)`` and ``attackers`` ``(a, d)`` (stacked
    attackers first): ``norm`` = ‖agg‖, ``cos_honest`` = cos(agg, honest mean), ``along`` =
    agg · 1/√d, ``leak`` = |along| / ‖agg‖."""
    import fedagg.aggregators as agg

    X = np.vstack([attackers, honest]).astype(np.float64)
    d = X.shape[1]
    mean_h = honest.mean(axis=0)
    rows: list[dict[str, float | str]] = []
    for name, takes_f in rules:
        rule = agg.build(name, **({"f": len(attackers)} if takes_f else {}))
        g = np.asarray(rule(X), dtype=np.float64)
        norm = float(np.linalg.norm(g))
        along = float(g.sum() / np.sqrt(d))
        rows.append({"rule": name, "norm": norm,
                     "cos_honest": float(g @ mean_h / (norm * np.linalg.norm(mean_h))),
                     "along": along, "leak": abs(along) / norm})
    return rows


def markdown(rows: Sequence[dict[str, float | str]]) -> str:
    lines = ["| rule | ‖aggregate‖ | cos(aggregate, honest mean) | component along 1/√d | "
             "leak (share of the norm) |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['rule']} | {r['norm']:.3f} | {r['cos_honest']:.2f} | {r['along']:.3f} | "
              f"{r['leak']:.2f} |" for r in rows]
    return "\n".join(lines)


def honest_updates(run_dir: Path, trained: bool, count: int, seed: int) -> np.ndarray:
    """``(count, d)`` updates ``−∇loss`` of one 32-sample minibatch of each of the first ``count``
    clients of the run in ``run_dir``, at its final model (``trained``) or at initialisation."""
    import tempfile

    import torch
    import yaml

    from simulations.core.config import build_config
    from simulations.core.results import load_arrays
    from simulations.core.runner import Simulation

    data = yaml.safe_load((run_dir / "config.yaml").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        data["out"] = str(Path(tmp) / "run")
        sim = Simulation(build_config(data), overwrite=True)
        model = sim.runtime.model()
        if trained:
            state = load_arrays(run_dir / "model.safetensors")
            model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
        gen = np.random.default_rng(seed)
        params = list(model.parameters())
        out = []
        for k in range(count):
            idx = gen.choice(sim.data.client_train[k], sim.cfg.batch_size, replace=False)
            x = torch.as_tensor(sim.data.pool.x[idx])
            y = torch.as_tensor(sim.data.pool.y[idx]).long()
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            out.append(-np.concatenate([p.grad.detach().numpy().ravel() for p in params]))
        sim.writer.close()
    return np.asarray(out, dtype=np.float64)


def main(argv: Sequence[str] | None = None) -> int:
    parser = Parser(prog="python -m simulations.experiments.robust_leak",
                    description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a finished run directory")
    parser.add_argument("--attackers", type=int, default=3, help="random attackers (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="minibatches and attack draws")
    args = parser.parse_args(argv)
    if not (args.run_dir / "model.safetensors").is_file():
        print(f"error: run_dir: {args.run_dir} has no model.safetensors; give a finished run",
              file=sys.stderr)
        return 2
    import yaml

    n = int(yaml.safe_load((args.run_dir / "config.yaml").read_text()).get("num_clients", 15))
    if not 1 <= args.attackers < n:
        print(f"error: attackers: must be in [1, {n - 1}] (got {args.attackers})", file=sys.stderr)
        return 2
    gen = np.random.default_rng(args.seed)
    for trained in (False, True):
        honest = honest_updates(args.run_dir, trained, n - args.attackers, args.seed)
        attackers = gen.random((args.attackers, honest.shape[1]))
        norms = np.linalg.norm(honest, axis=1)
        print(f"\n{'final model' if trained else 'initialisation'}: d = {honest.shape[1]}, "
              f"{len(honest)} honest updates (median norm {np.median(norms):.3f}), "
              f"{args.attackers} random (norm {np.linalg.norm(attackers[0]):.1f})\n")
        print(markdown(leak_rows(honest, attackers)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
