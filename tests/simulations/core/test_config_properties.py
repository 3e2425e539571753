"""Property tests: any config dict is either a valid RunConfig or a one-line ConfigError."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedagg.errors import ConfigError
from simulations.core.config import RunConfig, build_config, parse_override

KEYS = sorted(RunConfig.model_fields) + ["colour", "participation.process", "ray.num_workers",
                                         "faults.crash_prob", "strategy_args.proximal_mu"]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 10_000), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["fedavg", "fedprox", "mnist1d", "dirichlet", "ray", "inline",
                                           "bernoulli", "cnn", "mlp", "0.5", "-1"]),
)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.text(max_size=6), SCALARS, max_size=3))


def nest(flat: dict[str, object]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                break
            node = child
        else:
            node[parts[-1]] = value
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=6))
def test_random_configs_validate_or_fail_with_a_config_error(flat) -> None:
    try:
        cfg = build_config(nest(flat))
    except ConfigError as exc:
        text = str(exc)
        assert "\n" not in text and exc.field and text.startswith(exc.field.split(".")[0].split("[")[0])
    else:
        assert isinstance(cfg, RunConfig)
        if cfg.clients_per_round is not None:
            assert cfg.clients_per_round <= cfg.num_clients
        assert cfg.rounds >= 1 and cfg.lr > 0


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30))
def test_random_override_strings_parse_or_fail_cleanly(text) -> None:
    try:
        key, _ = parse_override(text)
    except ConfigError:
        return
    assert key and "=" in text
