"""The NPY codec of strategies.arrays writes exactly Flower's bytes and reads them back."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from strategies.arrays import decode_array, encode_array, to_numpy, to_record

CASES = [
    np.arange(5120, dtype=np.float32).reshape(128, 40),
    np.float32(3.5) * np.ones((), np.float32),
    np.arange(7, dtype=np.int64),
    np.zeros((3, 0, 2)),
    np.array([True, False]),
    np.arange(10, dtype=">f8"),
    np.arange(20, dtype=np.float64).reshape(4, 5).T,  # not C-contiguous
    np.arange(3, dtype=np.float16),
]


@pytest.mark.parametrize("a", CASES, ids=lambda a: f"{a.dtype.str}{a.shape}")
def test_encode_is_byte_identical_to_flower(a: np.ndarray) -> None:
    ref, mine = Array(np.asarray(a, order="C")), encode_array(a)
    assert mine.data == ref.data
    assert (mine.dtype, mine.shape, mine.stype) == (ref.dtype, ref.shape, ref.stype)
    assert mine.object_id == ref.object_id
    np.testing.assert_array_equal(mine.numpy(), a)


@pytest.mark.parametrize("a", CASES, ids=lambda a: f"{a.dtype.str}{a.shape}")
def test_decode_equals_numpy_and_is_writable(a: np.ndarray) -> None:
    out = decode_array(Array(np.asarray(a, order="C")))
    assert out.dtype == a.dtype and out.shape == a.shape
    np.testing.assert_array_equal(out, a)
    out[...] = 0  # a private copy, not a view of the message bytes


def test_decode_falls_back_to_numpy_load_for_fortran_order() -> None:
    import io

    buf = io.BytesIO()
    a = np.asfortranarray(np.arange(6.0).reshape(2, 3))
    np.save(buf, a)
    arr = Array("float64", (2, 3), "numpy.ndarray", buf.getvalue())
    np.testing.assert_array_equal(decode_array(arr), a)


def test_record_round_trip_keeps_order() -> None:
    arrays = {"b": np.ones(3, np.float32), "a": np.arange(4.0).reshape(2, 2)}
    rec = to_record(arrays)
    assert isinstance(rec, ArrayRecord) and list(rec) == ["b", "a"]
    back = to_numpy(rec)
    assert list(back) == ["b", "a"]
    for k in arrays:
        np.testing.assert_array_equal(back[k], arrays[k])


def test_fast_records_equal_flowers_constructors() -> None:
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from strategies.arrays import metric_record, record_dict

    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)}
    rec = to_record(arrays)
    ref = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    assert rec.is_dirty and list(rec) == ["w", "b"] and rec.object_id == ref.object_id
    metrics = {"num-examples": 12, "train_loss": 0.25, "client-id": 3}
    mine, theirs = metric_record(metrics), MetricRecord(metrics)
    assert dict(mine) == dict(theirs) and mine.object_id == theirs.object_id
    content = record_dict({"arrays": rec, "metrics": mine, "config": ConfigRecord({"lr": 0.1})})
    flower = RecordDict({"arrays": ref, "metrics": theirs, "config": ConfigRecord({"lr": 0.1})})
    assert content.object_id == flower.object_id
    assert list(content.array_records) == ["arrays"] and list(content.metric_records) == ["metrics"]
    # values Flower would refuse still go through (and fail in) Flower's own checks
    with pytest.raises(TypeError):
        metric_record({"flag": True})
    with pytest.raises(TypeError):
        record_dict({"x": {"not": "a record"}})  # type: ignore[dict-item]
    assert metric_record({"x": np.float64(0.5)})["x"] == 0.5  # numpy scalars: the checked path


def test_views_read_the_bytes_without_copying() -> None:
    from strategies.arrays import to_views

    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    views = to_views(to_record(arrays))
    np.testing.assert_array_equal(views["w"], arrays["w"])
    assert not views["w"].flags.writeable
