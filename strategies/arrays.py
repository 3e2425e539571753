"""Conversions between Flower records and numpy: ``ArrayRecord`` ↔ ``{name: ndarray}`` ↔ flat vectors."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """``{name: ndarray}`` of an ArrayRecord, in record order."""
    return {k: v.numpy() for k, v in record.items()}


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """An ArrayRecord holding ``arrays`` (order preserved)."""
    return ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


@dataclasses.dataclass(frozen=True)
class Layout:
    """Names, shapes and dtypes of a model's tensors, to move between dicts and ``(d,)`` vectors."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]

    @classmethod
    def of(cls, arrays: Mapping[str, np.ndarray] | ArrayRecord) -> Layout:
        items = arrays.items()
        if isinstance(arrays, ArrayRecord):
            return cls(
                tuple(k for k, _ in items),
                tuple(tuple(v.shape) for _, v in items),
                tuple(np.dtype(v.dtype) for _, v in items),
            )
        return cls(
            tuple(k for k, _ in items),
            tuple(tuple(np.shape(v)) for _, v in items),
            tuple(np.asarray(v).dtype for _, v in items),
        )

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(int(np.prod(s, dtype=np.int64)) for s in self.shapes)

    @property
    def dim(self) -> int:
        return int(sum(self.sizes))

    def mismatch(self, arrays: Mapping[str, np.ndarray]) -> str | None:
        """Why ``arrays`` does not fit this layout (names or shapes), or None."""
        if tuple(arrays.keys()) != self.names:
            if set(arrays.keys()) != set(self.names):
                missing = sorted(set(self.names) - set(arrays))
                extra = sorted(set(arrays) - set(self.names))
                return f"tensor names differ (missing {missing[:3]}, unexpected {extra[:3]})"
        for name, shape in zip(self.names, self.shapes, strict=True):
            got = tuple(np.shape(arrays[name]))
            if got != shape:
                return f"tensor {name!r} has shape {got}, expected {shape}"
        return None

    def flatten(self, arrays: Mapping[str, np.ndarray], dtype: type = np.float64) -> np.ndarray:
        """One ``(d,)`` vector of ``dtype`` with the tensors in layout order."""
        out = np.empty(self.dim, dtype=dtype)
        pos = 0
        for name, size in zip(self.names, self.sizes, strict=True):
            out[pos : pos + size] = np.asarray(arrays[name]).reshape(-1)
            pos += size
        return out

    def unflatten(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        """``{name: array}`` from a ``(d,)`` vector, cast back to each tensor's dtype."""
        if vector.shape != (self.dim,):
            raise ValueError(f"expected a vector of shape ({self.dim},), got {vector.shape}")
        out: dict[str, np.ndarray] = {}
        pos = 0
        for name, shape, dtype, size in zip(self.names, self.shapes, self.dtypes, self.sizes, strict=True):
            out[name] = vector[pos : pos + size].reshape(shape).astype(dtype, copy=True)
            pos += size
        return out
