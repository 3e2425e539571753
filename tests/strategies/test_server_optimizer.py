"""The server optimiser of every delta strategy: heavy-ball momentum, weight decay and a step-decay
schedule on the aggregate (strategies/base.py::DeltaStrategy), its state and its config keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import strategies
from fedagg.errors import ConfigError
from simulations.core.config import load_config
from simulations.core.results import load_arrays, save_arrays
from strategies.arrays import Layout, to_numpy
from strategies.robust import RULE_STRATEGIES
from strategies.testing import run_round

G0 = {"w": np.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": np.array([0.5, -0.25, 2.0])}  # float64
LAYOUT = Layout.of(G0)
D = LAYOUT.dim
OPT = {"server_momentum": 0.9, "server_weight_decay": 0.01, "server_lr_decay": 0.5,
       "server_lr_decay_every": 2}


def flat(arrays) -> np.ndarray:
    return LAYOUT.flatten(arrays if isinstance(arrays, dict) else to_numpy(arrays))


def gradients(rounds: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=D) for _ in range(rounds)]


def torch_sgd(grads: list[np.ndarray], lr: float, momentum: float, weight_decay: float,
              decay: float | None, every: int | None) -> list[np.ndarray]:
    """Parameters after each torch.optim.SGD step on ``grads`` (StepLR once per step)."""
    p = torch.nn.Parameter(torch.tensor(flat(G0), dtype=torch.float64))
    opt = torch.optim.SGD([p], lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=every, gamma=decay) if decay else None
    out = []
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        if sched is not None:
            sched.step()
        out.append(p.detach().numpy().copy())
    return out


# ----------------------------------------------------------------------------- (a) = torch SGD
@pytest.mark.parametrize(("lr", "momentum", "wd", "decay", "every"), [
    (0.5, 0.9, 0.1, None, None),
    (0.3, 0.0, 0.05, None, None),     # weight decay alone
    (0.2, 0.5, 0.0, None, None),      # momentum alone
    (1.0, 0.9, 5e-4, 0.2, 3),         # the Flag Aggregator paper's protocol, shorter period
])
def test_one_client_fedavg_equals_torch_sgd_on_the_same_gradients(lr, momentum, wd, decay, every):
    """Replies ``local = global − g_t`` (one client, one plain SGD step of lr 1 on g_t)."""
    rounds = 8
    grads = gradients(rounds)
    want = torch_sgd(grads, lr, momentum, wd, decay, every)
    s = strategies.build("fedavg", num_clients=1, server_lr=lr, server_momentum=momentum,
                         server_weight_decay=wd, server_lr_decay=decay, server_lr_decay_every=every)
    x = dict(G0)
    for t, g in enumerate(grads, start=1):
        local = LAYOUT.unflatten(flat(x) - g)
        arrays, _ = run_round(s, t, x, {0: local})
        x = to_numpy(arrays)
        np.testing.assert_allclose(flat(x), want[t - 1], rtol=0, atol=1e-6, err_msg=f"round {t}")
    assert np.abs(flat(x) - want[-1]).max() < 1e-12  # float64 throughout: equal to rounding
    # the plain step would have ended elsewhere: the optimiser did something
    plain = flat(G0) - lr * np.sum(grads, axis=0)
    assert np.abs(flat(x) - plain).max() > 1e-3


def test_defaults_are_the_plain_step_bit_for_bit():
    grads = gradients(4, seed=1)
    runs = []
    for kw in ({}, {"server_momentum": 0.0, "server_weight_decay": 0.0},
               {"server_lr_decay": 1.0, "server_lr_decay_every": 1}):
        s = strategies.build("fedavg", num_clients=2, server_lr=0.7, **kw)
        x, xs = dict(G0), []
        for t, g in enumerate(grads, start=1):
            locs = {0: LAYOUT.unflatten(flat(x) - g), 1: LAYOUT.unflatten(flat(x) + 0.5 * g)}
            arrays, _ = run_round(s, t, x, locs, num_examples={0: 3, 1: 1})
            # today's step, as the code before the server optimiser computed it
            g_flat = flat(x)
            agg = np.array([0.75, 0.25]) @ (np.stack([flat(locs[0]), flat(locs[1])]) - g_flat)
            x = to_numpy(arrays)
            xs.append(flat(x))
            assert xs[-1].tobytes() == (g_flat + 0.7 * agg).tobytes()
        assert s.state_dict() == {}  # no momentum buffer without momentum
        runs.append(np.stack(xs))
    assert runs[0].tobytes() == runs[1].tobytes() == runs[2].tobytes()


# ----------------------------------------------------------------------------- (b) step decay
def test_step_decay_gives_the_expected_lr_per_round():
    s = strategies.build("fedavg", num_clients=1, server_lr=0.5, server_lr_decay=0.2,
                         server_lr_decay_every=3)
    want = [0.5, 0.5, 0.5, 0.1, 0.1, 0.1, 0.02, 0.02]
    assert [s.server_lr_at(t) for t in range(1, 9)] == pytest.approx(want, rel=1e-15)
    x = dict(G0)
    ones = np.ones(D)
    for t in range(1, 9):  # Δ = 1 everywhere: the step is η_t
        arrays, _ = run_round(s, t, x, {0: LAYOUT.unflatten(flat(x) + ones)})
        step = flat(to_numpy(arrays)) - flat(x)
        np.testing.assert_allclose(step, want[t - 1], rtol=1e-12)
        x = to_numpy(arrays)
    from strategies.base import step_decay

    assert step_decay(1.0, 10, 0.2, 10) == 1.0 and step_decay(1.0, 11, 0.2, 10) == pytest.approx(0.2)
    assert step_decay(0.3, 99, None, None) == 0.3


# ------------------------------------------------------------------ (c) every rule composes
def heavy_ball(steps: list[np.ndarray], x0: np.ndarray, lr: float, m: float, wd: float,
               decay: float, every: int) -> list[np.ndarray]:
    """θ_t from the plain aggregates ``steps`` (a_t) by the documented recursion."""
    x, v, out = x0.copy(), None, []
    for t, a in enumerate(steps, start=1):
        u = a - wd * x
        v = u if v is None else m * v + u
        x = x + lr * decay ** ((t - 1) // every) * v
        out.append(x)
    return out


def rule_strategies() -> list[tuple[str, dict]]:
    """Every robust rule (by registry name, with f where it takes one), a chain, the FedAU family,
    FedIns-free soups and fedavg."""
    import fedagg.aggregators as agg

    out = [(n, {"f": 1} if "f" in agg.declared_params(n) else {}) for n in sorted(RULE_STRATEGIES)]
    out.append(("robust", {"aggregator": "nnm+trimmed-mean", "f": 1}))
    out += [(n, {}) for n in ("fedavg", "fedau", "fedavg-participating", "fedavg-all", "mifa",
                              "fedvarp", "uniform-soup", "temporal-soup")]
    out.append(("known-p", {"probabilities": [0.5] * 7}))
    return out


@pytest.mark.parametrize(("name", "extra"), rule_strategies(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_delta_rule_accepts_the_server_optimizer(name, extra):
    """Two rounds with momentum/wd/decay give finite weights, and (the aggregates not depending on
    the global model here) exactly the heavy-ball recursion over the plain rule's aggregates."""
    rng = np.random.default_rng(3)
    deltas = [rng.normal(0.0, 0.1, size=(7, D)) + 0.2 for _ in range(3)]
    for d in deltas:
        d[-1] = 5.0  # one outlier for the robust rules to remove
    n_ex = {k: 10 + k for k in range(7)}

    def play(**opt) -> tuple[list[np.ndarray], object]:
        s = strategies.build(name, num_clients=7, **extra, **opt)
        x, xs = dict(G0), []
        for t, d in enumerate(deltas, start=1):
            locs = {k: LAYOUT.unflatten(flat(x) + d[k]) for k in range(7)}
            arrays, metrics = run_round(s, t, x, locs, num_examples=n_ex)
            assert arrays is not None and metrics.get("infeasible", 0) == 0, (name, t)
            x = to_numpy(arrays)
            xs.append(flat(x))
        return xs, s

    plain, _ = play(server_lr=1.0)
    aggregates = [plain[0] - flat(G0), *(b - a for a, b in zip(plain, plain[1:], strict=False))]
    got, s = play(server_lr=0.5, **OPT)
    assert all(np.all(np.isfinite(x)) for x in got)
    assert "server_opt.momentum" in s.state_dict()
    want = heavy_ball(aggregates, flat(G0), 0.5, 0.9, 0.01, 0.5, 2)
    for t, (a, b) in enumerate(zip(got, want, strict=True), start=1):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-9, err_msg=f"{name} round {t}")


