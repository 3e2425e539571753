"""Composition of pre-aggregators and one final rule: ``"clipping+nnm+trimmed-mean"``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from fedagg.aggregators._common import Aggregator, PreAggregator
from fedagg.registry import Param


class Pipeline(Aggregator):
    r"""Pre-aggregators applied in order, then a final rule.

    .. math:: F_{\text{pipe}}(x) = F(P_k(\cdots P_1(x)))

    ``(n, d) -> (n_1, d) -> ... -> (d,)``; the weights travel with the rows (see each
    pre-aggregator). Built by :func:`fedagg.aggregators.build` from a name joined by ``+``.
    Its state is the state of every stage, keyed by stage position and name.
    """

    name: ClassVar[str] = "pipeline"
    PARAMS: ClassVar[tuple[Param, ...]] = ()
    supports_weights: ClassVar[bool] = True

    def __init__(self, pre: Sequence[PreAggregator], final: Aggregator) -> None:
        self.pre = list(pre)
        self.final = final

    @property
    def stages(self) -> list[PreAggregator | Aggregator]:
        return [*self.pre, self.final]

    @property
    def tolerates_nonfinite(self) -> bool:  # type: ignore[override]
        return self.final.tolerates_nonfinite

    def _aggregate(self, X: np.ndarray, w: np.ndarray | None) -> np.ndarray:
        for stage in self.pre:
            X, w = stage._transform(X, w)
        if w is not None and not self.final.supports_weights and not np.allclose(w, w[0]):
            raise ValueError(
                f"{self.final.name} does not support non-uniform weights; pass weights=None"
            )
        return self.final._aggregate(X, w if self.final.supports_weights else None)

    def _key(self, i: int) -> str:
        return f"{i}:{self.stages[i].name}"

    def state_dict(self) -> dict[str, np.ndarray]:
        """Flat ``{"<i>:<stage>.<key>": array}`` over the stateful stages."""
        return {
            f"{self._key(i)}.{k}": v
            for i, stage in enumerate(self.stages)
            for k, v in stage.state_dict().items()
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        stages = {self._key(i): s for i, s in enumerate(self.stages)}
        grouped: dict[str, dict[str, Any]] = {k: {} for k in stages}
        for key, value in state.items():
            prefix, _, sub = key.partition(".")
            if prefix not in stages or not sub:
                raise ValueError(f"pipeline: unknown state key {key!r}")
            grouped[prefix][sub] = value
        for prefix, st in grouped.items():
            if st or stages[prefix].state_dict():
                stages[prefix].load_state_dict(st)

    def hparams(self) -> dict[str, Any]:
        return {s.name: s.hparams() for s in self.stages}

    def summary(self) -> str:
        return " + ".join(s.summary() for s in self.stages)
