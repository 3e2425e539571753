"""Statistical attacks: inner-product manipulation (IPM) and "A Little Is Enough" (ALIE).

Definitions and the library conventions they reproduce: ``../shared/reference/byzantine.md`` §2.
"""

from __future__ import annotations

from statistics import NormalDist
from typing import Any, ClassVar

import numpy as np

from fedagg.attacks._base import KNOWLEDGE, Attack, check_choice, repeat
from fedagg.errors import ConfigError
from fedagg.registry import Param


def alie_z(n: int, f: int) -> float:
    r"""The ALIE paper's :math:`z_{\max}` for ``n`` clients in total, ``f`` of them Byzantine.

    .. math:: s = \lfloor n/2 + 1 \rfloor - f, \qquad
              z_{\max} = \Phi^{-1}\Big(\frac{n - f - s}{n - f}\Big)

    Baruch, Baruch & Goldberg 2019, arXiv:1902.06156 (same formula in epfml, Blades, FLPoison).
    For small n it is degenerate (``z ≤ 0`` at n = 10, f ≤ 2).

    Example
    -------
    >>> round(alie_z(25, 5), 4)   # the epfml CIFAR-10 setting
    0.2533
    """
    if not 0 <= f < n:
        raise ValueError(f"alie_z: need 0 <= f < n, got n={n}, f={f}")
    s = (n // 2 + 1) - f
    q = (n - f - s) / (n - f)
    if not 0.0 < q < 1.0:
        raise ValueError(
            f"alie_z: the ALIE formula is undefined for n={n}, f={f} (cdf {q:.3f} outside (0, 1))"
        )
    return NormalDist().inv_cdf(q)


class IPM(Attack):
    r"""Inner-product manipulation (Xie, Koyejo & Gupta 2019, "Fall of Empires", arXiv:1903.03936).

    .. math:: b_i = -\epsilon\, \mu, \qquad \mu = \text{mean of the known honest updates}

    Small ε (0.1) defeats Krum-type rules, large ε (≥ 10) median/TM/GM. Default ε = 0.1 as in
    epfml (with f = 11 of 25) and the FlagAggregator experiments; ByzFL's default τ is 2.0,
    FLPoison 0.5, Garfield 10. ``knowledge="own"`` takes μ over the attackers' own updates (FA).

    Example
    -------
    >>> IPM(epsilon=0.5)(np.array([[1.0, 2.0], [3.0, 4.0]]), 1, None)
    array([[-1. , -1.5]])
    """

    name: ClassVar[str] = "ipm"
    PARAMS: ClassVar[tuple[Param, ...]] = (
        Param("epsilon", float, 0.1, "scale ε of the negated mean", low=0.0),
        KNOWLEDGE,
    )

    def __init__(self, epsilon: float = 0.1, knowledge: str = "omniscient") -> None:
        check_choice(self.name, "knowledge", knowledge, ("omniscient", "own"))
        self.epsilon = float(epsilon)
        self.knowledge = knowledge

    def _attack(
        self, H: np.ndarray, f: int, rng: np.random.Generator | None, own: np.ndarray | None
    ) -> np.ndarray:
        return repeat(-self.epsilon * self._source(H, own).mean(axis=0), f)


class ALIE(Attack):
    r"""A Little Is Enough (Baruch, Baruch & Goldberg 2019, arXiv:1902.06156).

    .. math:: b_i = \mu + \text{sign} \cdot z \cdot \sigma

    with μ, σ the coordinate-wise mean and standard deviation (``ddof``) of the known updates and
    ``z = alie_z(n, f)`` (``z="paper"``, ``n`` = total clients, default ``len(honest) + f``: pass
    ``n`` when ``honest`` is not the full honest set) or an explicit number. All attackers send the
    same vector.

    Defaults follow **epfml** (``codes/attacks/alittle.py``, the CIFAR-10 numbers of
    ``byzantine.md`` §4.1): ``z="paper"``, ``sign=-1``, ``ddof=1``, omniscient. Other conventions:
    ByzFL ``ALittleIsEnough(tau)`` = ``z=tau, sign=+1, ddof=1``; Blades = ``sign=+1, ddof=1``;
    FLPoison = ``sign=+1, ddof=0``; the authors' code = ``sign=-1, ddof=0, knowledge="own"``;
    FlagAggregator = ``z=0.21, sign=-1, knowledge="own"``. With ``knowledge="own"``, one attacker and
    ``ddof=1`` σ is undefined and a ValueError is raised (the FA reference sends NaN there).

    Example
    -------
    >>> H = np.array([[0.0, 1.0], [2.0, 1.0]])
    >>> ALIE(z=1.0, sign=1, ddof=0)(H, 1, None)
    array([[2., 1.]])
    """

    name: ClassVar[str] = "alie"
    PARAMS: ClassVar[tuple[Param, ...]] = (
        Param("z", object, "paper", "'paper' (z_max formula) or a number"),
        Param("n", int, None, "total clients for z='paper' (None: len(honest) + f)", low=1,
              nullable=True),
        Param("sign", int, -1, "μ − zσ (−1, epfml/authors) or μ + zσ (+1, ByzFL/Blades)",
              choices=(-1, 1)),
        Param("ddof", int, 1, "σ delta degrees of freedom (1: torch/ByzFL, 0: numpy/authors)",
              choices=(0, 1)),
        KNOWLEDGE,
    )

    def __init__(
        self,
        z: Any = "paper",
        n: int | None = None,
        sign: int = -1,
        ddof: int = 1,
        knowledge: str = "omniscient",
    ) -> None:
        if isinstance(z, str) and z != "paper":
            try:
                z = float(z)
            except ValueError:
                raise ConfigError("alie.z", f"must be 'paper' or a number, got {z!r}") from None
        elif not isinstance(z, str):
            if isinstance(z, bool) or not isinstance(z, (int, float, np.floating, np.integer)):
                raise ConfigError("alie.z", f"must be 'paper' or a number, got {z!r}")
            z = float(z)
        check_choice(self.name, "sign", sign, (-1, 1))
        check_choice(self.name, "ddof", ddof, (0, 1))
        check_choice(self.name, "knowledge", knowledge, ("omniscient", "own"))
        self.z, self.n, self.sign, self.ddof, self.knowledge = z, n, sign, ddof, knowledge

    def z_value(self, h: int, f: int) -> float:
        """The z used for ``h`` honest updates and ``f`` attackers."""
        if self.z == "paper":
            return alie_z(self.n if self.n is not None else h + f, f)
        return float(self.z)

    def _attack(
        self, H: np.ndarray, f: int, rng: np.random.Generator | None, own: np.ndarray | None
    ) -> np.ndarray:
        S = self._source(H, own)
        if S.shape[0] <= self.ddof:
            raise ValueError(
                f"alie: σ with ddof={self.ddof} needs more than {self.ddof} update(s), got "
                f"{S.shape[0]} (knowledge={self.knowledge!r})"
            )
        z = self.z_value(H.shape[0], f)
        mu = S.mean(axis=0)
        sigma = S.std(axis=0, ddof=self.ddof)
        return repeat(mu + (self.sign * z) * sigma, f)