# ----------------------------------------------------------------------------- (d) state
@pytest.mark.parametrize("name", ["fedavg", "centered-clipping", "mifa", "fedau", "temporal-soup",
                                  "uniform-soup"])
def test_state_round_trip_keeps_the_momentum_buffer_and_resumes_bit_identically(tmp_path, name):
    rng = np.random.default_rng(4)
    deltas = [rng.normal(size=(3, D)) for _ in range(6)]
    big = [2**64 - 1, 2**63 + 11, 12345]  # Flower-style node ids for the per-client rules

    def round_(s, t, x):
        arrays, _ = run_round(s, t, x, {big[k]: LAYOUT.unflatten(flat(x) + deltas[t - 1][k])
                                        for k in range(3)})
        return to_numpy(arrays)

    a = strategies.build(name, num_clients=3, server_lr=0.5, **OPT)
    x = dict(G0)
    for t in (1, 2, 3):
        x = round_(a, t, x)
    state = a.state_dict()
    assert state["server_opt.momentum"].shape == (D,)
    assert state["server_opt.momentum"].dtype == np.float64
    save_arrays(tmp_path / "state.safetensors", state)
    b = strategies.build(name, num_clients=3, server_lr=0.5, **OPT)
    b.load_state_dict(load_arrays(tmp_path / "state.safetensors"))
    np.testing.assert_array_equal(b.momentum_buffer, a.momentum_buffer)
    xa, xb = x, dict(x)
    for t in (4, 5, 6):
        xa, xb = round_(a, t, xa), round_(b, t, xb)
        assert flat(xa).tobytes() == flat(xb).tobytes()
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb) and all(np.array_equal(sa[k], sb[k]) for k in sa)
    # a strategy that never stepped has no buffer; loading its state clears one
    fresh = strategies.build(name, num_clients=3, server_lr=0.5, **OPT)
    assert "server_opt.momentum" not in fresh.state_dict()
    b.load_state_dict(fresh.state_dict())
    assert b.momentum_buffer is None


