"""Math-level acceptance test: FedAU is unbiased under heterogeneous participation.

Clients ``F_n(x) = ½‖x − c_n‖²`` with Bernoulli participation probabilities ``p_n`` correlated
with ``c_n``. With exact local gradient steps ``Δ_n = (1 − (1 − γ)^I)(c_n − x)``:

- FedAU (``x += η/N Σ_{S_t} ω_n Δ_n`` with the online ``ω_n ≈ 1/p_n``) targets the minimiser of
  ``(1/N) Σ_n F_n``, i.e. ``mean(c_n)``;
- averaging over the participants targets ``Σ_n p_n c_n / Σ_n p_n`` (Wang & Ji, arXiv 2306.03401).
"""

from __future__ import annotations

import numpy as np

from fedagg.fedau import FedAUWeights, fedau_update
from fedagg.fedau_baselines import average_participating, known_prob
from fedagg.participation import build_process


def test_fedau_is_unbiased_on_quadratics_while_averaging_participants_is_not():
    n_clients, dim, local_steps, gamma, eta = 50, 2, 5, 0.1, 0.5
    rounds, burn_in = 2000, 500
    rng = np.random.default_rng(0)
    c = 3.0 * rng.normal(size=(n_clients, dim))
    rank = np.argsort(np.argsort(c[:, 0]))
    p = 0.05 + 0.85 * rank / (n_clients - 1)  # p_n in [0.05, 0.9], increasing with c_n[0]

    c_mean = c.mean(axis=0)
    c_p = (p[:, None] * c).sum(axis=0) / p.sum()
    spread = np.sqrt(((c - c_mean) ** 2).sum(axis=1).mean())  # RMS distance from mean(c)
    gap = np.linalg.norm(c_p - c_mean)
    assert gap > 0.3 * spread  # the participation bias is large enough to be measured

    def local_deltas(x: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """I exact gradient steps with lr γ on F_n from x: (n, d) deltas local − global."""
        local = np.repeat(x[None], ids.size, axis=0)
        for _ in range(local_steps):
            local -= gamma * (local - c[ids])
        return local - x

    proc = build_process("bernoulli", p, np.random.RandomState(0))
    est = FedAUWeights(n_clients)
    x = {"fedau": np.zeros(dim), "avg_participating": np.zeros(dim), "known_prob": np.zeros(dim)}
    tail = {k: np.zeros(dim) for k in x}
    for t in range(rounds):
        ids = proc.available(t)  # the same participation for every method
        w = est.step(t, ids)
        x["fedau"] = x["fedau"] + fedau_update(local_deltas(x["fedau"], ids), w, n_clients, eta)
        x["avg_participating"] = x["avg_participating"] + average_participating(
            local_deltas(x["avg_participating"], ids), eta
        )
        x["known_prob"] = x["known_prob"] + known_prob(
            local_deltas(x["known_prob"], ids), p[ids], n_clients, eta
        )
        if t >= burn_in:
            for k in x:
                tail[k] += x[k]
    avg = {k: v / (rounds - burn_in) for k, v in tail.items()}

    err_fedau = np.linalg.norm(avg["fedau"] - c_mean)
    err_known = np.linalg.norm(avg["known_prob"] - c_mean)
    ap_to_mean = np.linalg.norm(avg["avg_participating"] - c_mean)
    ap_to_cp = np.linalg.norm(avg["avg_participating"] - c_p)
    assert err_fedau <= 0.05 * spread
    assert err_known <= 0.05 * spread
    # averaging the participants lands near the p-weighted mean, far from mean(c)
    assert ap_to_cp <= 0.1 * gap
    assert ap_to_mean >= 0.9 * gap
    assert err_fedau <= 0.2 * ap_to_mean
    # the estimated weights have converged towards 1/p (sanity of the run itself)
    assert abs(np.mean(est.weights() * p) - 1) < 0.05
