"""``python -m simulations.evaluate RUN_DIR``: evaluate a saved run offline, one instance at a time.

    python -m simulations.evaluate runs/fedins-20250101-120000 --per-domain --slots

Rebuilds the run's model from ``config.yaml`` (model kind, ``model_args``, seed; a frozen backbone
comes from the backbone cache, see :mod:`fedagg.models.backbone`), loads ``model.safetensors`` (the
federated state: for FedIns the SSF pool) and evaluates it on the server test set. For FedIns every
sample goes query → top-k keys → adaptive SSF and head → prediction, with its own slots
(``selection: instance``), so a prediction does not depend on the batch it is evaluated in.

Prints the test accuracy (it should equal ``final_test_accuracy`` in ``summary.json``; a mismatch is
reported), per domain with ``--per-domain`` (multi-domain datasets), and with ``--slots`` which pool
slots each domain's samples select (the share of the domain's test samples whose top-k contains the
slot). Only safetensors is read (no pickle). Invalid input: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fedagg.errors import ConfigError
from simulations.cli import Parser

if TYPE_CHECKING:
    from simulations.core.config import RunConfig

__all__ = ["Evaluation", "evaluate_run", "load_run", "main"]


@dataclasses.dataclass
class Evaluation:
    """Per-instance results of a saved run on the server test set.

    ``logits: (n, K) float32``, ``predictions``/``labels: (n,) int64``, ``domains: (n,)`` or None,
    ``slots: (n, k) int64`` (FedIns: the slots each sample selects) or None, ``pool_size`` N or None;
    ``complete``: the whole test set was evaluated (no ``limit``).
    """

    run_dir: Path
    config: RunConfig
    logits: np.ndarray
    predictions: np.ndarray
    labels: np.ndarray
    domains: np.ndarray | None
    slots: np.ndarray | None
    pool_size: int | None
    complete: bool = True

    @property
    def accuracy(self) -> float:
        """Share of correct predictions, in ``[0, 1]``."""
        return float(np.mean(self.predictions == self.labels)) if len(self.labels) else float("nan")

    def per_domain(self) -> dict[int, tuple[float, int]]:
        """``{domain: (accuracy, samples)}`` (empty when the test set has no domain ids)."""
        if self.domains is None:
            return {}
        out: dict[int, tuple[float, int]] = {}
        for d in np.unique(self.domains):
            mask = self.domains == d
            out[int(d)] = (float(np.mean(self.predictions[mask] == self.labels[mask])), int(mask.sum()))
        return out

    def slot_histogram(self) -> np.ndarray:
        """``(D, N)``: share of domain ``d``'s test samples whose top-k contains slot ``j``
        (rows sum to k). One row (all samples) when the test set has no domain ids."""
        if self.slots is None or self.pool_size is None:
            raise ValueError("not a FedIns model: no slot selection to report")
        domains = self.domains if self.domains is not None else np.zeros(len(self.labels), int)
        ids = np.unique(domains)
        hist = np.zeros((len(ids), self.pool_size))
        for row, d in enumerate(ids):
            sel = self.slots[domains == d]
            hist[row] = np.bincount(sel.reshape(-1), minlength=self.pool_size) / max(len(sel), 1)
        return hist

    def summary(self) -> dict[str, Any]:
        """JSON-friendly summary: accuracy, per-domain accuracy, slot histogram (FedIns)."""
        out: dict[str, Any] = {"accuracy": self.accuracy, "samples": int(len(self.labels)),
                               "per_domain": {str(d): acc for d, (acc, _) in self.per_domain().items()}}
        if self.slots is not None:
            out["slot_histogram"] = self.slot_histogram().tolist()
        return out


def load_run(run_dir: str | Path) -> tuple[RunConfig, nn.Module, Any]:
    """``(RunConfig, model with the saved federated state, FederatedData)`` of a run directory."""
    from fedagg.data import load_federated
    from fedagg.models import build_model
    from fedagg.training import load_numpy_state
    from simulations.core.config import load_config
    from simulations.core.results import load_arrays

    run = Path(run_dir)
    if not run.is_dir():
        raise ConfigError("run_dir", f"{run} is not a directory")
    if not (run / "config.yaml").is_file():
        raise ConfigError("run_dir", f"{run} has no config.yaml (not a run directory?)")
    if not (run / "model.safetensors").is_file():
        raise ConfigError("run_dir", f"{run} has no model.safetensors (unfinished run?)")
    cfg = load_config(run / "config.yaml")
    data = load_federated(
        cfg.dataset, cfg.num_clients, cfg.seed, partition=cfg.partition,
        partition_args=cfg.resolved_partition_args(), dataset_args=cfg.dataset_args,
        test_fraction=cfg.test_fraction,
    )
    model = build_model(cfg.model, data.input_shape, data.num_classes, cfg.seed, cfg.model_args)
    arrays = load_arrays(run / "model.safetensors")
    try:
        load_numpy_state(model, arrays, strict=True)
    except (KeyError, RuntimeError) as exc:
        raise ConfigError("model", f"model.safetensors does not fit model {cfg.model!r} "
                          f"({str(exc).splitlines()[0][:200]})") from None
    model.eval()
    return cfg, model, data


@torch.no_grad()
def evaluate_run(run_dir: str | Path, batch_size: int = 256, limit: int | None = None) -> Evaluation:
    """Evaluate the run's final model on the server test set in batches of ``batch_size``
    (the first ``limit`` test samples only, if given).

    FedIns models report the selected slots too. With ``selection: instance`` (the default) the
    result does not depend on ``batch_size``.
    """
    from fedagg.ssf.pool import SSFPoolModel

    if batch_size < 1:
        raise ConfigError("batch_size", f"must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise ConfigError("limit", f"must be >= 1, got {limit}")
    cfg, model, data = load_run(run_dir)
    n = len(data.test.y) if limit is None else min(limit, len(data.test.y))
    x = torch.as_tensor(data.test.x[:n])
    logits, slots = [], []
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size]
        if isinstance(model, SSFPoolModel):
            out, match = model.forward_with_match(xb)
            slots.append(match.idx.cpu().numpy())
        else:
            out = model(xb)
        logits.append(out.float().cpu().numpy())
    lg = np.concatenate(logits) if logits else np.zeros((0, data.num_classes), np.float32)
    return Evaluation(
        run_dir=Path(run_dir), config=cfg, logits=lg,
        predictions=lg.argmax(axis=1).astype(np.int64), labels=np.asarray(data.test.y[:n], np.int64),
        domains=None if data.test.domain is None else np.asarray(data.test.domain[:n]),
        slots=np.concatenate(slots).astype(np.int64) if slots else None,
        pool_size=int(model.keys.shape[0]) if isinstance(model, SSFPoolModel) else None,
        complete=n == len(data.test.y),
    )


# ------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m simulations.evaluate",
               description="Evaluate a saved run (config.yaml + model.safetensors) on the server "
                           "test set, per instance.")
    p.add_argument("run_dir", help="run directory written by python -m simulations.run")
    p.add_argument("--per-domain", action="store_true", help="accuracy per domain")
    p.add_argument("--slots", action="store_true",
                   help="FedIns: which pool slots each domain selects")
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch size (default 256)")
    p.add_argument("--top", type=int, default=5, help="slots listed per domain with --slots")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N test samples only")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    return p


def format_report(ev: Evaluation, *, per_domain: bool, slots: bool, top: int = 5) -> str:
    """The text report of :func:`main`."""
    cfg = ev.config
    lines = [f"run: {ev.run_dir} (strategy {cfg.strategy}, model {cfg.model}, seed {cfg.seed})",
             f"test accuracy: {100 * ev.accuracy:.2f} % ({len(ev.labels)} samples, per instance)"]
    summary_path = ev.run_dir / "summary.json"
    if summary_path.is_file() and ev.complete:
        saved = json.loads(summary_path.read_text()).get("final_test_accuracy")
        if isinstance(saved, (int, float)):
            same = abs(saved - ev.accuracy) < 1e-9
            lines.append(f"run's final test accuracy: {100 * saved:.2f} % "
                         f"({'reproduced' if same else 'DIFFERENT: was the backbone cache rebuilt?'})")
    if per_domain:
        table = ev.per_domain()
        lines.append("per domain:" if table else "per domain: the test set has no domain ids")
        for d, (acc, n) in table.items():
            lines.append(f"  domain {d}: {100 * acc:6.2f} % ({n} samples)")
    if slots:
        if ev.slots is None:
            lines.append("slots: not a FedIns model")
        else:
            hist = ev.slot_histogram()
            k = ev.slots.shape[1]
            lines.append(f"slot selection (share of the domain's samples whose top-{k} of "
                         f"{ev.pool_size} contains the slot):")
            names = sorted(np.unique(ev.domains)) if ev.domains is not None else ["all"]
            for row, d in zip(hist, names, strict=True):
                order = np.argsort(-row, kind="stable")[:top]
                picks = ", ".join(f"{int(j)} ({row[j]:.2f})" for j in order if row[j] > 0)
                lines.append(f"  domain {d}: {picks}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        ev = evaluate_run(args.run_dir, batch_size=args.batch_size, limit=args.limit)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(ev.summary(), indent=2))
    else:
        print(format_report(ev, per_domain=args.per_domain, slots=args.slots, top=args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
