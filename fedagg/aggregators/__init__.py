"""Byzantine-robust aggregation rules, one calling convention: ``rule(updates, weights=None)``.

``updates`` is an ``(n, d)`` numpy array, torch tensor, or a list of ``n`` 1-D vectors; the result
is ``(d,)`` of the same kind, dtype and device; the input is never modified. ``weights`` ``(n,)``
are optional non-negative per-row weights: ``mean``, ``multikrum`` (final average only),
``geomedian`` and ``centered-clipping`` use them, ``krum`` ignores them (it returns one update),
and the order-statistic rules (``median``, ``trimmed-mean``, ``meamed``, ``phocas``, ``bulyan``,
``flag``) accept only uniform weights and raise a ValueError otherwise.

>>> from fedagg.aggregators import build, names
>>> rule = build("nnm+trimmed-mean", f=1)
>>> rule(np.array([[1.0, 2], [1.2, 1.8], [0.8, 2.2], [50, -40]])).round(3)
array([1., 2.])

Names (CLI name == registry key == docs page):

============================ ======================================================================
``mean``                     plain / weighted average
``median``                   coordinate-wise median (Yin et al. 2018)
``trimmed-mean``             coordinate-wise trimmed mean, trim count f (Yin et al. 2018)
``meamed`` / ``phocas``      mean of the n − f values closest to the median / trimmed mean
``krum`` / ``multikrum``     Blanchard et al. 2017, presets paper / byzfl / garfield
``bulyan``                   El Mhamdi et al. 2018, variants paper / flower / garfield
``geomedian``                geometric median by smoothed Weiszfeld (RFA)
``centered-clipping``        Karimireddy et al. 2021, stateful
``flag``                     Flag Aggregator (Almasi et al. 2024)
``nnm``, ``bucketing``,      pre-aggregators ``(n, d) -> (n', d)``, chained with ``+``:
``clipping``                 ``build("clipping+nnm+trimmed-mean", f=2, tau=5.0)``
============================ ======================================================================

In a chain, a plain parameter (e.g. ``f``) goes to every stage that declares it;
``"<stage>.<param>"`` keys (``**{"nnm.f": 2}``) target one stage. A key that no stage declares is a
:class:`~fedagg.errors.ConfigError` naming the key and the allowed keys. Rules that need ``f`` check
feasibility (e.g. Krum ``n > 2f + 2``, Bulyan ``n ≥ 4f + 3``) when called and raise a
ConfigError (a ValueError) naming ``<rule>.f``.

All rules run in numpy on the CPU (see :mod:`fedagg.aggregators._common` for dtype handling);
pairwise distances use the Gram trick.
"""

from __future__ import annotations

from typing import Any

from fedagg.aggregators._common import Aggregator, PreAggregator
from fedagg.aggregators.bulyan import Bulyan
from fedagg.aggregators.clipping import CenteredClipping
from fedagg.aggregators.coordinate import MeaMed, Mean, Median, Phocas, TrimmedMean
from fedagg.aggregators.flag import FlagAggregator
from fedagg.aggregators.geomedian import GeometricMedian
from fedagg.aggregators.krum import Krum, MultiKrum, krum_scores
from fedagg.aggregators.pipeline import Pipeline
from fedagg.aggregators.pre import NNM, Bucketing, Clipping
from fedagg.errors import ConfigError
from fedagg.registry import Param, Registry

__all__ = [
    "REGISTRY", "build", "names", "declared_params", "Aggregator", "PreAggregator", "Pipeline",
    "Mean", "Median", "TrimmedMean", "MeaMed", "Phocas", "Krum", "MultiKrum", "Bulyan",
    "GeometricMedian", "CenteredClipping", "FlagAggregator", "NNM", "Bucketing", "Clipping",
    "krum_scores",
]

REGISTRY: Registry[Aggregator | PreAggregator] = Registry("aggregator")

_CLASSES: tuple[type[Aggregator] | type[PreAggregator], ...] = (
    Mean, Median, TrimmedMean, MeaMed, Phocas, Krum, MultiKrum, Bulyan, GeometricMedian,
    CenteredClipping, FlagAggregator, NNM, Bucketing, Clipping,
)
for _cls in _CLASSES:
    REGISTRY.add(_cls.name, _cls, params=_cls.PARAMS)


def names() -> list[str]:
    """Registered rule and pre-aggregator names, sorted (chains are not listed)."""
    return REGISTRY.names()


def _stages(name: str) -> list[str]:
    stages = [s.strip() for s in name.split("+")]
    if any(not s for s in stages):
        raise ConfigError("aggregator", f"empty stage in {name!r}")
    return stages


def declared_params(name: str) -> dict[str, Param]:
    """The parameters ``build(name, ...)`` accepts: union over the stages of a chain.

    Useful to filter a shared config (``{k: v for k, v in cfg.items() if k in declared}``).
    """
    out: dict[str, Param] = {}
    for stage in _stages(name):
        for p in REGISTRY.entry(stage, field="aggregator").params:
            out.setdefault(p.name, p)
    return out


def build(name: str, /, **params: Any) -> Aggregator | PreAggregator:
    """Build a rule, a pre-aggregator, or a ``+``-chain of pre-aggregators ending in a rule.

    Returns a callable ``rule(updates: (n, d), weights=None) -> (d,)`` (a pre-aggregator alone
    returns ``(n', d)``). Raises :class:`~fedagg.errors.ConfigError` for an unknown name, an
    unknown or invalid parameter, or a chain whose last stage is not a final rule.

    >>> build("krum", f=1).summary()
    "krum(f=1, variant='paper', squared=None, offset=None)"
    """
    stages = _stages(name)
    entries = [REGISTRY.entry(s, field="aggregator") for s in stages]
    if len(stages) == 1:
        entry = entries[0]
        return entry.factory(**entry.resolve(params, where=name))  # type: ignore[no-any-return]
    for entry in entries[:-1]:
        if not issubclass(entry.factory, PreAggregator):  # type: ignore[arg-type]
            raise ConfigError(
                "aggregator",
                f"{entry.name!r} is a final rule; only pre-aggregators "
                f"({', '.join(n for n in names() if _is_pre(n))}) may precede '+' in {name!r}",
            )
    if not issubclass(entries[-1].factory, Aggregator):  # type: ignore[arg-type]
        raise ConfigError("aggregator", f"{name!r} must end with a final rule, not {stages[-1]!r}")
    allowed = {p.name for e in entries for p in e.params}
    shared: dict[str, Any] = {}
    directed: dict[str, dict[str, Any]] = {s: {} for s in stages}
    for key, value in params.items():
        stage, dot, pname = key.rpartition(".")
        if dot and stage in directed:
            directed[stage][pname] = value
        elif key in allowed:
            shared[key] = value
        else:
            keys = sorted(allowed | {f"{s}.{p.name}" for s, e in zip(stages, entries, strict=True)
                                     for p in e.params})
            raise ConfigError(
                f"{name}.{key}", f"unknown parameter; allowed: {', '.join(keys) or '(none)'}"
            )
    built = []
    for stage, entry in zip(stages, entries, strict=True):
        declared = {p.name for p in entry.params}
        sub = {k: v for k, v in shared.items() if k in declared}
        sub.update(directed[stage])
        built.append(entry.factory(**entry.resolve(sub, where=f"{name}.{stage}")))
    return Pipeline(built[:-1], built[-1])  # type: ignore[arg-type]


def _is_pre(name: str) -> bool:
    return issubclass(REGISTRY.entry(name).factory, PreAggregator)  # type: ignore[arg-type]

