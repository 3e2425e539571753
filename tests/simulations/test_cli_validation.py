"""Silent no-ops and late failures (issue 14): bad input is a one-line error (exit 2) at config load,
before Ray starts or anything is written, in ``simulations.run``, ``sweep`` and ``submit`` alike."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import strategies
from fedagg import aggregators, attacks
from fedagg.data import PARTITIONERS, dataset_names
from fedagg.data.federated import load_federated
from fedagg.data.hf import hub_unreachable
from fedagg.errors import ConfigError
from fedagg.io import cannot_create_dir
from fedagg.models import model_names
from fedagg.participation import PROBABILITIES, PROCESSES
from fedagg.registry import Param
from simulations import run as run_cli
from simulations import submit
from simulations import sweep as sweep_cli
from simulations.core.config import config_default, config_warnings, load_config
from strategies.registry import NEEDS

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--engine", "inline", "--rounds", "1", "--num-clients", "2", "--model", "mlp",
        "--local-steps", "1", "--no-progress"]


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    code = run_cli.main(argv)
    return code, capsys.readouterr().err.strip()


def _assert_one_line_error(code: int, err: str, field: str) -> None:
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {field}:"), err
    assert "Traceback" not in err


# ------------------------------------------------------------------------------ silent no-ops
@pytest.mark.parametrize(("argv", "field", "hint"), [
    (["--attack", "alie"], "num_byzantine", "--num-byzantine"),
    (["--attack", "labelflip"], "num_byzantine", "--num-byzantine"),  # a data attack too
    (["--num-byzantine", "1"], "attack", "--attack"),
    (["attack_args.z=1.5"], "attack_args", "--attack"),
    (["--local-steps", "0"], "local_steps", ">= 1"),
    (["--server-lr", "0"], "server_lr", "> 0"),
    # Flower's FedAdam has its own server step (eta): a server_lr would be dropped
    (["--strategy", "fedadam", "--server-lr", "0.5"], "server_lr", "strategy_args.eta"),
    (["--strategy", "fedmedian", "--server-lr", "0.5"], "server_lr", "unset server_lr"),
])
def test_settings_that_would_do_nothing_exit_2(argv, field, hint, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    code, err = _cli([*TINY, *argv, "--out", str(out)], capsys)
    _assert_one_line_error(code, err, field)
    assert hint in err
    assert not out.exists()


def test_no_op_rules_are_checked_at_config_load() -> None:
    for over, field in [({"attack": "alie"}, "num_byzantine"), ({"local_steps": 0}, "local_steps"),
                        ({"server_lr": 0.0}, "server_lr"), ({"num_byzantine": 1}, "attack")]:
        with pytest.raises(ConfigError) as exc:
            load_config(None, over)
        assert exc.value.field == field
    # a profile that trains keeps a run whose default local_steps is 0 meaningful
    cfg = load_config(None, {"local_steps": 0, "profiles": [{"name": "fast", "count": 2, "local_steps": 3}]})
    assert cfg.local_steps == 0
    assert load_config(None, {"attack": "alie", "num_byzantine": 2}).num_byzantine == 2


# ------------------------------------------------------------------------------ strategies that need a model
def test_a_strategy_that_needs_a_model_selects_it_unless_the_model_is_set() -> None:
    assert NEEDS["fedins"].models == ("fedins",)
    assert load_config(None, {"strategy": "fedins"}).model == "fedins"
    assert load_config(None, {"strategy": "fedins", "model": "fedins"}).model == "fedins"
    assert load_config(None, {}).model == config_default("model")  # other strategies: the default
    with pytest.raises(ConfigError) as exc:
        load_config(None, {"strategy": "fedins", "model": "cnn"})
    assert exc.value.field == "model" and "fedins" in exc.value.message


def test_an_explicit_incompatible_model_in_a_config_file_is_an_error(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("strategy: fedins\nmodel: cnn\n")
    with pytest.raises(ConfigError, match="^model: strategy 'fedins' needs model fedins"):
        load_config(path)
    path.write_text("strategy: fedins\n")
    assert load_config(path).model == "fedins"


def test_incompatible_model_exits_2_in_run_sweep_and_submit_before_anything_starts(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    code, err = _cli([*TINY, "--strategy", "fedins", "--model", "cnn", "--out", str(out)], capsys)
    _assert_one_line_error(code, err, "model")
    assert not out.exists()

    sweep_out = tmp_path / "sweep"
    spec = {"base": {"strategy": "fedins", "model": "cnn", "rounds": 1}, "grid": {"seed": [0, 1]},
            "out": str(sweep_out)}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    assert sweep_cli.main([str(tmp_path / "s.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: base.model: strategy 'fedins' needs model fedins") and err.count("\n") == 1
    assert not sweep_out.exists()

    dead = "http://127.0.0.1:9"  # nothing listens there: exit 2 proves it failed before submitting
    assert submit.main(["--address", dead, "--", "--strategy", "fedins", "--model", "cnn"]) == 2
    assert capsys.readouterr().err.startswith("error: model: strategy 'fedins' needs model fedins")


# ------------------------------------------------------------------------------ non-finite numbers
@pytest.mark.parametrize("key", ["lr", "server_lr", "momentum", "weight_decay", "alpha",
                                 "max_update_norm", "round_timeout", "faults.crash_prob",
                                 "simulated_time.latency", "strategy_args.proximal_mu"])
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", ".inf"])
def test_non_finite_numbers_are_rejected_at_load(key, value) -> None:
    from simulations.core.config import parse_override

    over = dict([parse_override(f"{key}={value}")])
    if key == "alpha":
        over["partition"] = "dirichlet"
    if key.startswith("strategy_args"):
        over["strategy"] = "fedprox"
    with pytest.raises(ConfigError) as exc:
        load_config(None, over)
    assert exc.value.field == key and "finite" in exc.value.message


def test_lr_inf_exits_2_on_the_cli(tmp_path, capsys) -> None:
    code, err = _cli([*TINY, "--lr", "inf", "--out", str(tmp_path / "r")], capsys)
    _assert_one_line_error(code, err, "lr")
    assert "finite" in err and not (tmp_path / "r").exists()


def test_registry_float_params_must_be_finite() -> None:
    p = Param("tau", float, 1.0)
    assert p.check("2.5", "x") == 2.5
    for bad in (float("inf"), float("-inf"), float("nan"), "nan", "inf"):
        with pytest.raises(ConfigError, match="^x.tau: must be a finite number"):
            p.check(bad, "x")


# ------------------------------------------------------------------------------ free-text names
@pytest.mark.parametrize(("over", "field", "allowed"), [
    ({"participation.process": "bogus"}, "participation.process", PROCESSES.names()),
    ({"participation.process": "bernoulli", "participation.probabilities.kind": "bogus"},
     "participation.probabilities.kind", PROBABILITIES.names()),
    ({"participation.process": "markov", "participation.args.b": 1}, "participation.args.b", ["a"]),
    ({"strategy": "robust", "aggregator": "bogus"}, "aggregator", aggregators.names()),
    ({"strategy": "robust", "aggregator": "nnm+bogus"}, "aggregator", aggregators.names()),
    ({"strategy": "robust", "strategy_args.aggregator": "nnm+bogus"}, "aggregator", aggregators.names()),
    ({"attack": "bogus", "num_byzantine": 1}, "attack", attacks.names()),
    ({"strategy": "bogus"}, "strategy", strategies.names()),
    ({"model": "bogus"}, "model", model_names()),
    ({"partition": "bogus"}, "partition", PARTITIONERS.names()),
    ({"dataset": "bogus"}, "dataset", dataset_names()),
    ({"engine": "bogus"}, "engine", ["inline"]),
    ({"strategy_args.bogus": 1}, "strategy_args.bogus", ["server_lr"]),
])
def test_free_text_fields_are_checked_at_load_naming_allowed_values(over, field, allowed) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, over)
    assert exc.value.field == field, str(exc.value)
    assert all(name in exc.value.message for name in allowed), str(exc.value)


def test_a_rule_that_cannot_run_with_this_many_clients_fails_at_load() -> None:
    with pytest.raises(ConfigError) as exc:  # Bulyan needs n >= 4f + 3
        load_config(None, {"strategy": "bulyan", "num_clients": 15, "num_byzantine": 4, "attack": "alie"})
    assert exc.value.field == "num_byzantine"


def test_bad_participation_fails_submit_locally(capsys) -> None:
    dead = "http://127.0.0.1:9"
    assert submit.main(["--address", dead, "--", "--participation", "bogus"]) == 2
    assert capsys.readouterr().err.startswith("error: participation.process: unknown value 'bogus'")


# ------------------------------------------------------------------------------ raw tracebacks
def test_out_under_a_regular_file_exits_2(tmp_path, capsys) -> None:
    (tmp_path / "file").write_text("x")
    code, err = _cli([*TINY, "--out", str(tmp_path / "file" / "run")], capsys)
    _assert_one_line_error(code, err, "out")
    assert "is a file, not a directory" in err
    assert (tmp_path / "file").read_text() == "x"


def test_out_under_a_system_directory_exits_2(capsys) -> None:
    target = Path("/proc") / f"fedagg-test-{os.getpid()}" / "run"
    code, err = _cli([*TINY, "--out", str(target)], capsys)
    _assert_one_line_error(code, err, "out")
    assert "/proc" in err


def test_cannot_create_dir_leaves_nothing_on_disk(tmp_path) -> None:
    assert cannot_create_dir(tmp_path / "a" / "b") is None
    assert cannot_create_dir(tmp_path) is None
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "f").write_text("")
    assert cannot_create_dir(tmp_path / "f") == f"{tmp_path / 'f'} is a file, not a directory"


def test_hf_dataset_offline_is_a_one_line_error(tmp_path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": str(ROOT)}
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "simulations.run", *TINY, "--dataset", "hf:mnist",
                          "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    err = res.stderr.strip()
    assert res.returncode == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error: dataset: 'hf:mnist' cannot be downloaded offline"), err
    assert "mnist1d" in err and "digits" in err  # names the offline datasets
    assert not out.exists()


def test_hub_probe_tells_a_closed_port_from_a_listening_one() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert hub_unreachable(f"http://127.0.0.1:{port}", timeout=2.0) is None
    with socket.socket() as probe:  # bound but not listening: connection refused
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
        assert isinstance(hub_unreachable(f"https://127.0.0.1:{closed}", timeout=2.0), str)


def _limit_memory() -> None:
    import resource

    limit = 2 * 2**30  # bytes of heap: a run that allocates per client for 10^8 clients fails fast
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def test_more_clients_than_samples_is_refused_with_both_numbers(tmp_path) -> None:
    out = tmp_path / "r"
    res = subprocess.run([sys.executable, "-m", "simulations.run", *TINY[:4], "--num-clients", "100000000",
                          "--out", str(out), "--no-progress"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=300, preexec_fn=_limit_memory)
    err = res.stderr.strip()
    _assert_one_line_error(res.returncode, err, "num_clients")
    pool = len(load_federated("mnist1d", 2, 0).pool.y)
    assert "100000000" in err and f"<= {pool}" in err
    assert not out.exists()
    with pytest.raises(ConfigError, match="^num_clients: 161 clients .* has 160 training samples"):
        load_federated("mnist1d", 161, 0, dataset_args={"num_samples": 200})


# ------------------------------------------------------------------------------ SIGTERM
def _terminate_after_first_round(tmp_path: Path, engine: str) -> subprocess.CompletedProcess:
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulations.run", "--engine", engine, "--rounds", "500",
         "--num-clients", "2", "--model", "mlp", "--local-steps", "20", "--no-progress",
         "--out", str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.csv"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:  # header, round 0, round 1
            break
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _assert_clean_termination(res: subprocess.CompletedProcess, out: Path) -> None:
    err = res.stderr.strip()
    assert res.returncode == 128 + signal.SIGTERM, (res.returncode, err)
    assert "Traceback" not in err and "SIGTERM received" not in err and "@ 0x" not in err, err
    assert err.splitlines() == [f"terminated: metrics of the completed rounds are in {out}"], err


def test_sigterm_stops_an_inline_run_with_one_line(tmp_path) -> None:
    res = _terminate_after_first_round(tmp_path, "inline")
    _assert_clean_termination(res, tmp_path / "run")


@pytest.mark.slow
def test_sigterm_stops_a_ray_run_without_a_stack_dump(tmp_path) -> None:
    res = _terminate_after_first_round(tmp_path, "ray")
    _assert_clean_termination(res, tmp_path / "run")


# ------------------------------------------------------------------------------ help and warnings
def test_help_shows_defaults_and_every_registered_name(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        run_cli.main(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for flag, key, _ in run_cli.FLAGS:
        default = config_default(key)
        if key not in ("out", "clients_per_round"):  # their help says what None means
            shown = "none" if default is None else str(default)
            within = r"(?:(?! --[a-z-]+ [A-Z_]+ ).)*?"  # the flag's own help, not the next flag's
            assert re.search(rf"{re.escape(flag)} [A-Z_]+ {within}\(default: {re.escape(shown)}\)", text), flag
    for family in (strategies.names(), attacks.names(), aggregators.names(), PROCESSES.names(),
                   PROBABILITIES.names(), model_names(), dataset_names(), PARTITIONERS.names()):
        for name in family:
            assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text), name


@pytest.mark.parametrize("name", sorted(n for n, needs in NEEDS.items() if needs.participation))
def test_participation_aware_strategy_under_always_warns(name) -> None:
    assert {"fedau", "known-p", "mifa", "fedvarp"} <= {n for n, v in NEEDS.items() if v.participation}
    lines = config_warnings(load_config(None, {"strategy": name}))
    assert len(lines) == 1 and "\n" not in lines[0]
    assert f"'{name}'" in lines[0] and "--participation bernoulli" in lines[0]
    assert config_warnings(load_config(None, {"strategy": name, "participation.process": "bernoulli"})) == []


def test_fedavg_under_always_does_not_warn() -> None:
    assert config_warnings(load_config(None, {})) == []


def test_the_warning_is_one_stderr_line_and_the_run_goes_on(tmp_path, capsys) -> None:
    code = run_cli.main([*TINY, "--strategy", "fedau", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 0
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "fedau" in warnings[0]
    assert (tmp_path / "r" / "summary.json").exists()
