"""Report helpers shared by the study drivers, the benchmarks and the CLIs.

- :func:`write_section`: replace (or append) a marked section of a docs page, atomically;
- :func:`mean_std` / :func:`sample_std`: the project's one spread convention, the **sample**
  standard deviation (``ddof=1``) over seeds or runs; it is undefined for a single value, so
  :func:`mean_std` prints the mean alone and :func:`sample_std` returns NaN there;
- :func:`table`: a markdown table from a header and rows of cell texts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

#: Degrees of freedom of every standard deviation the project reports (sample std).
DDOF = 1


def write_section(doc: str | Path, text: str, mark: str, empty: str = "") -> Path:
    """Put ``text`` between ``<!-- mark -->`` and ``<!-- /mark -->`` in ``doc``; return its path.

    The first marked section is replaced (the rest of the page is kept byte for byte); a page
    without it gets the section appended after a blank line; a missing page starts as
    ``empty``. The page is written atomically (a reader never sees half a page).
    """
    from simulations.core.results import atomic_write_text

    path = Path(doc)
    start, end = f"<!-- {mark} -->", f"<!-- /{mark} -->"
    body = path.read_text() if path.is_file() else empty
    i = body.find(start)
    j = body.find(end, i + len(start)) if i >= 0 else -1
    if j >= 0:
        body = f"{body[:i]}{start}\n{text}\n{body[j:]}"
    else:
        body = f"{body.rstrip()}\n\n{start}\n{text}\n{end}\n"
    atomic_write_text(path, body)
    return path


def sample_std(values: Sequence[float] | np.ndarray, axis: int | None = None) -> np.ndarray | float:
    """Sample standard deviation (``ddof=1``) of ``values`` (along ``axis``); NaN where there
    are fewer than two values."""
    v = np.asarray(values, dtype=np.float64)
    n = v.size if axis is None else v.shape[axis]
    if n < 2:
        shape = () if axis is None else np.delete(v.shape, axis)
        out = np.full(shape, np.nan)
        return float(out) if axis is None else out
    s = v.std(axis=axis, ddof=DDOF)
    return float(s) if axis is None else s


def mean_std(values: Iterable[float] | np.ndarray | None, digits: int = 1, scale: float = 1.0,
             signed: bool = False, empty: str = "–") -> str:
    """``mean ± std`` of ``scale · values`` with ``digits`` decimals (std: :func:`sample_std`);
    the mean alone for one value, ``empty`` for none. ``signed`` prints the mean with its sign
    (``+1.2 ± 0.3``, for differences).

    >>> mean_std([0.5, 0.6, 0.7], scale=100)
    '60.0 ± 10.0'
    >>> mean_std([2.0], signed=True), mean_std([])
    ('+2.0', '–')
    """
    v = scale * np.asarray([] if values is None else list(values), dtype=np.float64)
    if v.size == 0:
        return empty
    mean = f"{v.mean():{'+' if signed else ''}.{digits}f}"
    return f"{mean} ± {v.std(ddof=DDOF):.{digits}f}" if v.size > 1 else mean


def table(header: Sequence[str], rows: Iterable[Sequence[str]], align: str = "") -> str:
    """A markdown table: ``header``, the separator, then one line per row (cells as given).

    ``align`` has one letter per column, ``l`` (``---``) or ``r`` (``---:``); columns without a
    letter are ``l``.

    >>> print(table(["a", "b"], [["x", "1"]], "lr"))
    | a | b |
    |---|---:|
    | x | 1 |
    """
    sep = "".join("---:|" if i < len(align) and align[i] == "r" else "---|"
                  for i in range(len(header)))
    lines = [_row(header), f"|{sep}"]
    lines += [_row(r) for r in rows]
    return "\n".join(lines)


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"
