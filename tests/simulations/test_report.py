"""The shared report helpers (``simulations.report``): docs sections, mean ± sample std, tables."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from simulations import report


def test_write_section_replaces_between_markers_only(tmp_path):
    doc = tmp_path / "page.md"
    doc.write_text("# Title\n\nintro\n\n<!-- m:a -->\nold\n<!-- /m:a -->\n\nend\n")
    report.write_section(doc, "| a |\n|---|", "m:a")
    assert report.write_section(doc, "| new |", "m:a") == doc
    assert doc.read_text() == "# Title\n\nintro\n\n<!-- m:a -->\n| new |\n<!-- /m:a -->\n\nend\n"
    report.write_section(doc, "x", "m:b")  # a missing section is appended after a blank line
    assert doc.read_text() == ("# Title\n\nintro\n\n<!-- m:a -->\n| new |\n<!-- /m:a -->\n\nend"
                               "\n\n<!-- m:b -->\nx\n<!-- /m:b -->\n")


def test_write_section_starts_a_missing_page_and_ignores_an_end_marker_before_the_start(tmp_path):
    doc = tmp_path / "new.md"
    report.write_section(doc, "body", "bench:x", empty="# Benchmarks\n")
    assert doc.read_text() == "# Benchmarks\n\n<!-- bench:x -->\nbody\n<!-- /bench:x -->\n"
    odd = tmp_path / "odd.md"
    odd.write_text("<!-- /s -->\ntext\n")  # a stray end marker is not a section
    report.write_section(odd, "y", "s")
    assert odd.read_text() == "<!-- /s -->\ntext\n\n<!-- s -->\ny\n<!-- /s -->\n"


def test_write_section_is_atomic(tmp_path, monkeypatch):
    doc = tmp_path / "page.md"
    doc.write_text("<!-- s -->\nold\n<!-- /s -->\n")

    def fail(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)  # the rename of the finished temporary file fails
    with pytest.raises(OSError, match="disk full"):
        report.write_section(doc, "new", "s")
    assert doc.read_text() == "<!-- s -->\nold\n<!-- /s -->\n"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page.md"]  # no temporary left


def test_mean_std_is_the_sample_std():
    v = [1.0, 2.0, 3.0, 4.0]  # mean 2.5; sum of squares 5: ddof 1 → √(5/3) = 1.291, ddof 0 → 1.118
    assert report.DDOF == 1
    assert report.mean_std(v, digits=3) == "2.500 ± 1.291"
    assert report.mean_std(np.array(v) / 100, scale=100, digits=2) == "2.50 ± 1.29"
    assert report.mean_std([-0.5, 0.5, 1.5], signed=True) == "+0.5 ± 1.0"
    assert report.mean_std([0.4], scale=100) == "40.0"  # one value: no spread
    assert report.mean_std([]) == "–" and report.mean_std(None, empty="n/a") == "n/a"
    assert report.sample_std(v) == pytest.approx(math.sqrt(5 / 3))
    assert math.isnan(report.sample_std([3.0]))


def test_sample_std_along_an_axis():
    a = np.array([[1.0, 10.0], [3.0, 14.0]])
    assert report.sample_std(a, axis=0) == pytest.approx([math.sqrt(2), math.sqrt(8)])
    one = report.sample_std(a[:1], axis=0)
    assert one.shape == (2,) and np.isnan(one).all()


def test_table_renders_header_separator_and_rows():
    text = report.table(["method", "a", "b"], [["x", "1.0", "2.0"], ["y", "–", "3.5"]], "lr")
    assert text.splitlines() == ["| method | a | b |", "|---|---:|---|", "| x | 1.0 | 2.0 |",
                                 "| y | – | 3.5 |"]
