"""One schema for a run: YAML config files and CLI overrides are validated against it.

``load_config(path, overrides)`` merges (defaults ← YAML file ← ``--flag`` / ``key=value``
overrides), validates types, ranges and names (strategy, dataset, partition, model, engine,
participation process, attack, aggregator and their declared parameters), and raises
:class:`fedagg.errors.ConfigError` naming the offending key. Also refused at load: non-finite numbers,
settings that would do nothing (an attack without Byzantine clients or the reverse, ``local_steps``
0, ``server_lr`` 0), a model the strategy cannot use (a strategy that needs a model kind selects it
when ``model`` is not set), and what the strategy's constructor rejects (it is built once).
:func:`config_warnings` names valid settings that make the strategy pointless.
"""

from __future__ import annotations

import copy
import datetime as _dt
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from fedagg.errors import ConfigError, unknown_name
from strategies.common import CommonParams, Frozen, StrategyRun

ENGINES = ("auto", "ray", "flower", "inline")


class _Strict(Frozen):
    """Unknown keys and non-finite numbers (``lr=inf``, ``momentum=nan``) are bad input; a loaded
    config is read-only (``model_copy(update=...)`` makes a changed one)."""


class ParticipationConfig(_Strict):
    """Which clients are available each round (the environment, not the server's choice).

    ``process``: ``always`` (every client every round), ``bernoulli``, ``markov``, ``cyclic``;
    ``args``: the process's parameters (e.g. ``{a: 0.05}`` for markov, ``{period: 100}`` for cyclic);
    ``probabilities``: how the per-client probabilities p_n are set (e.g. ``{kind: heterogeneous,
    alpha: 0.1, mean: 0.1, floor: 0.02}``, ``{kind: constant, p: 0.1}``, ``{kind: explicit, p: [...]}``).
    """

    process: str = "always"
    args: dict[str, Any] = Field(default_factory=dict)
    probabilities: dict[str, Any] = Field(default_factory=lambda: {"kind": "heterogeneous"})

    @field_validator("probabilities", mode="before")
    @classmethod
    def _default_kind(cls, value: Any) -> Any:
        """``probabilities.mean=0.2`` alone keeps the default kind (heterogeneous)."""
        if isinstance(value, dict) and "kind" not in value:
            return {"kind": "heterogeneous", **value}
        return value


class RayConfig(_Strict):
    """Ray engine settings. ``address``: None starts a local Ray instance; ``auto`` or
    ``HOST:PORT`` joins an existing cluster. ``num_workers``: actors hosting clients (default: one
    per available CPU / ``cpus_per_worker``)."""

    address: str | None = None
    num_workers: int | None = Field(None, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)


class FaultsConfig(_Strict):
    """Injected failures, to test a strategy or a deployment plan against them.

    Each random decision is drawn from ``(seed, "fault", round, client)``, so it does not depend on
    the engine. ``crash_prob``: the ClientApp raises (an error reply). ``hang_prob`` and ``hang``
    (``[round, client]`` pairs): the client sleeps ``hang_seconds``; with ``round_timeout`` set the
    round goes on without it (needs ``engine: ray``, whose hung worker is replaced).
    ``kill_worker`` (``[round, client]`` pairs): the worker process running that client dies
    mid-task (needs ``engine: ray``; the actor is replaced).
    """

    crash_prob: float = Field(0.0, ge=0, le=1)
    hang_prob: float = Field(0.0, ge=0, le=1)
    hang: list[tuple[int, int]] = Field(default_factory=list)
    hang_seconds: float = Field(3600.0, gt=0)
    kill_worker: list[tuple[int, int]] = Field(default_factory=list)


