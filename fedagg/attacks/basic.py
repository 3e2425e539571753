"""Simple attacks: sign flip, reverse, label flip, Gaussian / uniform noise, mimic, inf, NaN.

Definitions and library conventions: ``../shared/reference/byzantine.md`` §2 and
``../shared/reference/fedau_flag.md`` §4.2.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from fedagg.attacks._base import Attack, check_choice, repeat
from fedagg.registry import Param


def flip_labels(y: Any, num_classes: int) -> Any:
    r"""Label flipping ``y' = (C − 1) − y`` (C = 10 gives ``9 − y``).

    The data attack of Biggio et al. 2012 and the epfml ``LableFlippingWorker``, Blades
    ``LabelFlipAdversary`` and ByzFL ``LabelFlipping`` (``targets.sub(C−1).mul(−1)``).
    ``y``: integer labels in ``[0, C)`` (numpy array, torch tensor or int); returns a new object of
    the same kind and dtype.

    Example
    -------
    >>> flip_labels(np.array([0, 3, 9]), 10)
    array([9, 6, 0])
    """
    if num_classes < 1:
        raise ValueError(f"flip_labels: num_classes must be >= 1, got {num_classes}")
    if isinstance(y, torch.Tensor):
        return (num_classes - 1) - y
    if isinstance(y, np.ndarray):
        return ((num_classes - 1) - y).astype(y.dtype, copy=False)
    return (num_classes - 1) - y


class SignFlip(Attack):
    r"""Sign flipping.

    .. math:: \text{own: } b_i = -s\, g^{\text{own}}_i \qquad
              \text{mean: } b_i = -s\, \mu, \;\; \mu = \tfrac{1}{h}\textstyle\sum_j g_j

    Default ``flavour="own"``, ``scale=1``: the "bit-flipping" worker of epfml
    (Karimireddy et al. 2021, arXiv:2012.10333) and FLPoison, which sends the negation of its own
    honest update (non-omniscient; needs ``own``). ``flavour="mean"`` is ByzFL ``SignFlipping``
    (omniscient, all attackers identical). Garfield/FA's ``reverse`` is ``own`` with scale 100/10
    (see :class:`Reverse`).

    Example
    -------
    >>> SignFlip()(np.ones((2, 3)), 1, None, own=np.array([[1.0, -2.0, 3.0]]))
    array([[-1.,  2., -3.]])
    """

    name: ClassVar[str] = "signflip"
    PARAMS: ClassVar[tuple[Param, ...]] = (
        Param("flavour", str, "own", "negate each attacker's own update, or the honest mean",
              choices=("own", "mean")),
        Param("scale", float, 1.0, "multiplier s ≥ 0", low=0.0),
    )

    def __init__(self, flavour: str = "own", scale: float = 1.0) -> None:
        check_choice(self.name, "flavour", flavour, ("own", "mean"))
        self.flavour = flavour
        self.scale = float(scale)

    @property
    def omniscient(self) -> bool:
        return self.flavour == "mean"

    def _attack(
        self, H: np.ndarray, f: int, rng: np.random.Generator | None, own: np.ndarray | None
    ) -> np.ndarray:
        if self.flavour == "mean":
            return repeat(-self.scale * H.mean(axis=0), f)
        if own is None:
            raise ValueError("signflip (flavour='own') needs own=: the attackers' honest updates")
        return -self.scale * own


class Reverse(Attack):
    r"""Reverse: each attacker sends its own honest update scaled by ``−k``.

    .. math:: b_i = -k\, g^{\text{own}}_i

    Default ``k = 10`` follows the FlagAggregator reference HEAD (``garfieldpp/byzWorker.py``);
    Garfield and FA's first commit use ``k = 100``. Non-omniscient (needs ``own``).

    Example
    -------
    >>> Reverse(k=10)(np.ones((1, 2)), 1, None, own=np.array([[0.5, -1.0]]))
    array([[-5., 10.]])
    """

    name: ClassVar[str] = "reverse"
    PARAMS: ClassVar[tuple[Param, ...]] = (Param("k", float, 10.0, "scale k", low=0.0),)
    needs_own: ClassVar[bool] = True

    def __init__(self, k: float = 10.0) -> None:
        self.k = float(k)

    def _attack(
        self, H: np.ndarray, f: int, rng: np.random.Generator | None, own: np.ndarray | None
    ) -> np.ndarray:
        return -self.k * self._source(H, own)


class LabelFlip(Attack):
    r"""Label flipping, a *data* attack: Byzantine clients train honestly on ``y' = (C−1) − y``.

    The runner applies :func:`flip_labels` (or :meth:`labels`) inside the Byzantine client
    (``data_attack = True``); the resulting update is sent unchanged, so calling the attack on
    updates returns ``own`` (those updates) as they are. Convention of epfml, Blades, ByzFL.
    """

    name: ClassVar[str] = "labelflip"
    PARAMS: ClassVar[tuple[Param, ...]] = (
        Param("num_classes", int, None, "number of classes C (None: given by the dataset)",
              low=1, nullable=True),
    )
    data_attack: ClassVar[bool] = True
    needs_own: ClassVar[bool] = True

    def __init__(self, num_classes: int | None = None) -> None:
        self.num_classes = num_classes

    def labels(self, y: Any, num_classes: int | None = None) -> Any:
        """Flipped labels; ``num_classes`` overrides the configured one."""
        c = num_classes if num_classes is not None else self.num_classes
        if c is None:
            raise ValueError("labelflip: num_classes is unknown; pass it here or at build time")
        return flip_labels(y, int(c))

    def _attack(
        self, H: np.ndarray, f: int, rng: np.random.Generator | None, own: np.ndarray | None
    ) -> np.ndarray:
        return self._source(H, own).copy()


class Gaussian(Attack):
    r"""Gaussian noise replacing the update, drawn independently for each attacker.

    .. math:: b_i \sim \mathcal{N}(\mu_n, \sigma_n^2 I_d)

    Defaults ``(0, 1)`` follow ByzFL ``Gaussian`` and FLPoison (Blades' Noise uses (0.1, 0.1)).
    ByzFL sends one draw repeated f times; here each attacker gets its own draw from ``rng``.

    Example
    -------
    >>> Gaussian()(np.zeros((3, 4)), 2, np.random.default_rng(0)).shape
    (2, 4)
    """

    name: ClassVar[str] = "gaussian"
    PARAMS: ClassVar[tuple[Param, ...]] = (
        Param("mu", float, 0.0, "mean of every coordinate"),
        Param("sigma", float, 1.0, "standard deviation", low=0.0),
    )
    stochastic: ClassVar[bool] = True

    def __init__(self, mu: float = 0.0, sigma: float = 1.0) -> None:
        self.mu, self.sigma = float(mu), float(sigma)

    @property
    def omniscient(self) -> bool:
        return False

    def _attack(
        self, H: np.ndarray, f: int, rng: np.random.Generator | None, own: np.ndarray | None
    ) -> np.ndarray:
        assert rng is not None
        return rng.normal(self.mu, self.sigma, size=(f, H.shape[1]))


class Uniform(Attack):
    r"""Uniform noise replacing the update: the ``random`` attack of Garfield and the Flag
    Aggregator experiments (``torch.rand``, U[0, 1)), independent per attacker.

    .. math:: b_{ij} \sim \mathcal{U}[\text{low}, \text{high})

    Its norm is about ``sqrt(d/3)``, far above honest updates. FedML's random is U[−1, 1).

    Example
    -------
    >>> b = Uniform()(np.zeros((3, 4)), 2, np.random.default_rng(0))
    >>> bool(((0 <= b) & (b < 1)).all())
    True
    """

    name: ClassVar[str] = "random"
    PARAMS: ClassVar[tuple[Param, ...]] = (
        Param("low", float, 0.0, "lower bound (inclusive)"),
        Param("high", float, 1.0, "upper bound (exclusive)"),
    )
    stochastic: ClassVar[bool] = True

    def __init__(self, low: float = 0.0, high: float = 1.0) -> None:
        if not high > low:
            raise ValueError(f"random: need high > low, got [{low}, {high})")
        self.low, self.high = float(low), float(high)

    @property
    def omniscient(self) -> bool:
        return False

    def _attack(
        self, H: np.ndarray, f: int, rng: np.random.Generator | None, own: np.ndarray | None
    ) -> np.ndarray:
        assert rng is not None
        return rng.uniform(self.low, self.high, size=(f, H.shape[1]))


class Mimic(Attack):
    r"""Mimic (Karimireddy, He & Jaggi 2022, arXiv:2006.09365): every attacker copies one honest
    update, over-representing it.

    .. math:: b_i = g_{t}

    ``target`` indexes ``honest`` (ByzFL ``Mimic(epsilon=t)``, FLPoison ``choice``). Omniscient.

    Example
    -------
    >>> Mimic(target=1)(np.array([[1.0], [2.0]]), 2, None)
    array([[2.],
           [2.]])
    """

    name: ClassVar[str] = "mimic"
    PARAMS: ClassVar[tuple[Param, ...]] = (
        Param("target", int, 0, "index of the honest update to copy", low=0),
    )

    def __init__(self, target: int = 0) -> None:
        self.target = int(target)

    def _attack(
        self, H: np.ndarray, f: int, rng: np.random.Generator | None, own: np.ndarray | None
    ) -> np.ndarray:
        if self.target >= H.shape[0]:
            raise ValueError(f"mimic: target {self.target} but only {H.shape[0]} honest updates")
        return repeat(H[self.target], f)


class _Fill(Attack):
    """Every coordinate of every Byzantine update set to :attr:`value`; needs no knowledge."""

    value: ClassVar[float]

    @property
    def omniscient(self) -> bool:
        return False

    def _attack(
        self, H: np.ndarray, f: int, rng: np.random.Generator | None, own: np.ndarray | None
    ) -> np.ndarray:
        return np.full((f, H.shape[1]), self.value)


class Inf(_Fill):
    r"""Every coordinate +∞ (ByzFL ``Inf``): checks that a rule survives non-finite input.

    Example
    -------
    >>> Inf()(np.zeros((1, 2)), 1, None)
    array([[inf, inf]])
    """

    name: ClassVar[str] = "inf"
    value: ClassVar[float] = np.inf


class NaN(_Fill):
    r"""Every coordinate NaN (what FA's ``lie`` sends with one attacker, ``fedau_flag.md`` §4.2).

    Example
    -------
    >>> NaN()(np.zeros((1, 2)), 1, None)
    array([[nan, nan]])
    """

    name: ClassVar[str] = "nan"
    value: ClassVar[float] = np.nan
