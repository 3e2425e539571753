"""Client profiles and simulated time: assignment, per-client overrides, deadline drops."""

from __future__ import annotations

import numpy as np
import pytest

from fedagg.errors import ConfigError
from simulations.core.config import load_config
from simulations.core.profiles import ProfileTable, assignment, profile_sizes
from simulations.core.results import read_metrics
from simulations.core.runner import Simulation
from simulations.core.simtime import SimClock

TWO = [{"name": "fast", "fraction": 0.7, "speed": 1.0},
       {"name": "slow", "count": 3, "speed": 0.1, "bandwidth_mbps": 1.0, "local_steps": 2}]


def test_profile_assignment_is_seeded_and_sized() -> None:
    cfg = load_config(None, {"num_clients": 10, "profiles": TWO})
    a = assignment(cfg)
    assert profile_sizes(cfg) == [7, 3, 0]
    assert np.bincount(a, minlength=3).tolist() == [7, 3, 0]
    assert np.array_equal(a, assignment(cfg))
    other = assignment(cfg.model_copy(update={"seed": 1}))
    assert not np.array_equal(a, other)


def test_profile_validation_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"profiles\[0\]"):
        load_config(None, {"profiles": [{"name": "x"}]})
    with pytest.raises(ConfigError, match="profiles"):
        load_config(None, {"num_clients": 4, "profiles": [{"name": "a", "count": 3}, {"name": "b", "count": 3}]})
    with pytest.raises(ConfigError, match="profiles"):
        load_config(None, {"profiles": [{"name": "a", "count": 1}, {"name": "a", "count": 1}]})
    with pytest.raises(ConfigError, match=r"profiles\.0\.speed"):
        load_config(None, {"profiles": [{"name": "a", "count": 1, "speed": 0}]})


def test_client_seconds_follow_the_formula() -> None:
    cfg = load_config(None, {"num_clients": 10, "profiles": TWO, "local_steps": 5, "batch_size": 32,
                             "simulated_time": {"seconds_per_sample": 1e-3, "latency": 0.1}})
    table = ProfileTable(cfg)
    clock = SimClock(cfg, table)
    fast = int(np.flatnonzero(table.assignment == 0)[0])
    slow = int(np.flatnonzero(table.assignment == 1)[0])
    mb = 1_000_000
    assert clock.client_seconds(1, fast, mb, mb) == pytest.approx(5 * 32 * 1e-3 + 0.2 + 16 * mb / 100e6)
    assert clock.client_seconds(1, slow, mb, mb) == pytest.approx(2 * 32 * 1e-3 / 0.1 + 0.2 + 16 * mb / 1e6)
    timing = clock.settle(1, {fast: (mb, mb), slow: (mb, mb)})
    assert timing.seconds == pytest.approx(clock.client_seconds(1, slow, mb, mb))
    assert clock.time == pytest.approx(timing.seconds)


def test_two_profiles_show_slow_clients_and_deadline_drops_in_metrics(tmp_path) -> None:
    cfg = load_config(None, {
        "engine": "inline", "rounds": 3, "num_clients": 10, "model": "mlp",
        "dataset_args": {"num_samples": 1000}, "profiles": TWO,
        "simulated_time": {"deadline": 1.0, "jitter": 0.1}, "out": str(tmp_path / "p"),
    })
    Simulation(cfg).run()
    rows = read_metrics(tmp_path / "p")[1:]
    for r in rows:
        assert r["stragglers"] == 3 and r["clients"] == 7  # the 3 slow clients miss the deadline
        assert r["sim_seconds"] == pytest.approx(1.0)
        assert r["sim_seconds_slow"] > 1.0 > r["sim_seconds_fast"]
    assert rows[-1]["sim_time"] == pytest.approx(3.0)
    # without a deadline every client is kept and the round lasts as long as the slowest one
    cfg2 = load_config(None, {**cfg.model_dump(), "simulated_time": {"jitter": 0.1}, "out": str(tmp_path / "q")})
    rows2 = read_metrics(Simulation(cfg2).run().run_dir)[1:]
    assert all(r["stragglers"] == 0 and r["clients"] == 10 for r in rows2)
    assert all(r["sim_seconds"] == pytest.approx(r["sim_seconds_slow"]) for r in rows2)


def test_profile_overrides_local_steps_and_dropout(tmp_path) -> None:
    from flwr.app import ConfigRecord

    from simulations.core.client_app import ClientRuntime

    profs = [{"name": "flaky", "count": 5, "dropout_prob": 1.0, "batch_size": 8, "local_steps": 1}]
    cfg = load_config(None, {"engine": "inline", "rounds": 2, "num_clients": 10, "model": "mlp",
                             "dataset_args": {"num_samples": 1000}, "profiles": profs,
                             "out": str(tmp_path / "d")})
    rt = ClientRuntime(cfg)
    flaky = [c for c in range(10) if rt.profiles.of(c).name == "flaky"]
    steady = [c for c in range(10) if c not in flaky]
    tc = rt.train_config(ConfigRecord({"local-steps": 5}), flaky[0])
    assert (tc.steps, tc.batch_size) == (1, 8)
    assert rt.train_config(ConfigRecord({"local-steps": 5}), steady[0]).steps == 5
    rows = read_metrics(Simulation(cfg).run().run_dir)[1:]
    assert all(r["failures"] == 5 and r["clients"] == 5 for r in rows)


def test_gpu_profile_without_gpu_is_refused_unless_optional(tmp_path) -> None:
    """Resource checks run against a cluster description (no Ray needed)."""
    from simulations.core.engine import worker_pools

    class FakeRay:
        @staticmethod
        def cluster_resources():
            return {"CPU": 2.0}

    made = iter(range(100))

    def sim(gpu: str):  # the config and its client → profile table, as worker_pools takes them
        cfg = load_config(None, {"engine": "ray", "num_clients": 6, "model": "mlp",
                                 "dataset_args": {"num_samples": 600},
                                 "out": str(tmp_path / f"{gpu}-{next(made)}"),
                                 "profiles": [{"name": "gpu", "count": 2, "num_gpus": 0.25, "gpu": gpu},
                                              {"name": "ssd", "count": 2, "resources": {"slow_worker": 1}}]})
        return cfg, ProfileTable(cfg)

    with pytest.raises(ConfigError, match=r"profiles\[0\]\.num_gpus: .*no GPU"):
        worker_pools(FakeRay, *sim("required"))
    with pytest.raises(ConfigError, match=r"profiles\[1\].*slow_worker"):
        worker_pools(FakeRay, *sim("optional"))

    class FakeRay2(FakeRay):
        @staticmethod
        def cluster_resources():
            return {"CPU": 2.0, "slow_worker": 1.0}

    # three pools of one 1-CPU worker each do not fit in 2 CPUs: refused, not left pending
    with pytest.raises(ConfigError, match="ray.num_workers: the workers need 3 CPU"):
        worker_pools(FakeRay2, *sim("optional"))

    class FakeRay4(FakeRay):
        @staticmethod
        def cluster_resources():
            return {"CPU": 4.0, "slow_worker": 1.0}

    pools = worker_pools(FakeRay4, *sim("optional"))
    assert [p.name for p in pools] == ["gpu", "ssd", "default"]
    assert pools[0].options["num_gpus"] == 0.0  # fell back to CPU
    assert pools[1].options["resources"] == {"slow_worker": 1}
    assert all(p.workers >= 1 for p in pools)