class ProfileConfig(_Strict):
    """A group of clients with its own hardware (see ``docs/ray.md``).

    Membership: ``count`` clients, or a ``fraction`` of all clients (assigned by a seeded
    permutation, in profile order; clients left over get the default profile). Resources map to the
    Ray actors that host the group's clients: ``num_cpus``, ``num_gpus`` (fractions such as 0.25),
    custom ``resources``; ``gpu: optional`` falls back to CPU when the cluster has no GPU.
    ``speed`` is relative compute speed (simulated time); ``local_steps``/``batch_size`` override the
    run's; ``dropout_prob`` is the chance per round that a selected client drops out (an error reply);
    ``bandwidth_mbps`` its link speed (simulated time).
    """

    name: str = "default"
    count: int | None = Field(None, ge=0)
    fraction: float | None = Field(None, ge=0, le=1)
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    gpu: Literal["required", "optional"] = "required"
    resources: dict[str, float] = Field(default_factory=dict)
    workers: int | None = Field(None, ge=1)
    speed: float = Field(1.0, gt=0)
    local_steps: int | None = Field(None, ge=0)
    batch_size: int | None = Field(None, ge=1)
    dropout_prob: float = Field(0.0, ge=0, le=1)
    bandwidth_mbps: float = Field(100.0, gt=0)


class SimulatedTimeConfig(_Strict):
    """Simulated wall-clock of a synchronous round (see ``simulations/core/simtime.py``).

    A client-round lasts ``steps · batch_size · seconds_per_sample / speed`` (compute) plus
    ``latency`` + bytes down and up over its ``bandwidth_mbps`` (communication), times a seeded
    lognormal ``jitter``. The round lasts as long as its slowest kept client; with ``deadline`` set,
    clients that would finish later are dropped (stragglers) and the round lasts ``deadline``.
    """

    seconds_per_sample: float = Field(2e-4, gt=0)
    latency: float = Field(0.05, ge=0)
    jitter: float = Field(0.0, ge=0)
    deadline: float | None = Field(None, gt=0)


#: ``server_lr`` when unset; strategies without a server learning rate only accept this value.
SERVER_LR_DEFAULT: float = CommonParams.model_fields["server_lr"].default


class RunConfig(StrategyRun, _Strict):
    """Everything that defines a run, typed and read-only; passed as this object everywhere.

    The keys strategies read (``strategy``, ``strategy_args``, ``aggregator``, ``num_clients``,
    ``seed``, ``server_lr``, the server optimiser, ...) are inherited from
    :class:`strategies.common.StrategyRun`, where they are declared once. Field docs are in
    ``docs/quickstart.md``.
    """

    rounds: int = Field(20, ge=1)
    # data
    dataset: str = "mnist1d"
    dataset_args: dict[str, Any] = Field(default_factory=dict)
    partition: str = "iid"
    alpha: float | None = Field(None, gt=0)
    partition_args: dict[str, Any] = Field(default_factory=dict)
    test_fraction: float = Field(0.2, ge=0, lt=1)
    # model and local training. The defaults make the default run (FedAvg, 10 IID clients, CNN)
    # learn: 80.6 % test accuracy after its 20 rounds, 91.4 % after 40 (docs/quickstart.md). The
    # momentum buffer is the client's own and starts from zero every round.
    model: str = "cnn"
    model_args: dict[str, Any] = Field(default_factory=dict)
    local_steps: int = Field(20, ge=0)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    # server (server_lr and its optimiser: see StrategyRun)
    eval_every: int = Field(1, ge=1)
    eval_last: int = Field(0, ge=0)
    evaluate_clients: float = Field(0.0, ge=0, le=1)
    # environment
    participation: ParticipationConfig = Field(default_factory=ParticipationConfig)
    attack: str | None = None
    attack_args: dict[str, Any] = Field(default_factory=dict)
    num_byzantine: int = Field(0, ge=0)
    # execution
    engine: Literal["auto", "ray", "flower", "inline"] = "auto"
    ray: RayConfig = Field(default_factory=RayConfig)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batched_clients: bool = True
    batch_memory_mb: float = Field(512.0, gt=0)
    profiles: list[ProfileConfig] = Field(default_factory=list)
    simulated_time: SimulatedTimeConfig = Field(default_factory=SimulatedTimeConfig)
    round_timeout: float | None = Field(None, gt=0)
    checkpoint_every: int = Field(0, ge=0)
    keep_checkpoints: int = Field(2, ge=1)
    faults: FaultsConfig = Field(default_factory=FaultsConfig)
    out: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _strategy_selects_model(cls, data: Any) -> Any:
        """A strategy that needs a model kind (``fedins``) selects it when ``model`` is not set."""
        if isinstance(data, dict) and "model" not in data and isinstance(data.get("strategy"), str):
            from strategies.registry import needs

            models = needs(data["strategy"]).models
            if models:
                return {**data, "model": models[0]}
        return data

    def run_dir(self) -> Path:
        """``out``, or ``runs/<strategy>-<timestamp>`` when unset."""
        if self.out:
            return Path(self.out)
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        return Path("runs") / f"{self.strategy}-{stamp}"

    def evaluates(self, rnd: int) -> bool:
        """Whether the server evaluates after round ``rnd`` (1-based): every ``eval_every``-th
        round, every one of the last ``eval_last`` rounds, and the last round."""
        return rnd % self.eval_every == 0 or rnd > self.rounds - self.eval_last or rnd == self.rounds

    def resolved_partition_args(self) -> dict[str, Any]:
        """``partition_args`` with the ``alpha`` shortcut folded in."""
        args = dict(self.partition_args)
        if self.alpha is not None:
            args["alpha"] = self.alpha
        return args


