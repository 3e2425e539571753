"""``python -m simulations.merge``: round trips, scores, and one-line errors (exit 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fedagg.models import build_model
from fedagg.training import evaluate, load_numpy_state, state_to_numpy
from simulations import merge as cli
from simulations.core.results import load_arrays, save_arrays

ROOT = Path(__file__).resolve().parents[2]


def model_file(path: Path, seed: int = 0, **model_args) -> dict[str, np.ndarray]:
    arrays = state_to_numpy(build_model("cnn", (40,), 10, seed, model_args or {"channels": 4}))
    save_arrays(path, arrays)
    return arrays


def fisher_file(path: Path, like: dict[str, np.ndarray], seed: int = 0, **edit) -> None:
    rng = np.random.default_rng(seed)
    f = {k: rng.random(v.shape).astype(np.float32) for k, v in like.items()}
    f.update(edit)
    save_arrays(path, f)


def write(tmp_path: Path, config: dict, name: str = "merge.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(config))
    return p


def run(argv, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def files(tmp_path):
    a = model_file(tmp_path / "a.safetensors", seed=1)
    b = model_file(tmp_path / "b.safetensors", seed=2)
    fisher_file(tmp_path / "fa.safetensors", a, seed=3)
    fisher_file(tmp_path / "fb.safetensors", a, seed=4)
    return tmp_path, a, b


# ------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("method,extra", [
    ("linear", {"parameters": {"weight": 0.3}}),
    ("uniform_soup", {}),
    ("fisher", {"fisher": True}),
    ("fisher_unnormalized", {"fisher": True}),
])
@pytest.mark.parametrize("copies", [1, 2, 3])
def test_merging_a_model_with_itself_is_bit_for_bit(files, capsys, method, extra, copies):
    tmp, a, _ = files
    models = []
    for i in range(copies):
        m = {"path": str(tmp / "a.safetensors")}
        if extra.get("fisher"):
            m["fisher"] = str(tmp / ("fa.safetensors" if i % 2 == 0 else "fb.safetensors"))
        if "parameters" in extra:
            m["parameters"] = {"weight": 0.3 + i}
        models.append(m)
    config = {"merge_method": method.replace("_unnormalized", ""), "models": models,
              "output": str(tmp / "out.safetensors")}
    if method == "fisher_unnormalized":
        config["parameters"] = {"normalize": False}
    code, out, err = run([write(tmp, config), "--quiet"], capsys)
    assert (code, err) == (0, "")
    merged = load_arrays(tmp / "out.safetensors")
    assert sorted(merged) == sorted(a)
    for k, v in a.items():
        assert merged[k].dtype == v.dtype and merged[k].tobytes() == v.tobytes()
    assert not (tmp / "out.scores.csv").exists()  # nothing to score without evaluation


def test_merge_matches_the_library_and_scores_are_the_models_accuracies(files, capsys):
    from fedagg.data import load_central
    from fedagg.merging import merge

    tmp, a, b = files
    config = {
        "merge_method": "linear",
        "models": [{"path": str(tmp / "a.safetensors"), "parameters": {"weight": 1.0},
                    "name": "A"},
                   {"path": str(tmp / "b.safetensors"), "parameters": {"weight": 3.0}}],
        "evaluation": {"dataset": "mnist1d", "dataset_args": {"num_samples": 200},
                       "split": "test", "model": "cnn", "model_args": {"channels": 4}},
        "output": str(tmp / "m.safetensors"),
    }
    code, out, err = run([write(tmp, config)], capsys)
    assert code == 0, err
    merged = load_arrays(tmp / "m.safetensors")
    expect = merge("linear", [a, b], [{"weight": 1.0}, {"weight": 3.0}], {})
    for k in a:
        np.testing.assert_array_equal(merged[k], expect[k])
        np.testing.assert_allclose(merged[k], (a[k] + 3 * b[k]) / 4, rtol=1e-5, atol=1e-7)
    rows = (tmp / "m.scores.csv").read_text().splitlines()
    assert rows[0] == "role,model,eval_accuracy,eval_loss"
    assert [r.split(",")[0] for r in rows[1:]] == ["models[0]", "models[1]", "merged"]
    assert rows[1].split(",")[1] == "A"
    test = load_central("mnist1d", num_samples=200).test
    net = build_model("cnn", (40,), 10, 0, {"channels": 4})
    for line, arrays in zip(rows[1:], (a, b, merged), strict=True):
        load_numpy_state(net, arrays)
        loss, acc = evaluate(net, torch.as_tensor(test.x), torch.as_tensor(test.y))
        assert float(line.split(",")[2]) == pytest.approx(acc, abs=1e-6)
        assert float(line.split(",")[3]) == pytest.approx(loss, abs=1e-5)
    assert "merged" in out and "eval_accuracy" in out


def test_validation_split_of_a_run_is_the_clients_held_out_union(tmp_path):
    from simulations.core.config import build_config, dump_yaml
    from simulations.core.runner import Simulation

    cfg = build_config({"dataset": "mnist1d", "dataset_args": {"num_samples": 300},
                        "num_clients": 3, "partition": "dirichlet", "alpha": 0.5, "seed": 4,
                        "model": "cnn", "model_args": {"channels": 4}, "engine": "inline",
                        "out": str(tmp_path / "run")})
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(dump_yaml(cfg))
    spec = cli._data_spec({"run": str(tmp_path / "run"), "split": "validation"}, "validation")
    assert (spec.model, spec.model_args, spec.seed) == ("cnn", {"channels": 4}, 4)
    held = cli.load_held_out(spec)
    val = Simulation(cfg.model_copy(update={"out": str(tmp_path / "sim")})).validation()
    np.testing.assert_array_equal(held.x, val.x)
    np.testing.assert_array_equal(held.y, val.y)


def test_greedy_soup_from_the_cli_never_loses_to_its_best_ingredient(files, capsys):
    tmp, a, b = files
    run_dir = tmp / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({
        "dataset": "mnist1d", "dataset_args": {"num_samples": 200}, "num_clients": 2,
        "model": "cnn", "model_args": {"channels": 4}}))
    config = {"merge_method": "greedy_soup",
              "models": [str(tmp / "a.safetensors"), str(tmp / "b.safetensors")],
              "validation": {"run": str(run_dir), "split": "validation"},
              "output": str(tmp / "g.safetensors")}
    code, _, err = run([write(tmp, config), "--quiet"], capsys)
    assert code == 0, err
    rows = [r.split(",") for r in (tmp / "g.scores.csv").read_text().splitlines()]
    assert rows[0] == ["role", "model", "val_accuracy", "val_loss"]
    val = [float(r[2]) for r in rows[1:]]
    assert val[-1] >= max(val[:-1])


# ------------------------------------------------------------------------- errors
def base_config(tmp: Path) -> dict:
    return {"merge_method": "uniform_soup",
            "models": [{"path": str(tmp / "a.safetensors")}, {"path": str(tmp / "b.safetensors")}],
            "output": str(tmp / "out.safetensors")}


def edit(config: dict, path: str, value) -> dict:
    """Set (or with value=KeyError, delete) a dotted/indexed key like ``models.1.path``."""
    node = config
    parts = path.split(".")
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node[p]
    last = parts[-1]
    if value is KeyError:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return config


BAD = [
    ("models.1.path", "nope.safetensors", "models[1].path: file not found"),
    ("models.0.pth", "x", "models[0].pth: unknown key; allowed: path, fisher, name, parameters"),
    ("models.0.path", KeyError, "models[0].path: required"),
    ("merge_method", KeyError, "merge_method: required"),
    ("merge_method", "soup", "merge_method: unknown value 'soup'; allowed: fisher,"),
    ("models", [], "models: required"),
    ("models", "a.safetensors", "models: required"),
    ("parameters", {"normalise": True}, "parameters.normalise: unknown parameter for 'uniform_soup'"),
    ("models.0.parameters", {"weight": -1}, "models[0].parameters.weight: must be >= 0.0"),
    ("models.0.parameters", {"weight": "heavy"}, "models[0].parameters.weight: expected a number"),
    ("merge_method", "ties", "base_model: required by 'ties'"),
    ("merge_method", "fisher", "models[0].fisher: required by 'fisher'"),
    ("merge_method", "greedy_soup", "validation: required by 'greedy_soup'"),
    ("base_model", "a.safetensors", "base_model: not used by 'uniform_soup'"),
    ("models.0.fisher", "fa.safetensors", "models[0].fisher: not used by 'uniform_soup'"),
    ("output", KeyError, "output: required"),
    ("output", "out.bin", "output: must end in .safetensors"),
    ("evaluation", {"dataset": "mnist2d"}, "evaluation.dataset: unknown value 'mnist2d'"),
    ("evaluation", {"split": "dev"}, "evaluation.split: unknown value 'dev'; allowed: test, train, validation"),
    ("evaluation", {"split": "validation"}, "evaluation.run: split 'validation'"),
    ("evaluation", {"model_args": {"channels": 0}}, "evaluation.model_args.channels: must be >= 1"),
    ("evaluation", {"model": "cnn", "model_args": {"channels": 8}},
     "evaluation.model: models[0] does not fit model 'cnn'"),
    ("evaluation", {"batch": 3}, "evaluation.batch: unknown key"),
    ("scores", ["x"], "scores: expected a non-empty string"),
    ("extra", 1, "extra: unknown key; allowed: merge_method, models"),
]


@pytest.mark.parametrize("path,value,message", BAD, ids=[b[2].split(":")[0] + "-" + str(i)
                                                          for i, b in enumerate(BAD)])
def test_bad_config_is_one_line_naming_the_field_and_writes_nothing(files, capsys, monkeypatch,
                                                                    path, value, message):
    tmp, _, _ = files
    monkeypatch.chdir(tmp)  # relative paths in the table are relative to the working directory
    config = base_config(tmp)
    if path.startswith("evaluation") and isinstance(value, dict):
        value = {"dataset_args": {"num_samples": 200}, **value}
    config_file = write(tmp, edit(config, path, value), "bad.yaml")
    before = sorted(p.name for p in tmp.iterdir())
    code, out, err = run([config_file], capsys)
    assert code == 2
    assert err.startswith(f"error: {message}"), err
    assert err.count("\n") == 1 and out == ""
    assert sorted(p.name for p in tmp.iterdir()) == before


def test_bad_files_are_named(files, capsys):
    tmp, a, _ = files
    (tmp / "junk.safetensors").write_bytes(b"not a safetensors file")
    save_arrays(tmp / "small.safetensors", {k: v[..., :1] for k, v in a.items()})
    fisher_file(tmp / "neg.safetensors", a, **{"head.bias": -np.ones(10, np.float32)})
    fisher_file(tmp / "nan.safetensors", a, **{"head.bias": np.full(10, np.nan, np.float32)})
    cases = [
        (edit(base_config(tmp), "models.1.path", str(tmp / "junk.safetensors")),
         "models[1].path: ", "is not a readable .safetensors file"),
        (edit(base_config(tmp), "models.1.path", str(tmp / "small.safetensors")),
         "models[1].path: tensor", "(compared with models[0])"),
        ({**base_config(tmp), "merge_method": "fisher",
          "models": [{"path": str(tmp / "a.safetensors"), "fisher": str(tmp / "fa.safetensors")},
                     {"path": str(tmp / "b.safetensors"), "fisher": str(tmp / "neg.safetensors")}]},
         "models[1].fisher: tensor 'head.bias' has negative entries", ""),
        ({**base_config(tmp), "merge_method": "fisher",
          "models": [{"path": str(tmp / "a.safetensors"), "fisher": str(tmp / "nan.safetensors")},
                     {"path": str(tmp / "b.safetensors"), "fisher": str(tmp / "fa.safetensors")}]},
         "models[0].fisher: tensor 'head.bias' contains NaN or Inf", ""),
    ]
    for config, start, contains in cases:
        code, out, err = run([write(tmp, config, "bad.yaml")], capsys)
        assert code == 2 and err.startswith(f"error: {start}") and contains in err, err
        assert err.count("\n") == 1
        assert not (tmp / "out.safetensors").exists()
    (tmp / "bad.yaml").write_text("merge_method: [linear\nmodels: {")
    code, _, err = run([tmp / "bad.yaml"], capsys)
    assert code == 2 and err.startswith("error: config: ") and "not valid YAML" in err
    code, _, err = run([tmp / "missing.yaml"], capsys)
    assert code == 2 and err.startswith("error: config: file not found")


def test_existing_output_needs_overwrite(files, capsys):
    tmp, a, _ = files
    path = write(tmp, base_config(tmp))
    assert run([path, "--quiet"], capsys)[0] == 0
    first = (tmp / "out.safetensors").read_bytes()
    code, _, err = run([path], capsys)
    assert code == 2 and err.startswith("error: output: ") and "--overwrite" in err
    code, _, err = run([path, "--overwrite", "--quiet", "--out", tmp / "out.safetensors"], capsys)
    assert code == 0 and (tmp / "out.safetensors").read_bytes() == first


def test_help_lists_methods_and_their_parameters(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ("fisher", "greedy_soup", "learned_soup", "linear", "ties", "uniform_soup"):
        assert f"\n{name}: " in out
    assert "density (float, default 1.0)" in out and "--overwrite" in out
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2 and capsys.readouterr().err.count("\n") == 1


@pytest.mark.slow  # a fresh interpreter imports torch (a few seconds)
def test_exit_code_and_stderr_from_a_subprocess(files):
    tmp, _, _ = files
    config = edit(base_config(tmp), "models.1.path", str(tmp / "gone.safetensors"))
    res = subprocess.run([sys.executable, "-m", "simulations.merge", str(write(tmp, config))],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr == f"error: models[1].path: file not found: {tmp / 'gone.safetensors'}\n"


@pytest.mark.parametrize("method", ["greedy_soup", "learned_soup", "ties", "task_arithmetic"])
def test_every_method_round_trips_a_model_merged_with_itself(files, capsys, method):
    tmp, a, _ = files
    run_dir = tmp / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({
        "dataset": "mnist1d", "dataset_args": {"num_samples": 200}, "num_clients": 2,
        "model": "cnn", "model_args": {"channels": 4}}))
    models = [{"path": str(tmp / "a.safetensors"), "parameters": {}} for _ in range(2)]
    config = {"merge_method": method, "models": models, "output": str(tmp / "o.safetensors")}
    if method in ("greedy_soup", "learned_soup"):
        config["validation"] = {"run": str(run_dir), "split": "validation"}
        config["parameters"] = {"steps": 3} if method == "learned_soup" else {}
    else:
        config["base_model"] = str(tmp / "a.safetensors")
        for m in models:
            m["parameters"] = {"weight": 0.5}
    code, _, err = run([write(tmp, config), "--quiet"], capsys)
    assert code == 0, err
    merged = load_arrays(tmp / "o.safetensors")
    for k, v in a.items():
        assert merged[k].tobytes() == v.tobytes()
