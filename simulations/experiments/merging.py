"""``python -m simulations.experiments.merging``: the model-merging experiment of docs/merging.md.

    python -m simulations.experiments.merging --config simulations/configs/merging_mnist1d.yaml \\
        --out runs/merging --docs docs/merging.md --figures docs/figures

Per seed (``seeds`` in the config):

1. **One-shot merging.** A short FedAvg run (``oneshot.warmup``) gives the shared initial model
   θ₀. One more round (``oneshot.finetune``, strategy ``fisher``) lets every client fine-tune θ₀
   with many local steps and return its model and diagonal Fisher; the round's model is the
   ``fisher`` strategy's merge (FL rule: ``n_k``-weighted, unnormalised, ε-fallback to θ₀). The
   client models, Fishers and θ₀ are saved as ``.safetensors`` and merged offline with every
   method in ``oneshot.methods`` through :mod:`simulations.merge` (the mergekit-like CLI code);
   greedy and learned soups use the run's validation split (the union of the clients' held-out
   parts), every score below is on the server test set.
2. **Multi-round.** Every strategy in ``multiround.strategies`` runs through the runner from the
   same random initial model.

Results go to ``--out`` (run directories, merged models, ``results.json``); with ``--docs`` the
tables (mean ± sample std over seeds, :func:`simulations.report.mean_std`) are written into the docs page between
``<!-- merging:oneshot -->`` / ``<!-- merging:multiround -->`` markers, and with ``--figures`` the
plots ``merging_oneshot.png`` and ``merging_multiround.png``. Finished runs are reused (delete the
directory or pass ``--fresh`` to redo them).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedagg.errors import ConfigError
from simulations.cli import Parser
from simulations.experiments import grid
from simulations.report import mean_std, sample_std, table, write_section

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "merging_mnist1d.yaml"

#: Display names of the one-shot rows (in table order).
REFERENCE_ROWS = ("init", "best_client", "mean_client", "fisher")


# ------------------------------------------------------------------------------ runs
def _run_config(base: Mapping[str, Any], phase: Mapping[str, Any], seed: int, out: Path) -> Any:
    from simulations.core.config import build_config

    data = copy.deepcopy(dict(base))
    data.update(copy.deepcopy(dict(phase)))
    data.update(seed=seed, out=str(out))
    return build_config(data)


def run_phase(base: Mapping[str, Any], phase: Mapping[str, Any], seed: int, out: Path,
              fresh: bool, init: dict[str, np.ndarray] | None = None,
              capture: list[Any] | None = None) -> dict[str, Any]:
    """Run (or reuse) one simulation; return its summary. ``init`` replaces the initial model;
    ``capture`` receives the accepted replies of every round."""
    from simulations.core.config import dump_yaml
    from simulations.core.runner import Simulation
    from strategies.arrays import to_record

    cfg = _run_config(base, phase, seed, out)
    if grid.finished(out) and not fresh and capture is None and \
            (out / "config.yaml").read_text() == dump_yaml(cfg):  # same run: reuse it
        return json.loads((out / "summary.json").read_text())
    sim = Simulation(cfg, overwrite=True)
    if init is not None:
        record = to_record(init)
        sim.initial_arrays = lambda: record  # type: ignore[method-assign]
    if capture is not None:
        strategy = sim.strategy
        original = strategy.aggregate_accepted  # type: ignore[attr-defined]

        def spy(server_round: int, replies: list[Any]) -> Any:
            capture.extend(replies)
            return original(server_round, replies)

        strategy.aggregate_accepted = spy  # type: ignore[attr-defined]
    return sim.run().summary


def oneshot(cfg: Mapping[str, Any], seed: int, root: Path, fresh: bool) -> dict[str, dict[str, float]]:
    """One-shot merging for one seed; ``{row: {test_accuracy, test_loss, val_accuracy}}``."""
    from simulations import merge as cli
    from simulations.core.results import load_arrays, save_arrays
    from strategies.arrays import to_numpy
    from strategies.base import reply_client_id, reply_num_examples

    base, spec = cfg["base"], cfg["oneshot"]
    cached = root / "scores.json"
    if cached.is_file() and not fresh:  # reused only for the same protocol
        saved = json.loads(cached.read_text())
        if saved.get("protocol") == json.loads(json.dumps({"base": base, **spec})):
            return saved["scores"]
    warm_dir, tune_dir = root / "warmup", root / "finetune"
    clients_dir = root / "clients"
    t0 = time.perf_counter()
    run_phase(base, spec["warmup"], seed, warm_dir, fresh)
    init = load_arrays(warm_dir / "model.safetensors")
    manifest = clients_dir / "clients.json"
    if fresh or not (grid.finished(tune_dir) and manifest.is_file()):
        replies: list[Any] = []
        run_phase(base, spec["finetune"], seed, tune_dir, True, init=init, capture=replies)
        entries = []
        save_arrays(clients_dir / "init.safetensors", init)
        for msg in replies:
            cid = reply_client_id(msg)
            model = clients_dir / f"client_{cid}.safetensors"
            fisher = clients_dir / f"fisher_{cid}.safetensors"
            save_arrays(model, to_numpy(msg.content.array_records["arrays"]))
            save_arrays(fisher, to_numpy(msg.content.array_records["fisher"]))
            entries.append({"client": cid, "num_examples": reply_num_examples(msg),
                            "model": str(model), "fisher": str(fisher)})
        manifest.write_text(json.dumps(entries, indent=1) + "\n")
    entries = json.loads(manifest.read_text())
    n = np.array([e["num_examples"] for e in entries], dtype=np.float64)

    evaluation = {"run": str(tune_dir), "split": "test"}
    validation = {"run": str(tune_dir), "split": "validation"}
    rows: dict[str, dict[str, float]] = {}

    def scored(method: dict[str, Any], out: Path, score_inputs: bool = False) -> dict[str, Any]:
        config = {**method, "evaluation": evaluation, "validation": validation,
                  "output": str(out)}
        result = cli.run_merge(cli.parse_config(config), score_inputs=score_inputs)
        cli.write_result(result)
        return result.rows[-1] | {"_rows": result.rows}

    # references: θ0, the single client models and the fisher strategy's merge, scored by the CLI
    ref = scored({"merge_method": "uniform_soup",
                  "models": [{"path": e["model"], "name": f"client_{e['client']}"}
                             for e in entries]}, root / "merged" / "uniform_soup.safetensors",
                 score_inputs=True)
    clients = [r for r in ref["_rows"] if r["role"].startswith("models[")]
    best = max(clients, key=lambda r: r["val_accuracy"])
    rows["best_client"] = best
    rows["mean_client"] = {k: float(np.mean([r[k] for r in clients]))
                           for k in ("eval_accuracy", "eval_loss", "val_accuracy")}
    rows["uniform_soup"] = ref
    for name, path in (("init", clients_dir / "init.safetensors"),
                       ("fisher", tune_dir / "model.safetensors")):
        rows[name] = scored({"merge_method": "uniform_soup", "models": [{"path": str(path)}]},
                            root / "merged" / f"{name}.safetensors")
    for name, method in spec["methods"].items():
        if name == "uniform_soup":
            continue
        method = dict(method)
        weights = method.pop("weights", None)
        per_model = method.pop("model_parameters", {})
        models = []
        for e, n_k in zip(entries, n, strict=True):
            params = dict(per_model)
            if weights == "num_examples":
                params["weight"] = float(n_k)
            elif weights == "uniform" or method["merge_method"] in ("linear", "ties",
                                                                     "task_arithmetic"):
                params.setdefault("weight", 1.0)
            model = {"path": e["model"], "parameters": params}
            if method["merge_method"] == "fisher":
                model["fisher"] = e["fisher"]
            models.append(model)
        config = {**method, "models": models}
        if method["merge_method"] in ("ties", "task_arithmetic"):
            config["base_model"] = str(clients_dir / "init.safetensors")
        rows[name] = scored(config, root / "merged" / f"{name}.safetensors")
    out = {k: {"test_accuracy": float(v["eval_accuracy"]), "test_loss": float(v["eval_loss"]),
               "val_accuracy": float(v["val_accuracy"])} for k, v in rows.items()}
    print(f"  one-shot seed {seed}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    from simulations.core.results import atomic_write_text

    atomic_write_text(cached, json.dumps({"protocol": {"base": base, **spec}, "scores": out},
                                         indent=1) + "\n")
    return out


def multiround(cfg: Mapping[str, Any], seed: int, root: Path, fresh: bool) -> dict[str, dict[str, Any]]:
    """Multi-round runs for one seed: ``{strategy: {final/best accuracy, curve, seconds}}``."""
    from simulations.core.results import read_metrics

    spec = cfg["multiround"]
    out: dict[str, dict[str, Any]] = {}
    for name, args in spec["strategies"].items():
        phase = {"strategy": name, "rounds": spec["rounds"], "local_steps": spec["local_steps"],
                 "strategy_args": dict(args or {})}
        t0 = time.perf_counter()
        summary = run_phase(cfg["base"], phase, seed, root / name, fresh)
        rows = read_metrics(root / name)
        out[name] = {
            "final_test_accuracy": float(summary["final_test_accuracy"]),
            "final_test_loss": float(summary["final_test_loss"]),
            "best_test_accuracy": float(summary["best_test_accuracy"]),
            "wall_seconds": float(summary["wall_seconds"]),
            "bytes_up": float(np.nansum([r.get("bytes_up", np.nan) for r in rows[1:]])),
            "curve": [float(r["test_accuracy"]) for r in rows],
        }
        print(f"  {name} seed {seed}: {100 * out[name]['final_test_accuracy']:.1f} % "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return out


# ------------------------------------------------------------------------------ reporting
ONESHOT_LABELS = {
    "init": "shared initial model θ₀ (FedAvg warm-up)",
    "best_client": "best single client (by validation accuracy)",
    "mean_client": "average single client",
    "fisher": "`fisher` strategy (n_k weights, no normalisation, ε-fallback to θ₀)",
    "uniform_soup": "`uniform_soup` (1/K)",
    "fedavg_weights": "`linear`, weights n_k (one-shot FedAvg)",
    "fisher_reference": "`fisher`, reference flags (uniform λ, normalize, target = client 0)",
    "greedy_soup": "`greedy_soup` (validation split)",
    "learned_soup": "`learned_soup`, one α per client (validation split)",
    "learned_soup_tensor": "`learned_soup`, one α per tensor and client (validation split)",
    "ties": "`ties` (base θ₀, density 0.5, λ = 1)",
}


def oneshot_table(results: Mapping[int, Mapping[str, Mapping[str, float]]]) -> str:
    seeds = sorted(results)
    names = list(results[seeds[0]])
    order = sorted(names, key=lambda k: -np.mean([results[s][k]["test_accuracy"] for s in seeds]))
    rows = []
    for k in order:
        acc = [results[s][k]["test_accuracy"] for s in seeds]
        loss = [results[s][k]["test_loss"] for s in seeds]
        val = [results[s][k]["val_accuracy"] for s in seeds]
        rows.append([ONESHOT_LABELS.get(k, k), mean_std(acc, scale=100), mean_std(loss, 3),
                     mean_std(val, scale=100)])
    return table(["method", "test accuracy (%)", "test loss", "validation accuracy (%)"], rows)


def multiround_table(results: Mapping[int, Mapping[str, Mapping[str, Any]]], rounds: int) -> str:
    seeds = sorted(results)
    names = list(results[seeds[0]])
    rows = []
    for k in names:
        r = [results[s][k] for s in seeds]
        mb = np.mean([x["bytes_up"] for x in r]) / 1e6
        rows.append([f"`{k}`", mean_std([x["final_test_accuracy"] for x in r], scale=100),
                     mean_std([x["best_test_accuracy"] for x in r], scale=100),
                     mean_std([x["final_test_loss"] for x in r], 3), f"{mb:.1f}",
                     f"{np.mean([x['wall_seconds'] for x in r]):.0f}"])
    return table(["strategy", f"final test accuracy (%) after {rounds} rounds",
                  "best over rounds (%)", "final test loss", "upload per run (MB)",
                  "wall time per run (s)"], rows)


def plot_oneshot(results: Mapping[int, Mapping[str, Mapping[str, float]]], path: Path) -> None:
    plt = grid.pyplot()
    seeds = sorted(results)
    names = sorted(results[seeds[0]],
                   key=lambda k: np.mean([results[s][k]["test_accuracy"] for s in seeds]))
    acc = np.array([[100 * results[s][k]["test_accuracy"] for s in seeds] for k in names])
    fig, ax = plt.subplots(figsize=(7.0, 0.38 * len(names) + 1.2), dpi=150)
    colors = ["#888888" if k in REFERENCE_ROWS and k != "fisher" else "#1f77b4" for k in names]
    ax.barh(range(len(names)), acc.mean(1), xerr=np.nan_to_num(sample_std(acc, axis=1)),
            color=colors, capsize=3)
    for i in range(len(names)):
        ax.scatter(acc[i], [i] * len(seeds), color="black", s=8, zorder=3)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("server test accuracy (%), mean ± std over seeds (dots: seeds)")
    ax.set_title("One-shot merging of 10 fine-tuned clients (MNIST-1D, Dirichlet α = 0.3)",
                 fontsize=9)
    ax.grid(True, axis="x", alpha=0.3)
    grid.save_png(fig, path)
    plt.close(fig)


def plot_multiround(results: Mapping[int, Mapping[str, Mapping[str, Any]]], path: Path) -> None:
    plt = grid.pyplot()
    seeds = sorted(results)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=150)
    for k in results[seeds[0]]:
        curves = 100 * np.array([results[s][k]["curve"] for s in seeds])
        x = np.arange(curves.shape[1])
        mean, std = curves.mean(0), np.nan_to_num(sample_std(curves, axis=0))
        line, = ax.plot(x, mean, label=f"{k} (n={len(seeds)})", linewidth=1.6)
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xlabel("round")
    ax.set_ylabel("server test accuracy (%)")
    ax.set_title("Multi-round, MNIST-1D, 10 clients, Dirichlet α = 0.3", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(frameon=False, fontsize=8)
    grid.save_png(fig, path)
    plt.close(fig)


# ------------------------------------------------------------------------------ CLI
def load_experiment(path: str | Path) -> dict[str, Any]:
    from simulations.core.config import read_yaml

    cfg = read_yaml(path)
    for key in ("seeds", "base", "oneshot", "multiround"):
        if key not in cfg:
            raise ConfigError(key, f"required in the experiment config {path}")
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    parser = Parser(prog="python -m simulations.experiments.merging",
                    description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--out", default="runs/merging", help="results directory")
    parser.add_argument("--seeds", type=int, nargs="*", help="override the config's seeds")
    parser.add_argument("--only", choices=("oneshot", "multiround"), help="run one part")
    parser.add_argument("--docs", help="docs page to write the tables into (e.g. docs/merging.md)")
    parser.add_argument("--figures", help="directory for merging_*.png (e.g. docs/figures)")
    parser.add_argument("--fresh", action="store_true", help="redo finished runs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--report-only", action="store_true",
                        help="only rewrite tables/figures from <out>/results.json")
    args = parser.parse_args(argv)
    if args.report_only:
        path = Path(args.out) / "results.json"
        if not path.is_file():
            print(f"error: out: {path} not found (run the experiment first)", file=sys.stderr)
            return 2
        report(json.loads(path.read_text()), args)
        return 0
    try:
        cfg = load_experiment(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import logging

    import torch

    import simulations.core.runner  # noqa: F401  (imports flwr, which sets its logger's level)

    logging.getLogger("flwr").setLevel(logging.WARNING)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)  # tiny models: extra threads only contend
    try:
        run_experiment(cfg, args)
    finally:
        torch.set_num_threads(threads)
    return 0


def run_experiment(cfg: Mapping[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Run the parts asked for, write ``results.json`` and (if asked) docs tables and figures."""
    from simulations.core.results import atomic_write_text

    seeds = args.seeds if args.seeds else [int(s) for s in cfg["seeds"]]
    out = Path(args.out)
    t0 = time.perf_counter()
    results: dict[str, Any] = {"config": cfg, "seeds": seeds}
    if args.only in (None, "oneshot"):
        results["oneshot"] = {s: oneshot(cfg, s, out / f"seed{s}" / "oneshot", args.fresh)
                              for s in seeds}
    if args.only in (None, "multiround"):
        results["multiround"] = {s: multiround(cfg, s, out / f"seed{s}" / "multiround", args.fresh)
                                 for s in seeds}
    results["wall_seconds"] = time.perf_counter() - t0
    atomic_write_text(out / "results.json", json.dumps(results, indent=1, default=str) + "\n")
    report(results, args)
    print(f"done in {results['wall_seconds']:.0f} s → {out}", file=sys.stderr)
    return results


def report(results: Mapping[str, Any], args: argparse.Namespace) -> None:
    """Print the tables; write them into ``args.docs`` and the plots into ``args.figures``."""
    cfg = results["config"]
    if "oneshot" in results:
        text = oneshot_table(results["oneshot"])
        print(text)
        if args.docs:
            write_section(args.docs, text, "merging:oneshot")
        if args.figures:
            plot_oneshot(results["oneshot"], Path(args.figures) / "merging_oneshot.png")
    if "multiround" in results:
        text = multiround_table(results["multiround"], int(cfg["multiround"]["rounds"]))
        print(text)
        if args.docs:
            write_section(args.docs, text, "merging:multiround")
        if args.figures:
            plot_multiround(results["multiround"], Path(args.figures) / "merging_multiround.png")


if __name__ == "__main__":
    sys.exit(main())