def config_default(key: str) -> Any:
    """The schema default of a (dotted) config key, e.g. ``participation.process`` → ``always``."""
    model: Any = RunConfig
    value: Any = None
    for part in key.split("."):
        field = model.model_fields[part]
        value = field.get_default(call_default_factory=True)
        model = field.annotation
    return value


# ------------------------------------------------------------------------------ errors
def _pydantic_error(exc: ValidationError, model: type[BaseModel] = RunConfig) -> ConfigError:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "config"
    if err["type"] == "extra_forbidden":
        parent: Any = model
        for part in err["loc"][:-1]:
            field = parent.model_fields.get(str(part)) if isinstance(parent, type) else None
            parent = field.annotation if field is not None else None
        allowed = sorted(parent.model_fields) if isinstance(parent, type) and issubclass(parent, BaseModel) else []
        return ConfigError(loc, f"unknown key; allowed: {', '.join(allowed)}")
    if err["type"] == "literal_error" and "expected" in err.get("ctx", {}):
        return ConfigError(loc, f"invalid value {err.get('input')!r}; allowed: {err['ctx']['expected']}")
    msg = err["msg"]
    if "input" in err and not isinstance(err["input"], (dict, list)):
        msg = f"{msg} (got {err['input']!r})"
    return ConfigError(loc, msg)


# ------------------------------------------------------------------------------ loading
def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=3"`` → ``("a.b", 3)``; the value is parsed as a YAML scalar/list/mapping."""
    if "=" not in text:
        raise ConfigError(text, "overrides look like key=value (e.g. rounds=10 or participation.process=markov)")
    key, raw = text.split("=", 1)
    key = key.strip().replace("-", "_")
    if not key:
        raise ConfigError(text, "empty key in override")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data[a][b] = value`` for ``key = "a.b"``, creating mappings on the way."""
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(".".join(parts[: i + 1]), "is not a mapping; cannot set a sub-key")
        node = nxt
    node[parts[-1]] = value


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path`` (ConfigError on a missing file or bad YAML)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("config", f"file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError("config", f"{p} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("config", f"{p} must hold a mapping of keys to values")
    return data


def build_config(data: Mapping[str, Any]) -> RunConfig:
    """Validate a config mapping (schema + names + cross-field rules)."""
    try:
        cfg = RunConfig.model_validate(dict(data))
    except ValidationError as exc:
        raise _pydantic_error(exc) from None
    validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Defaults ← YAML file at ``path`` ← ``overrides`` (dotted keys), validated."""
    data: dict[str, Any] = read_yaml(path) if path else {}
    data = copy.deepcopy(data)
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    return build_config(data)


