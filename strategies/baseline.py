"""FedAvg and Flower's built-in Message-API strategies, behind the fedagg mixin.

``fedavg`` is our delta-form FedAvg (McMahan et al. 2017, arXiv 1602.05629):
``global += server_lr · Σ_k (n_k/Σn) Δ_k``. The others are Flower's own strategies
(``flwr.serverapp.strategy``) with seeded client selection, sorted replies and the shared validation
step added; their aggregation math is Flower's, unchanged. ``flwr-*`` names always mean Flower's
implementations (kept for comparison with our robust rules).

Flower's rules have their own server step: they do not take the server optimiser of our delta
strategies (``server_momentum``, ``server_weight_decay``, ``server_lr_decay``/``_every``) nor
``server_lr`` (FedAdam/FedYogi/FedAdagrad: ``eta``; FedProx, FedMedian, FedTrimmedAvg and Flower's
Krum family replace the model by their aggregate); setting one is a ConfigError. ``fedavgm`` is the
exception: ``server_lr`` is its server learning rate and ``server_momentum`` its β (Flower's FedAvgM
momentum, default 0.9).
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp import strategy as fs

from fedagg.registry import Param
from strategies.base import DeltaStrategy, FedaggStrategy
from strategies.registry import register


def _flower(cls: type, num_clients: int, **kwargs: Any) -> FedaggStrategy:
    """Instantiate Flower strategy ``cls`` with the fedagg mixin in front of it."""
    wrapped = type(f"Fedagg{cls.__name__}", (FedaggStrategy, cls),
                   {"state_attributes": ("m_t", "v_t", "momentum_vector")})
    del num_clients
    return wrapped(**kwargs)


def _flower_rule(name: str, server_lr: bool = False, **kw: Any):
    """Register a Flower rule: no server optimiser of ours and, unless it maps ``server_lr`` onto
    its own step (fedavgm), no ``server_lr`` either (see the module docstring)."""
    return register(name, server_optimizer=False, server_lr=server_lr, **kw)


@register("fedavg", doc="FedAvg: example-weighted mean of client deltas (delta form, server_lr).")
def build_fedavg(**common: Any) -> DeltaStrategy:
    common.pop("num_clients")
    return DeltaStrategy(**common)


@_flower_rule("fedprox", params=[Param("proximal_mu", float, 0.01, "proximal term μ", low=0.0)],
              doc="FedProx (Li et al., arXiv 1812.06127): clients add μ/2‖w − w_global‖² (Flower's FedProx).")
def build_fedprox(proximal_mu: float, **common: Any) -> FedaggStrategy:
    return _flower(fs.FedProx, proximal_mu=proximal_mu, **common)


_OPT = [
    Param("eta", float, 0.1, "server learning rate η", low=0.0, low_open=True),
    Param("eta_l", float, 0.1, "client learning rate (reported only; clients use `lr`)", low=0.0),
    Param("tau", float, 1e-3, "adaptivity τ", low=0.0, low_open=True),
]
_BETAS = [
    Param("beta_1", float, 0.9, "first-moment decay", low=0.0, high=1.0),
    Param("beta_2", float, 0.99, "second-moment decay", low=0.0, high=1.0),
]


@_flower_rule("fedadam", params=[*_OPT, *_BETAS],
              doc="FedAdam (Reddi et al., arXiv 2003.00295), Flower's implementation.")
def build_fedadam(**kw: Any) -> FedaggStrategy:
    return _flower(fs.FedAdam, **kw)


@_flower_rule("fedyogi", params=[*_OPT, *_BETAS],
              doc="FedYogi (Reddi et al., arXiv 2003.00295), Flower's implementation.")
def build_fedyogi(**kw: Any) -> FedaggStrategy:
    return _flower(fs.FedYogi, **kw)


@_flower_rule("fedadagrad", params=_OPT,
              doc="FedAdagrad (Reddi et al., arXiv 2003.00295), Flower's implementation.")
def build_fedadagrad(**kw: Any) -> FedaggStrategy:
    return _flower(fs.FedAdagrad, **kw)


@_flower_rule("fedavgm", server_lr=True, params=[Param("server_momentum", float, 0.9, "server momentum β", low=0.0, high=1.0)],
              doc="FedAvgM (Hsu et al., arXiv 1909.06335), Flower's implementation; step = server_lr.")
def build_fedavgm(server_momentum: float, server_lr: float, **kw: Any) -> FedaggStrategy:
    return _flower(fs.FedAvgM, server_learning_rate=server_lr,
                   server_momentum=server_momentum, **kw)


@_flower_rule("fedmedian", doc="Coordinate-wise median of client models (Yin et al. 2018), Flower's FedMedian.")
def build_fedmedian(**kw: Any) -> FedaggStrategy:
    return _flower(fs.FedMedian, **kw)


@_flower_rule("fedtrimmedavg", params=[Param("beta", float, 0.2, "fraction trimmed at each end", low=0.0, high=0.5, high_open=True)],
              doc="Coordinate-wise trimmed mean (Yin et al. 2018), Flower's FedTrimmedAvg.")
def build_fedtrimmedavg(beta: float, **kw: Any) -> FedaggStrategy:
    return _flower(fs.FedTrimmedAvg, beta=beta, **kw)


_F = Param("num_malicious_nodes", int, 0, "assumed number of Byzantine clients f", low=0)


@_flower_rule("flwr-krum", params=[_F], doc="Krum (Blanchard et al. 2017), Flower's implementation.")
def build_flwr_krum(**kw: Any) -> FedaggStrategy:
    return _flower(fs.Krum, **kw)


@_flower_rule("flwr-multikrum", params=[_F, Param("num_nodes_to_select", int, 1, "m models averaged", low=1)],
              doc="Multi-Krum (Blanchard et al. 2017), Flower's implementation.")
def build_flwr_multikrum(**kw: Any) -> FedaggStrategy:
    return _flower(fs.MultiKrum, **kw)


@_flower_rule("flwr-bulyan", params=[_F], doc="Bulyan (El Mhamdi et al. 2018), Flower's one-shot Message-API version.")
def build_flwr_bulyan(**kw: Any) -> FedaggStrategy:
    return _flower(fs.Bulyan, **kw)
