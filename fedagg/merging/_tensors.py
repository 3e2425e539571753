"""Internal helpers shared by the merge rules: state dicts of numpy arrays or torch tensors.

Every rule computes in torch (a numpy input is viewed with ``torch.from_numpy``, never written to)
and converts each output entry back to the kind, dtype and device of a reference entry, so
numpy in gives numpy out and torch in gives torch out. Outputs never alias inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypeAlias

import numpy as np
import torch

Array: TypeAlias = np.ndarray | torch.Tensor
StateDict: TypeAlias = Mapping[str, Array]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def as_torch(x: Array) -> torch.Tensor:
    """A torch tensor with the values of ``x``, sharing memory where possible (read only)."""
    if isinstance(x, torch.Tensor):
        return x.detach()
    arr = np.asarray(x)
    if not arr.flags.writeable:  # torch.from_numpy warns on read-only buffers
        arr = arr.copy()
    try:
        return torch.from_numpy(arr)
    except (TypeError, ValueError):  # negative strides, non-native byte order
        return torch.from_numpy(np.array(arr, dtype=arr.dtype.newbyteorder("="), order="C"))


def is_float(x: Array) -> bool:
    """Whether ``x`` holds floating-point values (merge rules pass other dtypes through)."""
    if isinstance(x, torch.Tensor):
        return x.is_floating_point()
    return np.issubdtype(np.asarray(x).dtype, np.floating)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype arithmetic runs in: float16/bfloat16 are promoted to float32."""
    return torch.float32 if t.dtype in _LOW_PRECISION else t.dtype


def to_kind(t: torch.Tensor, ref: Array) -> Array:
    """``t`` as the kind (numpy/torch), dtype and device of ``ref`` (``t`` must be fresh)."""
    if isinstance(ref, torch.Tensor):
        return t.to(device=ref.device, dtype=ref.dtype)
    return t.detach().cpu().numpy().astype(np.asarray(ref).dtype, copy=False)


def copy_of(x: Array) -> Array:
    """An independent copy of ``x`` of the same kind (for entries passed through unchanged)."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    return np.array(x, copy=True)


def gather(dicts: Sequence[StateDict], key: str, like: torch.Tensor) -> list[torch.Tensor]:
    """``dicts[i][key]`` as tensors on ``like``'s device and dtype, shapes checked."""
    out = []
    for i, d in enumerate(dicts):
        t = as_torch(d[key]).to(device=like.device, dtype=like.dtype)
        if t.shape != like.shape:
            raise ValueError(
                f"shape mismatch for {key!r}: entry {i} has {tuple(t.shape)}, "
                f"expected {tuple(like.shape)}"
            )
        out.append(t)
    return out


def check_keys(
    dicts: Sequence[StateDict], what: str, keys: Sequence[str] | None = None
) -> list[str]:
    """The keys of ``dicts[0]`` (or ``keys``); ValueError if some dict lacks one or, when ``keys``
    is None, has extra ones."""
    if not dicts:
        raise ValueError(f"{what} must not be empty")
    ref = list(dicts[0]) if keys is None else list(keys)
    want = set(ref)
    for i, d in enumerate(dicts):
        missing = sorted(want - set(d))
        extra = sorted(set(d) - want) if keys is None else []
        if missing or extra:
            raise ValueError(f"{what}[{i}] keys differ: missing {missing}, unexpected {extra}")
    return ref


def all_equal(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Boolean mask, True where every tensor of ``ts`` holds the same value (NaN never equal)."""
    eq = ts[0] == ts[0]
    for t in ts[1:]:
        eq = eq & (t == ts[0])
    return eq


def scalars(values: Sequence[float] | np.ndarray | torch.Tensor, n: int, what: str) -> list[float]:
    """``n`` finite Python floats from a sequence, array or tensor; ValueError otherwise."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().tolist()
    out = [float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1)]
    if len(out) != n:
        raise ValueError(f"{what} has {len(out)} entries for {n} models")
    if not all(np.isfinite(out)):
        raise ValueError(f"{what} must be finite, got {out}")
    return out