# ------------------------------------------------------------------------------ semantic checks
def validate(cfg: RunConfig) -> None:
    """Cross-field and registry checks; raises ConfigError naming the key."""
    import strategies
    from fedagg.data import DATASETS, PARTITIONERS
    from fedagg.models import MODELS
    from strategies.base import check_lr_decay
    from strategies.registry import needs

    if cfg.clients_per_round is not None and cfg.clients_per_round > cfg.num_clients:
        raise ConfigError(
            "clients_per_round",
            f"{cfg.clients_per_round} is more than num_clients={cfg.num_clients}",
        )
    entry = strategies.REGISTRY.entry(cfg.strategy, field="strategy")
    check_lr_decay(cfg.server_lr_decay, cfg.server_lr_decay_every)
    entry.resolve(strategies.run_params(cfg), where="strategy_args")
    _validate_no_ops(cfg)
    if not cfg.dataset.startswith("hf:") and cfg.dataset not in DATASETS:
        raise unknown_name("dataset", cfg.dataset, [*DATASETS.names(), "hf:<name>"])
    part = PARTITIONERS.entry(cfg.partition, field="partition")
    if cfg.alpha is not None and part.param("alpha") is None:
        users = [n for n in PARTITIONERS.names() if PARTITIONERS.entry(n).param("alpha")]
        raise ConfigError("alpha", f"only used by partition {', '.join(users)}; partition is {cfg.partition!r}")
    part.resolve(cfg.resolved_partition_args(), where="partition_args")
    MODELS.entry(cfg.model, field="model").resolve(cfg.model_args, where="model_args")
    wanted = needs(cfg.strategy).models
    if wanted and cfg.model not in wanted:
        raise ConfigError("model", f"strategy {cfg.strategy!r} needs model {' or '.join(wanted)}, got "
                          f"{cfg.model!r}; leave model unset and the strategy selects it")
    _validate_participation(cfg)
    if cfg.num_byzantine >= cfg.num_clients and cfg.num_byzantine > 0:
        raise ConfigError("num_byzantine", f"must be < num_clients={cfg.num_clients}")
    hangs = cfg.faults.hang_prob > 0 or bool(cfg.faults.hang)
    if (hangs or cfg.faults.kill_worker) and cfg.engine not in ("ray", "auto"):
        raise ConfigError("faults", "hanging clients and killed workers need engine: ray "
                          "(the inline and flower engines cannot interrupt or survive them)")
    if hangs and cfg.round_timeout is None:
        raise ConfigError("round_timeout", "set a round timeout (seconds) when clients may hang")
    bad = [c for _, c in [*cfg.faults.hang, *cfg.faults.kill_worker] if not 0 <= c < cfg.num_clients]
    if bad:
        raise ConfigError("faults", f"client ids must be in 0..{cfg.num_clients - 1}, got {bad[0]}")
    _validate_profiles(cfg)
    _validate_attack(cfg)
    _build_strategy(cfg)


def _validate_no_ops(cfg: RunConfig) -> None:
    """Settings under which the run would train nothing or never move the global model."""
    if cfg.local_steps == 0 and not any(p.local_steps for p in cfg.profiles):
        raise ConfigError("local_steps", "must be >= 1: with 0 local steps clients send back the "
                          "model they received and the run learns nothing")
    if cfg.eval_last and cfg.eval_every == 1:
        raise ConfigError("eval_last", "only matters with eval_every > 1 (every round is evaluated "
                          "already); drop it or raise eval_every")
    if cfg.eval_last > cfg.rounds:
        raise ConfigError("eval_last", f"must be at most rounds={cfg.rounds} (got {cfg.eval_last})")
    if cfg.server_lr == 0:
        raise ConfigError("server_lr", "must be > 0: with server_lr 0 the global model never "
                          "changes (1.0 applies the aggregate as is)")


