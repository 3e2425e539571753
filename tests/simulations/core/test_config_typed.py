"""One typed run configuration (issue 16, item 1): declared once, validated once at load, passed
as the object; ``server_lr`` goes CLI → RunConfig → strategy constructor → use."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest

import strategies
from fedagg.errors import ConfigError
from simulations import run as run_cli
from simulations.core.client_app import ClientRuntime
from simulations.core.config import RunConfig, load_config
from strategies.common import CommonParams, ServerOptimizerParams, StrategyRun

#: One bogus value per name-valued field (plus what the check needs), and the field the error names.
BAD_NAMES: dict[str, dict[str, object]] = {
    "strategy": {"strategy": "bogus"},
    "dataset": {"dataset": "bogus"},
    "partition": {"partition": "bogus"},
    "model": {"model": "bogus"},
    "attack": {"attack": "bogus", "num_byzantine": 1},
    "aggregator": {"strategy": "robust", "aggregator": "bogus"},
    "engine": {"engine": "bogus"},
    "device": {"device": "bogus"},
    "participation.process": {"participation.process": "bogus"},
    "participation.probabilities.kind": {"participation.process": "bernoulli",
                                         "participation.probabilities.kind": "bogus"},
}


@pytest.mark.parametrize("field", sorted(BAD_NAMES))
def test_a_wrong_name_in_any_field_fails_at_load_naming_the_field(field) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, BAD_NAMES[field])
    assert exc.value.field == field, str(exc.value)
    assert "bogus" in exc.value.message


def test_every_name_flag_of_the_cli_is_covered() -> None:
    """A new name-valued flag needs a case in BAD_NAMES (``out`` and ``ray.address`` are free text)."""
    assert run_cli.NAME_KEYS - {"out", "ray.address"} <= set(BAD_NAMES)


def test_a_registry_name_for_a_strategy_without_that_knob_is_an_error() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, {"strategy": "fedavg", "aggregator": "median"})
    assert exc.value.field == "aggregator" and "no aggregator to choose" in exc.value.message


def test_run_level_strategy_keys_are_declared_once() -> None:
    """RunConfig inherits them from strategies.common; the registry's Params derive from them."""
    own = set(vars(RunConfig).get("__annotations__", {}))
    assert not own & set(StrategyRun.model_fields)
    assert set(StrategyRun.model_fields) <= set(RunConfig.model_fields)
    assert [p.name for p in strategies.COMMON_PARAMS] == list(CommonParams.model_fields)
    assert [p.name for p in strategies.SERVER_OPTIMIZER_PARAMS] == list(ServerOptimizerParams.model_fields)
    cfg = RunConfig()
    for p in (*strategies.COMMON_PARAMS, *strategies.SERVER_OPTIMIZER_PARAMS):
        assert getattr(cfg, p.name) == p.default, p.name
    lr = strategies.REGISTRY.entry("fedavg").param("server_lr")
    assert lr is not None and (lr.low, lr.default) == (0.0, 1.0)
    with pytest.raises(ConfigError, match="server_lr: must be >= 0.0"):
        strategies.build("fedavg", server_lr=-1.0)


def test_the_loaded_config_is_read_only() -> None:
    cfg = load_config(None, {"server_lr": 0.5})
    with pytest.raises(Exception, match="frozen"):
        cfg.server_lr = 2.0  # type: ignore[misc]
    with pytest.raises(Exception, match="frozen"):
        cfg.participation.process = "markov"  # type: ignore[misc]


def test_server_lr_goes_cli_to_runconfig_to_constructor_to_use(tmp_path, monkeypatch) -> None:
    """Hop 1: the flag lands in RunConfig.server_lr. Hop 2: the runner hands that object to
    strategies.build_run, whose factory receives the value. Hop 3: the server step uses it."""
    args = run_cli.build_parser().parse_intermixed_args(
        ["--server-lr", "0.5", "--model", "mlp", "--num-clients", "3", "--rounds", "1",
         "--out", str(tmp_path / "r"), "dataset_args.num_samples=300"])
    cfg = load_config(None, run_cli.collect_overrides(args))
    assert isinstance(cfg, RunConfig) and cfg.server_lr == 0.5  # hop 1

    seen: dict[str, object] = {}
    real_build_run = strategies.build_run

    def build_run(run, **offered):
        seen["run"] = run
        return real_build_run(run, **offered)

    entry = strategies.REGISTRY.entry("fedavg")

    def factory(**kw):
        seen["kwargs"] = kw
        return entry.factory(**kw)

    monkeypatch.setattr(strategies, "build_run", build_run)
    monkeypatch.setitem(strategies.REGISTRY._entries, "fedavg", dataclasses.replace(entry, factory=factory))
    from simulations.core.runner import Simulation

    sim = Simulation(cfg)
    try:
        assert seen["run"] is sim.cfg and isinstance(seen["run"], RunConfig)  # hop 2: the object
        assert seen["kwargs"]["server_lr"] == 0.5  # type: ignore[index]
        assert sim.strategy.server_lr == 0.5
        g, a = np.zeros(4), np.arange(4.0)
        np.testing.assert_array_equal(sim.strategy.server_step(1, g, a)[0], 0.5 * a)  # hop 3: the use
    finally:
        sim.writer.close()


def test_runtime_crosses_a_process_boundary_as_json_and_comes_back_typed() -> None:
    cfg = load_config(None, {"seed": 3, "profiles": [{"name": "slow", "count": 2, "local_steps": 1}]})
    state = ClientRuntime(cfg).__getstate__()
    assert isinstance(state["config"], dict)  # JSON-ready on the wire
    back = pickle.loads(pickle.dumps(ClientRuntime(cfg)))
    assert isinstance(back.config, RunConfig) and back.config == cfg
    assert back.profiles.of(int(np.flatnonzero(back.profiles.assignment == 0)[0])).local_steps == 1


@pytest.mark.parametrize(("argv", "field"), [
    (["--strategy", "fedadam", "--server-lr", "0.5"], "server_lr"),
    (["--strategy", "fedadam", "--server-momentum", "0.5"], "server_momentum"),
    (["--strategy", "fedavg", "--aggregator", "median"], "aggregator"),
    (["--participation", "bogus"], "participation.process"),
    (["strategy_args.server_lr=2"], "strategy_args.server_lr"),
])
def test_keys_a_strategy_cannot_honour_exit_2(argv, field, cli_refuses) -> None:
    cli_refuses(argv, field)


def test_strategy_run_builds_from_its_own_fields() -> None:
    """strategies.build_run works on the strategy-side model alone (no simulations import)."""
    run = StrategyRun(strategy="median", num_clients=5, server_lr=0.25, server_momentum=0.5)
    s = strategies.build_run(run)
    assert (s.server_lr, s.server_momentum) == (0.25, 0.5)
    with pytest.raises(ConfigError) as exc:
        strategies.build_run(StrategyRun(strategy="fedadam", server_lr=0.5))
    assert exc.value.field == "server_lr"