def test_a_kept_round_leaves_the_buffer_unchanged():
    s = strategies.build("fedavg", num_clients=2, server_momentum=0.9, min_replies=2)
    x = dict(G0)
    arrays, _ = run_round(s, 1, x, {0: LAYOUT.unflatten(flat(x) + 1.0),
                                    1: LAYOUT.unflatten(flat(x) + 1.0)})
    buf = s.momentum_buffer.copy()
    x = to_numpy(arrays)
    kept, _ = run_round(s, 2, x, {0: LAYOUT.unflatten(flat(x) + 1.0), 1: None})  # one failure
    assert kept is None and np.array_equal(s.momentum_buffer, buf)
    # a rule that cannot aggregate this round (Bulyan, f = 1, 3 of 7 replies): NaN, model kept
    b = strategies.build("bulyan", num_clients=7, f=1, server_momentum=0.9)
    arrays, _ = run_round(b, 1, x, {k: LAYOUT.unflatten(flat(x) + 1.0) for k in range(7)})
    buf = b.momentum_buffer.copy()
    kept, metrics = run_round(b, 2, x, {k: LAYOUT.unflatten(flat(x) + 1.0) for k in range(3)})
    assert kept is None and metrics["infeasible"] == 1
    assert np.array_equal(b.momentum_buffer, buf)


