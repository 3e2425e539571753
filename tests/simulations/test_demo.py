"""``python -m simulations.demo`` (what ``make demo`` runs): three runs, one figure, a summary."""

from __future__ import annotations

import json

import pytest

from simulations import demo


def test_late_mean_averages_the_evaluations_of_the_last_rounds() -> None:
    rows = [{"round": r, "test_accuracy": a} for r, a in [(0, 0.1), (90, 0.5), (100, 0.7), (110, float("nan")),
                                                           (200, 0.9)]]
    assert demo.late_mean(rows, last=110) == pytest.approx((0.7 + 0.9) / 2)


def test_rounds_below_the_summary_window_are_refused(capsys) -> None:
    assert demo.main(["--rounds", "10"]) == 2
    assert "rounds" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_writes_three_runs_and_the_figure(tmp_path, capsys) -> None:
    assert demo.main(["--out", str(tmp_path), "--rounds", "100"]) == 0
    out = capsys.readouterr().out
    for strategy in demo.STRATEGIES:
        summary = json.loads((tmp_path / strategy / "summary.json").read_text())
        assert summary["strategy"] == strategy and summary["rounds"] == 100
        assert summary["final_test_accuracy"] > 0.2  # 10 classes: visibly above chance
        assert f"{strategy}:" in out
    assert (tmp_path / "convergence.png").stat().st_size > 10_000
