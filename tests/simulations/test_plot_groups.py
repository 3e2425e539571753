"""simulations.plot never mixes configs: runs are averaged only when they differ in the seed alone,
curves are labelled by the keys that differ, means stop at the shortest run and skip rounds a run did
not evaluate, the band is the sample std, unfinished runs are refused or drawn dashed, round ticks are
integers. Run directories are written by hand with known numbers (no training)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import yaml

from simulations import plot
from simulations.core.results import metrics_to_csv

NAN = float("nan")


def _run(root: Path, name: str, acc: list[float], *, finished: bool = True, seconds: float = 0.5,
         **config) -> Path:
    """A run directory: ``acc[r]`` is test_accuracy (0..1, NaN: not evaluated) after round r; the
    config is fedavg/iid with ``rounds = len(acc) - 1`` unless given; summary.json iff ``finished``."""
    d = root / name
    d.mkdir(parents=True)
    cfg = {"strategy": "fedavg", "seed": 0, "rounds": len(acc) - 1, "partition": "iid", "alpha": None,
           "lr": 0.1, "eval_every": 1, "participation": {"process": "always"}, "engine": "inline",
           "device": "auto", "out": str(d)}
    cfg.update(config)
    (d / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    rows = [{"round": r, "phase": "init" if r == 0 else "train", "clients": 0 if r == 0 else 4,
             "train_loss": NAN if r == 0 else 1.0, "test_loss": NAN if math.isnan(a) else 1.0 - a,
             "test_accuracy": a, "seconds": 0.0 if r == 0 else seconds} for r, a in enumerate(acc)]
    (d / "metrics.csv").write_text(metrics_to_csv(rows))
    if finished:
        (d / "summary.json").write_text(json.dumps({"final_test_accuracy": acc[-1]}))
    return d


def _figure(runs: list[Path], **kw):
    fig = plot.plot_panels(runs, panel_by=None, **kw)
    return fig, fig.axes[0]


def _legend(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def _band_top(ax, i: int = 0) -> dict[float, float]:
    """Upper edge of the i-th std band: {x: mean + std}."""
    verts = ax.collections[i].get_paths()[0].vertices
    top: dict[float, float] = {}
    for x, y in verts:
        top[round(float(x), 9)] = max(top.get(round(float(x), 9), -np.inf), float(y))
    return top


def test_runs_differing_only_in_seed_and_neutral_keys_are_one_curve_with_a_sample_std_band(tmp_path):
    # seed s scores 10 r + 2 s % after round r: mean 10 r + 2, sample std (ddof=1) exactly 2
    # (population std would be 1.633); out/engine/device cannot change results and are ignored.
    engines = ["inline", "ray", "flower"]
    runs = [_run(tmp_path, f"s{s}", [0.1 * r + 0.02 * s for r in range(5)], seed=s, engine=engines[s],
                 device="cpu" if s else "auto", checkpoint_every=s) for s in range(3)]
    fig, ax = _figure(runs)
    lines = ax.get_lines()
    assert len(lines) == 1
    assert _legend(ax) == ["fedavg (n=3)"]
    np.testing.assert_allclose(lines[0].get_xdata(), [0, 1, 2, 3, 4])
    np.testing.assert_allclose(lines[0].get_ydata(), [2, 12, 22, 32, 42])
    top = _band_top(ax)
    assert [top[float(r)] for r in range(5)] == pytest.approx([4, 14, 24, 34, 44])
    plt.close(fig)
    (curve,) = plot.build_curves(runs)
    assert curve.n == 3 and curve.cut_at is None and curve.finished
    np.testing.assert_allclose(curve.std, [2.0] * 5)


def test_the_issue_example_plots_two_labelled_curves_without_a_jump(tmp_path):
    # Issue 14: one IID run of 30 rounds and two Dirichlet runs of 20 used to be one "fedavg (n=3)"
    # curve jumping from 39 % to 83 % at round 20.
    iid = _run(tmp_path, "iid", [0.83] * 31)
    dirs = [_run(tmp_path, f"dir{s}", [0.38 + 0.02 * s] * 21, seed=s, partition="dirichlet", alpha=0.1)
            for s in range(2)]
    fig, ax = _figure([iid, *dirs])
    assert _legend(ax) == ["fedavg · rounds=20 · partition=dirichlet · alpha=0.1 (n=2)",
                           "fedavg · rounds=30 · partition=iid"]
    dirichlet, iid_line = ax.get_lines()
    np.testing.assert_allclose(dirichlet.get_xdata(), np.arange(21))
    np.testing.assert_allclose(dirichlet.get_ydata(), [39.0] * 21)
    np.testing.assert_allclose(iid_line.get_xdata(), np.arange(31))
    np.testing.assert_allclose(iid_line.get_ydata(), [83.0] * 31)
    assert len(ax.collections) == 1  # the single IID run draws no band
    plt.close(fig)


def test_labels_show_the_strategy_and_only_the_keys_that_differ():
    labels = plot.group_labels
    assert labels([{"strategy": "fedavg", "lr": 0.1}, {"strategy": "fedau", "lr": 0.1}]) == ["fedavg", "fedau"]
    assert labels([{"strategy": "fedau", "participation.process": "bernoulli", "lr": 0.1},
                   {"strategy": "fedau", "participation.process": "markov", "lr": 0.1}]) == \
        ["fedau · process=bernoulli", "fedau · process=markov"]
    # --group-by keys are always shown; seed and neutral keys never are.
    assert labels([{"strategy": "fedau", "lr": 0.1, "seed": 3, "out": "a"}], "strategy,lr") == ["fedau · lr=0.1"]
    # Two shown keys with the same last part keep their full names.
    assert labels([{"strategy": "x", "a.mean": 1, "b.mean": 2}, {"strategy": "x", "a.mean": 3, "b.mean": 4}]) == \
        ["x · a.mean=1 · b.mean=2", "x · a.mean=3 · b.mean=4"]
    # An unset key is left out of a label, unless that makes two labels equal.
    assert labels([{"strategy": "fedavg", "partition": "iid", "alpha": None},
                   {"strategy": "fedavg", "partition": "dirichlet", "alpha": 0.1}]) == \
        ["fedavg · partition=iid", "fedavg · partition=dirichlet · alpha=0.1"]
    assert labels([{"strategy": "fedavg", "x": None}, {"strategy": "fedavg"}]) == \
        ["fedavg · x=None", "fedavg · x=absent"]


def test_rounds_a_run_did_not_evaluate_are_left_out_of_the_mean(tmp_path):
    # eval_every cannot change results: the two runs are one group, averaged at rounds 0, 2, 4 only.
    every = _run(tmp_path, "e1", [0.0, 0.1, 0.2, 0.3, 0.4], seed=0)
    second = _run(tmp_path, "e2", [0.3, NAN, 0.5, NAN, 0.7], seed=1, eval_every=2)
    fig, ax = _figure([every, second])
    (line,) = ax.get_lines()
    np.testing.assert_allclose(line.get_xdata(), [0, 2, 4])
    np.testing.assert_allclose(line.get_ydata(), [15, 35, 55])
    assert _legend(ax) == ["fedavg (n=2)"]
    plt.close(fig)


def test_runs_of_different_length_are_cut_at_the_shortest_and_the_legend_says_so(tmp_path):
    long = _run(tmp_path, "long", [0.1 * r for r in range(6)], seed=0, rounds=10, finished=False)
    short = _run(tmp_path, "short", [0.1 * r + 0.2 for r in range(4)], seed=1, rounds=10, finished=False)
    done = _run(tmp_path, "done", [0.5] * 11, seed=2, rounds=10)
    fig, ax = _figure([long, short, done], include_unfinished=True)
    assert _legend(ax) == ["fedavg", "fedavg (unfinished, n=2, cut at round 3)"]
    finished_line, unfinished_line = ax.get_lines()
    assert finished_line.get_linestyle() == "-" and unfinished_line.get_linestyle() == "--"
    np.testing.assert_allclose(unfinished_line.get_xdata(), [0, 1, 2, 3])
    np.testing.assert_allclose(unfinished_line.get_ydata(), [10, 20, 30, 40])
    plt.close(fig)
    unfinished = plot.build_curves([long, short], include_unfinished=True)[0]
    assert unfinished.cut_at == 3 and not unfinished.finished


def test_unfinished_runs_are_refused_unless_asked_for(tmp_path, capsys):
    done = _run(tmp_path, "done", [0.1, 0.2, 0.3])
    partial = _run(tmp_path, "partial", [0.1, 0.2], rounds=2, seed=1, finished=False)
    out = tmp_path / "fig.png"
    assert plot.main([str(done), str(partial), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: run_dir: {partial} is unfinished (no summary.json); pass --include-unfinished " \
                  "to plot it dashed\n"
    assert not out.exists()
    assert plot.main([str(done), str(partial), "--include-unfinished", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_round_ticks_are_integers(tmp_path):
    fig, ax = _figure([_run(tmp_path, "r", [0.1, 0.2, 0.3, 0.4])])
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks
    plt.close(fig)


def test_x_other_than_round_is_averaged_at_common_rounds(tmp_path):
    runs = [_run(tmp_path, f"s{s}", [0.1, 0.2, 0.3], seed=s, seconds=1.0 + 2 * s) for s in range(2)]
    (curve,) = plot.build_curves(runs, x="seconds")
    np.testing.assert_allclose(curve.x, [0, 2, 4])  # mean of 0/1/2 s and 0/3/6 s
    np.testing.assert_allclose(curve.mean, [10, 20, 30])


@pytest.mark.parametrize("case", ["no_metrics", "missing", "metric", "text_metric", "group_by", "same_seed",
                                  "no_runs"])
def test_bad_input_is_a_one_line_error_with_exit_2(tmp_path, capsys, case):
    run = _run(tmp_path, "run", [0.1, 0.2])
    args = {"no_metrics": [str(tmp_path / "empty")], "missing": [str(tmp_path / "nope")],
            "metric": [str(run), "--metric", "accuracy"], "text_metric": [str(run), "--metric", "phase"],
            "group_by": [str(run), "--group-by", "nope"],
            "same_seed": [str(run), str(_run(tmp_path, "copy", [0.1, 0.2]))], "no_runs": []}[case]
    (tmp_path / "empty").mkdir()
    out = tmp_path / "fig.png"
    try:
        code = plot.main([*args, "--out", str(out)])
    except SystemExit as exc:  # argparse
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    expected = {"no_metrics": "holds no run directory", "missing": "is not a run directory",
                "metric": "has no column 'accuracy'", "text_metric": "column 'phase' is not numeric",
                "group_by": "group_by: config has no key 'nope'",
                "same_seed": "are the same run", "no_runs": "required: runs"}[case]
    assert expected in err
    assert not out.exists()
