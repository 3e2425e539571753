"""AGR-agnostic Min-Max and Min-Sum (Shejwalkar & Houmansadr, NDSS 2021,
"Manipulating the Byzantine: Optimizing Model Poisoning Attacks and Defenses for FL",
doi:10.14722/ndss.2021.24498).

Both send ``b = μ − γ·p`` with the largest γ found by the authors' search that keeps ``b`` as close
to the honest updates as the honest updates are to each other. Every distance comes from one Gram
matrix of the known updates: ``‖b − g_j‖² = a_j − 2γ c_j + γ²‖p‖²`` with
``a_j = ‖μ − g_j‖²`` and ``c_j = ⟨p, μ − g_j⟩``, so each step of the search costs O(h).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import numpy as np

from fedagg.aggregators._common import gram, sq_distances
from fedagg.attacks._base import KNOWLEDGE, Attack, check_choice, repeat
from fedagg.registry import Param

PERTURBATIONS = ("unit", "sign", "std")

Dists = Callable[[float], np.ndarray]


def gamma_search(
    feasible: Callable[[float], bool], gamma_init: float = 10.0, tol: float = 1e-5
) -> float:
    """The authors' search for the largest feasible γ (``byzantine.md`` §2 item 6).

    ``γ = γ_init``, ``step = γ/2``, ``γ_succ = 0``; while ``|γ_succ − γ| > tol``: if
    ``feasible(γ)`` then ``γ_succ = γ; γ += step`` else ``γ −= step``; then ``step /= 2``.
    Returns ``γ_succ`` (0 if no tried γ is feasible).

    Example
    -------
    >>> round(gamma_search(lambda g: g <= 3.0), 4)
    3.0
    """
    gamma, step, succ = float(gamma_init), float(gamma_init) / 2.0, 0.0
    while abs(succ - gamma) > tol:
        if feasible(gamma):
            succ = gamma
            gamma += step
        else:
            gamma -= step
        step /= 2.0
    return succ


class _MinBase(Attack):
    PARAMS: ClassVar[tuple[Param, ...]] = (
        Param("perturbation", str, "unit", "p: unit (μ/‖μ‖), sign (sign μ) or std (σ, ddof 1)",
              choices=PERTURBATIONS),
        Param("gamma_init", float, 10.0, "initial γ of the search (authors: 10; 30/50 in some "
              "notebooks)", low=0.0, low_open=True),
        Param("tol", float, 1e-5, "search tolerance on γ", low=0.0, low_open=True),
        KNOWLEDGE,
    )

    def __init__(
        self,
        perturbation: str = "unit",
        gamma_init: float = 10.0,
        tol: float = 1e-5,
        knowledge: str = "omniscient",
    ) -> None:
        check_choice(self.name, "perturbation", perturbation, PERTURBATIONS)
        check_choice(self.name, "knowledge", knowledge, ("omniscient", "own"))
        self.perturbation, self.knowledge = perturbation, knowledge
        self.gamma_init, self.tol = float(gamma_init), float(tol)
        self.last_gamma = 0.0

    def _perturbation(self, S: np.ndarray, mu: np.ndarray) -> np.ndarray:
        if self.perturbation == "unit":
            norm = float(np.linalg.norm(mu))
            return mu / norm if norm > 0 else np.zeros_like(mu)
        if self.perturbation == "sign":
            return np.sign(mu)
        if S.shape[0] < 2:
            return np.zeros_like(mu)
        return S.std(axis=0, ddof=1)

    def _attack(
        self, H: np.ndarray, f: int, rng: np.random.Generator | None, own: np.ndarray | None
    ) -> np.ndarray:
        S = self._source(H, own)
        mu = S.mean(axis=0)
        p = self._perturbation(S, mu).astype(S.dtype, copy=False)
        G = gram(S)
        mu_g = G.mean(axis=0)  # ⟨μ, g_j⟩
        a = np.maximum(G.mean() - 2.0 * mu_g + np.diag(G), 0.0)  # ‖μ − g_j‖²
        Sp = np.asarray(S @ p, dtype=np.float64)  # ⟨p, g_j⟩
        c = Sp.mean() - Sp  # ⟨p, μ − g_j⟩
        pp = float(np.dot(p.astype(np.float64), p.astype(np.float64)))
        bound = self._bound(sq_distances(G))

        def dists(gamma: float) -> np.ndarray:
            return a - 2.0 * gamma * c + gamma * gamma * pp

        feasible = self._criterion(dists, bound)
        self.last_gamma = gamma_search(feasible, self.gamma_init, self.tol)
        return repeat(mu - self.last_gamma * p, f)

    def _bound(self, D: np.ndarray) -> float:
        raise NotImplementedError

    def _criterion(self, dists: Dists, bound: float) -> Callable[[float], bool]:
        raise NotImplementedError


class MinMax(_MinBase):
    r"""Min-Max: the largest γ with :math:`\max_j \|b - g_j\|^2 \le \max_{i,j} \|g_i - g_j\|^2`.

    .. math:: b = \mu - \gamma p, \qquad p \in \{\mu/\|\mu\|, \operatorname{sign}\mu, \sigma\}

    Search and defaults as the authors' notebooks and FLPoison ``attackers/min.py``
    (γ_init = 10, tol 1e-5, ``p = unit``); Blades' MinMax (bisection on [0, 5] with p = σ) is
    close to ``perturbation="std"``. Omniscient by default; ``knowledge="own"`` uses the
    attackers' own updates (the authors' "unknown benign gradients" setting).
    ``last_gamma`` holds the γ found by the last call.

    Example
    -------
    >>> H = np.array([[1.0, 0.0], [1.0, 2.0], [3.0, 0.0], [3.0, 2.0]])
    >>> MinMax()(H, 1, None).round(3)   # γ² + 6γ/√5 + 2 = 8
    array([[0.702, 0.351]])
    """

    name: ClassVar[str] = "minmax"

    def _bound(self, D: np.ndarray) -> float:
        return float(D.max())

    def _criterion(self, dists: Dists, bound: float) -> Callable[[float], bool]:
        return lambda gamma: float(dists(gamma).max()) <= bound


class MinSum(_MinBase):
    r"""Min-Sum: the largest γ with
    :math:`\sum_j \|b - g_j\|^2 \le \min_i \sum_j \|g_i - g_j\|^2` (the paper's min; FLPoison uses
    the looser max).

    .. math:: b = \mu - \gamma p, \qquad p \in \{\mu/\|\mu\|, \operatorname{sign}\mu, \sigma\}

    Same search, defaults and knowledge switch as :class:`MinMax`.

    Example
    -------
    >>> H = np.array([[1.0, 0.0], [1.0, 2.0], [3.0, 0.0], [3.0, 2.0]])
    >>> MinSum()(H, 1, None).round(3)   # 4γ² + 8 = 16
    array([[0.735, 0.368]])
    """

    name: ClassVar[str] = "minsum"

    def _bound(self, D: np.ndarray) -> float:
        return float(D.sum(axis=1).min())

    def _criterion(self, dists: Dists, bound: float) -> Callable[[float], bool]:
        return lambda gamma: float(dists(gamma).sum()) <= bound
