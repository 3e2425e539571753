"""``python -m simulations.merge config.yaml``: merge saved models offline, mergekit style.

    python -m simulations.merge merge.yaml --out merged.safetensors

The YAML names a ``merge_method`` of :mod:`fedagg.merging` (``linear``, ``uniform_soup``,
``task_arithmetic``, ``ties``, ``fisher``, ``greedy_soup``, ``learned_soup``), the models
(``.safetensors`` files, e.g. ``model.safetensors`` of our runs) with per-model ``parameters``,
global ``parameters``, and optionally an evaluation dataset::

    merge_method: ties
    base_model: runs/oneshot/init.safetensors      # task_arithmetic, ties
    models:
      - path: runs/oneshot/client_0.safetensors
        parameters: {weight: 1.0, density: 0.5}
      - path: runs/oneshot/client_1.safetensors
        fisher: runs/oneshot/fisher_1.safetensors  # fisher: one Fisher per model
        name: client-1                             # label in the scores table
    parameters: {lambda: 1.0}
    evaluation: {dataset: mnist1d, split: test, model: cnn, model_args: {}}
    validation: {run: runs/oneshot, split: validation}   # held-out data: greedy_soup, learned_soup
    output: merged.safetensors
    scores: merged.scores.csv                      # default: <output stem>.scores.csv

Data specs (``evaluation``, ``validation``) take ``dataset``, ``dataset_args``, ``split``
(``test``: the server test set; ``train``: the training pool; ``validation``: the union of the
clients' held-out parts of run ``run``), ``model``, ``model_args``, ``seed`` (model init, for
parts that are not in the file), ``max_examples`` (first N) and ``run`` (a run directory: its
``config.yaml`` supplies every default). ``validation`` defaults its model to ``evaluation``'s.

Weights are read and written with ``safetensors`` only (no pickle). Everything is validated, merged
and evaluated before anything is written; the merged model and the scores table (CSV: one row per
input model, the base model and the merge; accuracy and cross-entropy on each data spec) are then
written atomically. Bad input exits with code 2 and one line naming the field, e.g.
``error: models[1].path: file not found: x.safetensors``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedagg.errors import ConfigError, unknown_name
from simulations.cli import Parser

TOP_KEYS = ("merge_method", "models", "base_model", "parameters", "evaluation", "validation",
            "output", "scores")
MODEL_KEYS = ("path", "fisher", "name", "parameters")
DATA_KEYS = ("dataset", "dataset_args", "split", "model", "model_args", "seed", "max_examples",
             "run")
SPLITS = ("test", "train", "validation")


# ------------------------------------------------------------------------------ config
@dataclasses.dataclass
class ModelSpec:
    path: Path
    fisher: Path | None
    name: str
    parameters: dict[str, Any]


@dataclasses.dataclass
class DataSpec:
    field: str
    dataset: str
    dataset_args: dict[str, Any]
    split: str
    model: str
    model_args: dict[str, Any]
    seed: int
    max_examples: int | None
    run: Path | None
    run_config: dict[str, Any] | None


@dataclasses.dataclass
class MergeConfig:
    merge_method: str
    models: list[ModelSpec]
    base_model: Path | None
    parameters: dict[str, Any]
    evaluation: DataSpec | None
    validation: DataSpec | None
    output: Path
    scores: Path


def _mapping(value: Any, field: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(field, f"expected a mapping, got {value!r}")
    return dict(value)


def _keys(data: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    for key in data:
        if key not in allowed:
            prefix = f"{where}." if where else ""
            raise ConfigError(f"{prefix}{key}", f"unknown key; allowed: {', '.join(allowed)}")


def _str(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(field, f"expected a non-empty string, got {value!r}")
    return value


def _file(value: Any, field: str) -> Path:
    path = Path(_str(value, field))
    if not path.is_file():
        raise ConfigError(field, f"file not found: {path}")
    return path


def _data_spec(raw: Any, field: str, fallback: DataSpec | None = None) -> DataSpec:
    data = _mapping(raw, field)
    _keys(data, DATA_KEYS, field)
    run_dir: Path | None = None
    run_cfg: dict[str, Any] | None = None
    if data.get("run") is not None:
        run_dir = Path(_str(data["run"], f"{field}.run"))
        cfg_path = run_dir / "config.yaml"
        if not cfg_path.is_file():
            raise ConfigError(f"{field}.run", f"{run_dir} has no config.yaml (not a run directory?)")
        from simulations.core.config import read_yaml

        run_cfg = read_yaml(cfg_path)
    defaults: dict[str, Any] = {"dataset": "mnist1d", "dataset_args": {}, "split": "test",
                                "model": "cnn", "model_args": {}, "seed": 0}
    if fallback is not None:  # validation borrows evaluation's model (and dataset)
        defaults.update(dataset=fallback.dataset, dataset_args=fallback.dataset_args,
                        model=fallback.model, model_args=fallback.model_args, seed=fallback.seed)
    if run_cfg is not None:  # a run directory supplies every default
        defaults.update({k: run_cfg[k] for k in ("dataset", "dataset_args", "model", "model_args",
                                                  "seed") if run_cfg.get(k) is not None})

    def pick(key: str, default: Any = None) -> Any:
        return data[key] if data.get(key) is not None else defaults.get(key, default)

    split = _str(pick("split", "test"), f"{field}.split")
    if split not in SPLITS:
        raise unknown_name(f"{field}.split", split, SPLITS)
    if split == "validation" and run_cfg is None:
        raise ConfigError(f"{field}.run", "split 'validation' (the clients' held-out parts) "
                          "needs the run directory that defines the federated split")
    seed = pick("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"{field}.seed", f"expected an integer >= 0, got {seed!r}")
    max_ex = data.get("max_examples")
    if max_ex is not None and (isinstance(max_ex, bool) or not isinstance(max_ex, int) or max_ex < 1):
        raise ConfigError(f"{field}.max_examples", f"expected an integer >= 1, got {max_ex!r}")
    spec = DataSpec(
        field=field,
        dataset=_str(pick("dataset", "mnist1d"), f"{field}.dataset"),
        dataset_args=_mapping(pick("dataset_args", {}), f"{field}.dataset_args"),
        split=split,
        model=_str(pick("model", "cnn"), f"{field}.model"),
        model_args=_mapping(pick("model_args", {}), f"{field}.model_args"),
        seed=int(seed), max_examples=max_ex, run=run_dir, run_config=run_cfg,
    )
    from fedagg.data import DATASETS
    from fedagg.models import MODELS

    if not spec.dataset.startswith("hf:"):
        DATASETS.entry(spec.dataset, field=f"{field}.dataset").resolve(
            spec.dataset_args, where=f"{field}.dataset_args")
    MODELS.entry(spec.model, field=f"{field}.model").resolve(spec.model_args,
                                                            where=f"{field}.model_args")
    return spec


def parse_config(data: Mapping[str, Any], out: str | None = None) -> MergeConfig:
    """Validate a merge config mapping; ConfigError names the offending field."""
    from fedagg import merging

    _keys(data, TOP_KEYS, "")
    if data.get("merge_method") is None:
        raise ConfigError("merge_method", f"required; one of {', '.join(merging.names())}")
    method_name = _str(data["merge_method"], "merge_method")
    method = merging.spec(method_name)  # ConfigError listing the methods
    raw_models = data.get("models")
    if not isinstance(raw_models, list) or not raw_models:
        raise ConfigError("models", "required: a non-empty list of {path, parameters} entries")
    models: list[ModelSpec] = []
    for i, raw in enumerate(raw_models):
        where = f"models[{i}]"
        if isinstance(raw, str):
            raw = {"path": raw}
        entry = _mapping(raw, where)
        _keys(entry, MODEL_KEYS, where)
        if entry.get("path") is None:
            raise ConfigError(f"{where}.path", "required (a .safetensors file)")
        path = _file(entry["path"], f"{where}.path")
        fisher = None
        if entry.get("fisher") is not None:
            if not method.needs_fishers:
                raise ConfigError(f"{where}.fisher", f"not used by {method_name!r}")
            fisher = _file(entry["fisher"], f"{where}.fisher")
        elif method.needs_fishers:
            raise ConfigError(f"{where}.fisher", f"required by {method_name!r} (a .safetensors "
                              "file with the model's diagonal Fisher)")
        name = _str(entry["name"], f"{where}.name") if entry.get("name") is not None else str(path)
        models.append(ModelSpec(path, fisher, name, _mapping(entry.get("parameters"),
                                                             f"{where}.parameters")))
    base = None
    if data.get("base_model") is not None:
        if not method.needs_base:
            raise ConfigError("base_model", f"not used by {method_name!r}")
        base = _file(data["base_model"], "base_model")
    elif method.needs_base:
        raise ConfigError("base_model", f"required by {method_name!r}")
    params = _mapping(data.get("parameters"), "parameters")
    merger = merging.build(method_name, **params)  # ConfigError on parameters.<key>
    for i, m in enumerate(models):  # per-model parameters, validated the registry's way
        _check_per_model(merger, m.parameters, i)
    evaluation = _data_spec(data["evaluation"], "evaluation") if data.get("evaluation") else None
    validation = None
    if data.get("validation"):
        validation = _data_spec(data["validation"], "validation", fallback=evaluation)
    if method.needs and validation is None:
        raise ConfigError("validation", f"required by {method_name!r}: held-out data to select "
                          "or learn the soup on (never the test set)")
    raw_out = out if out is not None else data.get("output")
    if raw_out is None:
        raise ConfigError("output", "required (or pass --out): the merged .safetensors file")
    output = Path(_str(str(raw_out), "output"))
    if output.suffix != ".safetensors":
        raise ConfigError("output", f"must end in .safetensors, got {output}")
    if output.is_dir():
        raise ConfigError("output", f"{output} is a directory")
    scores = Path(_str(data["scores"], "scores")) if data.get("scores") is not None else \
        output.with_name(f"{output.stem}.scores.csv")
    if scores.is_dir():
        raise ConfigError("scores", f"{scores} is a directory")
    return MergeConfig(method_name, models, base, params, evaluation, validation, output, scores)


def _check_per_model(merger: Any, params: dict[str, Any], i: int) -> None:
    from fedagg.registry import Entry

    Entry(merger.method.name, lambda **_: None, merger.method.per_model).resolve(
        {**merger.catch_all, **params}, where=f"models[{i}].parameters")


# ------------------------------------------------------------------------------ loading
def load_weights(path: Path, field: str) -> dict[str, np.ndarray]:
    """A ``.safetensors`` file as ``{name: array}`` (safetensors only; ConfigError on failure)."""
    from safetensors.numpy import load

    try:
        arrays = dict(load(path.read_bytes()))
    except Exception as exc:  # safetensors raises its own error types
        raise ConfigError(field, f"{path} is not a readable .safetensors file ({exc})") from None
    if not arrays:
        raise ConfigError(field, f"{path} holds no tensors")
    return arrays


def _same_layout(arrays: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray], field: str,
                 ref_field: str) -> None:
    from strategies.arrays import Layout

    why = Layout.of(dict(ref)).mismatch(dict(arrays))
    if why is not None:
        raise ConfigError(field, f"{why} (compared with {ref_field})")


@dataclasses.dataclass
class HeldOut:
    """Data + model to score merged weights on: ``score`` (accuracy), ``loss`` (cross-entropy)."""

    spec: DataSpec
    x: np.ndarray
    y: np.ndarray
    net: torch.nn.Module

    def model(self) -> torch.nn.Module:
        return self.net

    def _eval(self, arrays: Mapping[str, Any]) -> tuple[float, float]:
        from fedagg.training import evaluate, load_numpy_state

        load_numpy_state(self.net, {k: np.asarray(v) for k, v in arrays.items()}, strict=True)
        return evaluate(self.net, torch.as_tensor(self.x), torch.as_tensor(self.y))

    def check(self, arrays: Mapping[str, np.ndarray], what: str) -> None:
        """ConfigError naming ``<spec>.model`` if ``arrays`` do not fit the model."""
        from fedagg.training import federated_state

        state = {k: tuple(v.shape) for k, v in federated_state(self.net).items()}
        got = {k: tuple(np.shape(v)) for k, v in arrays.items()}
        if state != got:
            missing = sorted(set(state) - set(got))[:3]
            extra = sorted(set(got) - set(state))[:3]
            wrong = sorted(k for k in set(state) & set(got) if state[k] != got[k])[:3]
            raise ConfigError(f"{self.spec.field}.model", (
                f"{what} does not fit model {self.spec.model!r} {self.spec.model_args} "
                f"(missing {missing}, unexpected {extra}, wrong shapes {wrong})"))

    def score(self, arrays: Mapping[str, Any]) -> float:
        return self._eval(arrays)[1]

    def loss(self, arrays: Mapping[str, Any]) -> float:
        return self._eval(arrays)[0]


def load_held_out(spec: DataSpec) -> HeldOut:
    """The data and model of a data spec (``split: validation`` rebuilds the run's client split)."""
    from fedagg.data import load_central, load_federated
    from fedagg.models import build_model

    if spec.split == "validation":
        assert spec.run_config is not None
        from simulations.core.config import build_config

        cfg = build_config(spec.run_config)
        fed = load_federated(
            cfg.dataset, cfg.num_clients, cfg.seed, partition=cfg.partition,
            partition_args=cfg.resolved_partition_args(), dataset_args=cfg.dataset_args,
            test_fraction=cfg.test_fraction, rng=np.random.RandomState(cfg.seed % 2**32),
        )
        idx = np.sort(np.concatenate([np.asarray(t, dtype=np.int64) for t in fed.client_test]))
        if len(idx) == 0:
            raise ConfigError(f"{spec.field}.split", f"run {spec.run} has no client held-out data "
                              "(test_fraction = 0)")
        part = fed.pool.subset(idx)
        input_shape, num_classes = fed.input_shape, fed.num_classes
    else:
        central = load_central(spec.dataset, **spec.dataset_args)
        part = central.test if spec.split == "test" else central.train
        input_shape, num_classes = central.input_shape, central.num_classes
    x, y = part.x, part.y
    if spec.max_examples is not None:
        x, y = x[: spec.max_examples], y[: spec.max_examples]
    net = build_model(spec.model, input_shape, num_classes, spec.seed, spec.model_args)
    return HeldOut(spec, x, y, net)


# ------------------------------------------------------------------------------ the merge
@dataclasses.dataclass
class MergeResult:
    merged: dict[str, np.ndarray]
    rows: list[dict[str, Any]]
    config: MergeConfig


def run_merge(cfg: MergeConfig, score_inputs: bool = True) -> MergeResult:
    """Load, validate, merge and score (nothing is written here).

    ``score_inputs=False`` scores only the merged model (the table then has one row).
    """
    from fedagg import merging
    from strategies.arrays import Layout
    from strategies.merging import fisher_problem, held_out_loss

    models = [load_weights(m.path, f"models[{i}].path") for i, m in enumerate(cfg.models)]
    for i, arrays in enumerate(models[1:], start=1):
        _same_layout(arrays, models[0], f"models[{i}].path", "models[0]")
    for i, arrays in enumerate(models):
        for name, a in arrays.items():
            if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
                raise ConfigError(f"models[{i}].path", f"tensor {name!r} contains NaN or Inf")
    fishers = None
    if any(m.fisher is not None for m in cfg.models):
        fishers = []
        for i, (m, arrays) in enumerate(zip(cfg.models, models, strict=True)):
            assert m.fisher is not None
            f = load_weights(m.fisher, f"models[{i}].fisher")
            why = fisher_problem(f, Layout.of(arrays))
            if why is not None:
                raise ConfigError(f"models[{i}].fisher", why.removeprefix("fisher: "))
            fishers.append({k: f[k] for k in arrays})
    base = None
    if cfg.base_model is not None:
        base = load_weights(cfg.base_model, "base_model")
        _same_layout(base, models[0], "base_model", "models[0]")

    evaluation = load_held_out(cfg.evaluation) if cfg.evaluation is not None else None
    validation = load_held_out(cfg.validation) if cfg.validation is not None else None
    for held in (evaluation, validation):
        if held is not None:
            held.check(models[0], "models[0]")
    evaluate = loss_fn = None
    if validation is not None:
        evaluate = validation.score
        loss_fn = held_out_loss(validation.net, validation.x, validation.y)
    method = merging.spec(cfg.merge_method)
    merged = merging.merge(
        cfg.merge_method, models, [m.parameters for m in cfg.models], cfg.parameters,
        base=base, fishers=fishers,
        evaluate=evaluate if "evaluate" in method.needs else None,
        loss_fn=loss_fn if "loss_fn" in method.needs else None,
    )
    merged = {k: np.ascontiguousarray(np.asarray(v)) for k, v in merged.items()}
    for name, a in merged.items():
        if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
            raise ConfigError("merge_method", f"the merge produced NaN/Inf in {name!r}; check "
                              "the weights and parameters")

    entries: list[tuple[str, str, dict[str, np.ndarray]]] = []
    if base is not None and score_inputs:
        entries.append(("base_model", str(cfg.base_model), base))
    if score_inputs:
        entries += [(f"models[{i}]", m.name, a)
                    for i, (m, a) in enumerate(zip(cfg.models, models, strict=True))]
    entries.append(("merged", str(cfg.output), merged))
    rows: list[dict[str, Any]] = []
    for role, name, arrays in entries:
        row: dict[str, Any] = {"role": role, "model": name}
        for key, held in (("eval", evaluation), ("val", validation)):
            if held is not None:
                loss, acc = held._eval(arrays)
                row[f"{key}_accuracy"], row[f"{key}_loss"] = acc, loss
        rows.append(row)
    return MergeResult(merged, rows, cfg)


def scores_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def scores_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A plain-text table of the scores (accuracy in %)."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]

    def cell(k: str, v: Any) -> str:
        if isinstance(v, float):
            return f"{100 * v:.2f}" if k.endswith("accuracy") else f"{v:.4f}"
        return str(v)

    table = [cols] + [[cell(k, r.get(k, "")) for k in cols] for r in rows]
    widths = [max(len(row[j]) for row in table) for j in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in table)


def write_result(result: MergeResult) -> None:
    """Write the merged model and (if anything was scored) the scores CSV, atomically."""
    from simulations.core.results import atomic_write_text, save_arrays

    cfg = result.config
    # one metadata key: safetensors stores metadata in a hash map, so several keys would make
    # the file bytes depend on the process's hash seed
    meta = {"fedagg_merge": json.dumps({"merge_method": cfg.merge_method,
                                        "models": [str(m.path) for m in cfg.models]})}
    save_arrays(cfg.output, result.merged, metadata=meta)
    if any(len(r) > 2 for r in result.rows):
        atomic_write_text(cfg.scores, scores_csv(result.rows))


def load_config_file(path: str | Path) -> dict[str, Any]:
    from simulations.core.config import read_yaml

    return read_yaml(path)


# ------------------------------------------------------------------------------ CLI
def _epilog() -> str:
    from fedagg import merging

    methods = "\n\n".join(merging.describe(n) for n in merging.names())
    return f"merge methods:\n\n{methods}"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m simulations.merge",
        description="Merge .safetensors models offline (mergekit-style YAML: merge_method, models "
        "with per-model parameters, global parameters, base_model, evaluation/validation data). "
        "Writes the merged .safetensors and a scores CSV.",
        epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="merge config (YAML); see docs/merging.md")
    parser.add_argument("--out", help="merged .safetensors (overrides `output`)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--quiet", action="store_true", help="do not print the scores table")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = parse_config(load_config_file(args.config), out=args.out)
        if not args.overwrite:
            for field, path in (("output", cfg.output), ("scores", cfg.scores)):
                if path.exists():
                    raise ConfigError(field, f"{path} exists; pass --overwrite")
        result = run_merge(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_result(result)
    if not args.quiet:
        if any(len(r) > 2 for r in result.rows):
            print(scores_table(result.rows))
        print(f"{cfg.merge_method}: {len(cfg.models)} models → {cfg.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
