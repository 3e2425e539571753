"""The Flower App (simulations/flower_app.py): pyproject's app section, run config keys and their
errors (the CLI's), and the module-level ServerApp/ClientApp run in this process on our grid.

The same apps on a real SuperLink and SuperNodes: test_deployment.py."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict
from flwr.common.config import flatten_dict

from fedagg.errors import ConfigError
from simulations import flower_app
from simulations import run as cli
from simulations.core.config import load_config

REPO = Path(__file__).resolve().parents[2]


def app_defaults() -> dict:
    """``[tool.flwr.app.config]`` flattened as Flower hands it to the apps."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    return flatten_dict(config)


def test_pyproject_declares_a_valid_flower_app_that_trains_fedau_on_mnist1d() -> None:
    from flwr.cli.config_utils import load_and_validate

    config, _warnings = load_and_validate(REPO / "pyproject.toml")  # components import and resolve
    app = config["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "simulations.flower_app:server_app",
                                 "clientapp": "simulations.flower_app:client_app"}
    # flwr 1.41 moves a federations table into ~/.flwr by rewriting pyproject.toml
    assert "federations" not in config["tool"]["flwr"]
    cfg = flower_app.parse_run_config(app_defaults()).config(num_partitions=4)
    assert (cfg.strategy, cfg.dataset, cfg.participation.process, cfg.engine) == ("fedau", "mnist1d", "bernoulli", "flower")
    assert cfg.num_clients == 4  # num-clients "" = one client per SuperNode


def test_the_bundle_carries_the_three_packages_only() -> None:
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(REPO))).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"pyproject.toml", ".info", "fedagg", "strategies", "simulations"}
    assert "simulations/flower_app.py" in names and "simulations/configs/robust_mnist1d.yaml" in names


def test_app_keys_mean_what_the_cli_flags_and_overrides_mean() -> None:
    settings = flower_app.parse_run_config({
        "strategy": "fedavg", "num-clients": 7, "clients-per-round": "", "participation": "markov",
        "participation.args.a": 0.05, "round-timeout": 30, "local_steps": 3,
        "overrides": "seed=3 dataset_args.num_samples=1000", "log": "", "overwrite": True,
        "node-wait": 5})
    args = cli.build_parser().parse_intermixed_args([
        "--strategy", "fedavg", "--num-clients", "7", "--participation", "markov", "participation.args.a=0.05",
        "round_timeout=30", "--local-steps", "3", "seed=3", "dataset_args.num_samples=1000", "engine=flower"])
    assert settings.config().model_dump() == load_config(None, cli.collect_overrides(args)).model_dump()
    assert (settings.overwrite, settings.node_wait, settings.num_clients) == (True, 5.0, 7)
    assert flower_app.parse_run_config({"num-clients": ""}).num_clients is None


@pytest.mark.parametrize(("app", "argv"), [
    ({"rounds": 0}, ["--rounds", "0"]),
    ({"strategy": "nope"}, ["--strategy", "nope"]),
    ({"participation": "sometimes"}, ["--participation", "sometimes"]),
    ({"num-byzantine": 2}, ["--num-byzantine", "2"]),
    ({"lr": -1}, ["--lr", "-1"]),
    ({"overrides": "momentum=2"}, ["momentum=2"]),
    ({"overrides": "participation.probabilities.mean"}, ["participation.probabilities.mean"]),
])
def test_a_bad_value_fails_with_the_cli_line(app, argv, tmp_path, capsys) -> None:
    """What the ServerApp checks before its first round (config, then the Simulation's set-up)."""
    from simulations.core.runner import Simulation

    assert cli.main([*argv, "--out", str(tmp_path / "cli")]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: ") and "\n" not in line
    with pytest.raises(ConfigError) as err:
        Simulation(flower_app.parse_run_config({**app, "out": str(tmp_path / "app")}).config(10))
    assert f"error: {err.value}" == line
    assert not (tmp_path / "cli").exists() and not (tmp_path / "app").exists()


@pytest.mark.parametrize(("app", "field"), [
    ({"node-wait": 0}, "node-wait"), ({"overwrite": "yes"}, "overwrite"), ({"log": 1}, "log"),
])
def test_app_options_are_type_checked(app, field) -> None:
    with pytest.raises(ConfigError) as err:
        flower_app.parse_run_config(app)
    assert err.value.field == field


def test_the_engine_is_flowers_runtime_and_cannot_be_set() -> None:
    with pytest.raises(ConfigError) as err:
        flower_app.parse_run_config({"overrides": "engine=ray"}).config(3)
    assert err.value.field == "engine"


def test_an_unknown_tracker_is_refused() -> None:
    with pytest.raises(ConfigError, match="log: unknown value 'wandb'; allowed: mlflow, tensorboard"):
        flower_app.tracker_names(flower_app.parse_run_config({"log": "tensorboard,wandb"}))


def in_process_grid(num_nodes: int, run_config: dict):
    """Our SimGrid running the module-level ClientApp with ``run_config`` in its Context, as
    Flower's runtime would (node config: ``partition-id``, ``num-partitions``)."""
    from simulations.core.engine.executors import InlineExecutor
    from simulations.core.engine.sim_grid import SimGrid

    def client(message, context: Context):
        context.run_config = dict(run_config)
        return flower_app.client_app(message, context)

    return SimGrid(num_nodes, InlineExecutor(client, num_nodes))


def run_server(grid, run_config: dict) -> None:
    flower_app.server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                        run_config=dict(run_config)))


def test_num_clients_must_match_the_federation(tmp_path) -> None:
    run_config = {**app_defaults(), "num-clients": 3, "out": str(tmp_path / "app")}
    with pytest.raises(ConfigError, match="num-clients: 3, but the SuperNodes hold num-partitions=4"):
        run_server(in_process_grid(4, run_config), run_config)
    assert not (tmp_path / "app").exists()


@pytest.mark.slow
def test_server_and_client_apps_run_a_federation_in_process_like_the_inline_engine(tmp_path, monkeypatch) -> None:
    """The module-level apps on our SimGrid: the ClientApp gets only its Context (run config, node
    config), the ServerApp maps nodes to clients by query; the result is the inline engine's."""
    from simulations.core.results import load_arrays, read_metrics
    from simulations.core.runner import Simulation

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_config = {**app_defaults(), "rounds": 2, "local-steps": 10, "seed": 1, "out": str(tmp_path / "app"),
                  "overrides": "dataset_args.num_samples=1000", "log": "tensorboard,mlflow"}
    run_server(in_process_grid(4, run_config), run_config)
    rows = read_metrics(tmp_path / "app")
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert (tmp_path / "app" / "tensorboard").is_dir() and (tmp_path / "app" / "mlruns" / "mlflow.db").is_file()

    cfg = flower_app.parse_run_config({**run_config, "log": ""}).config(4)
    # per-client ClientApp calls on Flower's grid: bit-identical to the inline engine's per-client path
    ref = Simulation(load_config(None, {**cfg.model_dump(), "engine": "inline", "batched_clients": False,
                                        "out": str(tmp_path / "ref")})).run()
    model = load_arrays(tmp_path / "app" / "model.safetensors")
    assert all(model[k].tobytes() == v.tobytes() for k, v in ref.arrays.items())
    assert [r["available"] for r in rows[1:]] == [r["available"] for r in ref.rows[1:]]