# ----------------------------------------------------------------------------- (e) config
@pytest.mark.parametrize(("argv", "field"), [
    (["--server-momentum", "1"], "server_momentum"),
    (["--server-momentum", "-0.1"], "server_momentum"),
    (["--server-weight-decay=-1e-4"], "server_weight_decay"),
    (["--server-lr-decay", "0", "--server-lr-decay-every", "5"], "server_lr_decay"),
    (["--server-lr-decay", "1.5", "--server-lr-decay-every", "5"], "server_lr_decay"),
    (["--server-lr-decay", "0.2", "--server-lr-decay-every", "0"], "server_lr_decay_every"),
    (["--server-lr-decay", "0.2"], "server_lr_decay_every"),
    (["--server-lr-decay-every", "10"], "server_lr_decay"),
    (["--strategy", "fedadam", "--server-momentum", "0.9"], "server_momentum"),
    (["--strategy", "fedprox", "--server-weight-decay", "0.001"], "server_weight_decay"),
    (["--strategy", "fedavgm", "--server-lr-decay", "0.5", "--server-lr-decay-every", "2"],
     "server_lr_decay"),
    (["--strategy", "fedmedian", "--server-momentum", "0"], "server_momentum"),
    (["strategy_args.server_momentum=0.9"], "strategy_args.server_momentum"),
    (["--strategy", "fedavgm", "strategy_args.server_momentum=0.5"], "strategy_args.server_momentum"),
])
def test_bad_server_optimizer_settings_exit_2(argv, field, cli_refuses):
    cli_refuses(argv, field)


def test_config_keys_reach_the_strategy():
    cfg = load_config(None, {"strategy": "median", "server_momentum": 0.9,
                             "server_weight_decay": 5e-4, "server_lr_decay": 0.2,
                             "server_lr_decay_every": 10})
    s = strategies.build_run(cfg)
    assert (s.server_momentum, s.server_weight_decay, s.server_lr_decay,
            s.server_lr_decay_every) == (0.9, 5e-4, 0.2, 10)
    plain = load_config(None, {"strategy": "fedau"})
    params = strategies.run_params(plain)
    assert not set(params) & strategies.SERVER_OPTIMIZER_NAMES  # unset keys are not passed
    # fedavgm: server_momentum is Flower's β (default 0.9), set at the top level
    assert strategies.build_run(load_config(None, {"strategy": "fedavgm"})).server_momentum == 0.9
    cfg = load_config(None, {"strategy": "fedavgm", "server_momentum": 0.5})
    assert strategies.build_run(cfg).server_momentum == 0.5


def test_strategy_level_validation():
    with pytest.raises(ConfigError, match="server_lr_decay_every"):
        strategies.build("fedavg", num_clients=1, server_lr_decay=0.5)
    with pytest.raises(ConfigError, match="server_momentum"):
        strategies.build("fedavg", num_clients=1, server_momentum=1.0)
    with pytest.raises(ConfigError, match="server_momentum"):  # not declared by Flower's rules
        strategies.build("fedadam", num_clients=1, server_momentum=0.9)
    from strategies.base import DeltaStrategy

    with pytest.raises(ConfigError, match="server_lr_decay"):
        DeltaStrategy(server_lr_decay_every=3)
    with pytest.raises(ConfigError, match="server_weight_decay"):
        DeltaStrategy(server_weight_decay=-1.0)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad", "fedprox", "fedmedian",
                                  "fedtrimmedavg", "flwr-krum", "flwr-multikrum", "flwr-bulyan"])
def test_flower_rules_without_a_server_lr_refuse_one(name):
    """A server_lr these rules would drop is refused, naming the field (issue 16)."""
    with pytest.raises(ConfigError) as exc:
        strategies.build(name, server_lr=0.5)
    assert exc.value.field == f"{name}.server_lr"


def test_fedavgm_takes_server_lr_as_its_server_learning_rate():
    assert strategies.build("fedavgm", server_lr=0.5).server_learning_rate == 0.5
    assert strategies.build("fedadam", eta=0.5).eta == 0.5