def _validate_attack(cfg: RunConfig) -> None:
    """``attack``, ``attack_args`` and ``num_byzantine`` only make sense together."""
    from fedagg import attacks

    if cfg.attack is None:
        if cfg.num_byzantine > 0:
            raise ConfigError("attack", f"num_byzantine={cfg.num_byzantine} needs an attack for the "
                              f"Byzantine clients; set --attack (one of {', '.join(attacks.names())})")
        if cfg.attack_args:
            raise ConfigError("attack_args", "set without an attack; set --attack too, or drop attack_args")
        return
    attacks.REGISTRY.entry(cfg.attack, field="attack")
    if cfg.num_byzantine == 0:
        raise ConfigError("num_byzantine", f"attack {cfg.attack!r} needs Byzantine clients; set "
                          f"--num-byzantine (1 to {max(1, cfg.num_clients - 1)})")
    from simulations.core.byzantine import validate_attack

    validate_attack(cfg)  # attack_args.<key>, and a dry run of the attack


def _validate_participation(cfg: RunConfig) -> None:
    """The participation process, its arguments and the kind of its probabilities."""
    from fedagg.participation import PROBABILITIES, PROCESSES

    part = cfg.participation
    PROCESSES.entry(part.process, field="participation.process").resolve(part.args, where="participation.args")
    if part.process != "always":
        spec = dict(part.probabilities)
        kind = spec.pop("kind", None)
        if kind is None:
            raise ConfigError("participation.probabilities.kind",
                              f"required; allowed: {', '.join(PROBABILITIES.names())}")
        PROBABILITIES.entry(kind, field="participation.probabilities.kind").resolve(
            spec, where="participation.probabilities")


def _build_strategy(cfg: RunConfig) -> None:
    """Build the strategy once, so that what only its constructor checks (an aggregator chain, a
    rule that cannot run with this many clients) fails now. Strategies that need what only the run
    provides (a validation split, the true participation probabilities) are built by the runner."""
    import strategies

    entry = strategies.REGISTRY.entry(cfg.strategy)
    if entry.param("validation") is not None or (
            entry.param("probabilities") is not None and cfg.strategy_args.get("probabilities") is None):
        return
    strategies.build_run(cfg, num_byzantine=cfg.num_byzantine)


def config_warnings(cfg: RunConfig) -> list[str]:
    """Valid settings that make the chosen strategy pointless, one line each (for stderr)."""
    from strategies.registry import needs

    out = []
    if needs(cfg.strategy).participation and cfg.participation.process == "always":
        out.append(f"strategy {cfg.strategy!r} compensates unequal client participation, but "
                   "participation is 'always' (every client, every round): it reduces to an "
                   "unweighted FedAvg; set --participation bernoulli (or markov, cyclic)")
    return out


def _validate_profiles(cfg: RunConfig) -> None:
    names = [p.name for p in cfg.profiles]
    if len(set(names)) != len(names):
        raise ConfigError("profiles", f"profile names must be unique, got {names}")
    for i, p in enumerate(cfg.profiles):
        if (p.count is None) == (p.fraction is None):
            raise ConfigError(f"profiles[{i}]", "give exactly one of count or fraction")
    from simulations.core.profiles import profile_sizes

    sizes = profile_sizes(cfg)
    if sum(sizes[: len(cfg.profiles)]) > cfg.num_clients:
        raise ConfigError("profiles", f"profiles hold {sum(sizes[: len(cfg.profiles)])} clients "
                          f"but num_clients={cfg.num_clients}")


def dump_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (every key, defaults included)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def config_changes(want: Any, have: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, have, want)`` for every leaf where two config dumps differ, keys sorted.

    Nested mappings are compared key by key; any other values (lists included) as a whole.
    """
    if not (isinstance(want, Mapping) and isinstance(have, Mapping)):
        return [] if want == have else [(prefix, have, want)]
    out: list[tuple[str, Any, Any]] = []
    for k in sorted(set(want) | set(have)):
        out += config_changes(want.get(k), have.get(k), f"{prefix}.{k}" if prefix else str(k))
    return out
