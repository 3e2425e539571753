"""Conversions between Flower records and numpy: ``ArrayRecord`` ↔ ``{name: ndarray}`` ↔ flat vectors.

Arrays travel in Flower's own format (``stype`` ``numpy.ndarray``: the bytes of ``np.save``), so any
Flower strategy or ClientApp reads what ours write. Encoding and decoding skip ``np.save``/``np.load``
per array: the NPY header depends only on (dtype, shape) and is built or parsed once per pair, which
takes the per-array cost from ~40 µs to a few µs (``docs/benchmarks.md``).

Records are filled without Flower's per-item type checks where the values are known to pass them
(:func:`to_record`, :func:`metric_record`, :func:`record_dict`): the result is the same public
Flower object, built in a fraction of the time (a simulation builds several per client and round).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from strategies.flower_compat import fill_record, new_array

_NPY_MAGIC = b"\x93NUMPY\x01\x00"
_NUMPY_STYPE = "numpy.ndarray"


@functools.lru_cache(maxsize=4096)
def npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    """The NPY v1.0 header ``np.save`` writes for a C-ordered array of ``descr`` and ``shape``."""
    text = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {shape!r}, }}"
    pad = (-(len(_NPY_MAGIC) + 2 + len(text) + 1)) % 64  # header aligned to 64 bytes, as np.save
    text += " " * pad + "\n"
    return _NPY_MAGIC + len(text).to_bytes(2, "little") + text.encode("latin1")


@functools.lru_cache(maxsize=4096)
def _parse_npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...], int] | None:
    """``(dtype, shape, count)`` of a v1.0 C-order header; None leaves the array to ``np.load``."""
    try:
        meta = ast.literal_eval(header[10:].decode("latin1"))
        dtype = np.dtype(meta["descr"])
        shape = tuple(int(s) for s in meta["shape"])
    except (ValueError, SyntaxError, TypeError, KeyError):
        return None
    if meta.get("fortran_order") is not False or dtype.hasobject:
        return None
    return dtype, shape, int(np.prod(shape, dtype=np.int64))


@functools.lru_cache(maxsize=4096)
def _array_meta(dtype: np.dtype, shape: tuple[int, ...]) -> tuple[str, bytes]:
    """``(Flower dtype name, NPY header)`` of a C-ordered array of ``dtype`` and ``shape``."""
    if dtype.hasobject:
        raise TypeError("object arrays cannot travel in an ArrayRecord")
    return str(dtype), npy_header(dtype.str, shape)


def encode_array(array: np.ndarray) -> Array:
    """A Flower ``Array`` of ``array`` (C order), byte-identical to ``Array(array)``."""
    a = np.asarray(array, order="C")
    shape = a.shape  # a tuple of ints
    name, header = _array_meta(a.dtype, shape)
    return new_array(name, shape, _NUMPY_STYPE, b"".join((header, a.reshape(-1).view(np.uint8))))


def _view(array: Array) -> np.ndarray | None:
    """A read-only view of ``array``'s NPY payload (no copy), or None when ``np.load`` must parse it."""
    data = array.data
    if array.stype == _NUMPY_STYPE and data[:8] == _NPY_MAGIC and len(data) >= 10:
        end = 10 + int.from_bytes(data[8:10], "little")
        meta = _parse_npy_header(bytes(data[:end]))
        if meta is not None:
            dtype, shape, count = meta
            if len(data) - end == count * dtype.itemsize:
                return np.frombuffer(data, dtype=dtype, count=count, offset=end).reshape(shape)
    return None


def decode_array(array: Array) -> np.ndarray:
    """``array.numpy()`` (a writable array), parsing each distinct header once."""
    view = _view(array)
    return array.numpy() if view is None else view.copy()


def view_array(array: Array) -> np.ndarray:
    """``array.numpy()`` without the copy where the bytes allow it: a read-only view of the message's
    bytes (for reading only, e.g. screening an update; :func:`decode_array` gives a writable copy)."""
    view = _view(array)
    return array.numpy() if view is None else view


def array_records(content: RecordDict) -> dict[str, ArrayRecord]:
    """The ArrayRecords of ``content`` by key. ``RecordDict.array_records`` builds a new typed
    view on every access (tens of µs); this reads the records once."""
    return {k: v for k, v in content.items() if isinstance(v, ArrayRecord)}


def metric_records(content: RecordDict) -> list[MetricRecord]:
    """The MetricRecords of ``content``, in order (see :func:`array_records`)."""
    return [v for v in content.values() if isinstance(v, MetricRecord)]


def config_record(content: RecordDict, key: str = "config") -> ConfigRecord:
    """``content[key]`` if it is a ConfigRecord, else an empty one (see :func:`array_records`)."""
    rec = content.get(key)
    return rec if isinstance(rec, ConfigRecord) else ConfigRecord()


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """``{name: ndarray}`` of an ArrayRecord, in record order."""
    return {k: decode_array(v) for k, v in record.items()}


def to_views(record: ArrayRecord) -> dict[str, np.ndarray]:
    """:func:`to_numpy` as read-only views of the record's bytes (see :func:`view_array`)."""
    return {k: view_array(v) for k, v in record.items()}


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """An ArrayRecord holding ``arrays`` (order preserved)."""
    record = ArrayRecord()  # ArrayRecord(array_dict=...) would rebuild every Array
    fill_record(record, {str(k): encode_array(v) for k, v in arrays.items()})
    return record


def metric_record(metrics: Mapping[str, int | float]) -> MetricRecord:
    """``MetricRecord(metrics)`` for str keys and int/float (not bool) values, built without the
    per-item checks; anything else goes through Flower's constructor (and its errors)."""
    if all(type(k) is str and (type(v) is float or type(v) is int) for k, v in metrics.items()):
        record = MetricRecord()
        fill_record(record, metrics)
        return record
    return MetricRecord(dict(metrics))


def record_dict(records: Mapping[str, ArrayRecord | MetricRecord | ConfigRecord]) -> RecordDict:
    """``RecordDict(records)``, built without the per-item checks when every value is a record."""
    if all(type(k) is str and isinstance(v, (ArrayRecord, MetricRecord, ConfigRecord))
           for k, v in records.items()):
        out = RecordDict()
        fill_record(out, records)
        return out
    return RecordDict(dict(records))


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

    @functools.cached_property
    def sizes(self) -> tuple[int, ...]:
        return tuple(int(np.prod(s, dtype=np.int64)) for s in self.shapes)

    @functools.cached_property
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

    def flatten(self, arrays: Mapping[str, np.ndarray], dtype: type = np.float64,
                out: np.ndarray | None = None) -> np.ndarray:
        """One ``(d,)`` vector of ``dtype`` with the tensors in layout order (written into ``out``,
        a ``(d,)`` array, when given)."""
        if out is None:
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
