"""Run directories that cannot be corrupted: a lock, refusals of foreign/unfinished/finished
directories, --overwrite that clears everything, and verified checkpoints with fallback."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedagg.errors import ConfigError
from simulations import run as run_cli
from simulations.core.config import load_config
from simulations.core.results import LOCK_NAME, RunLock, RunWriter, load_arrays, read_metrics
from simulations.core.runner import Simulation

REPO = Path(__file__).resolve().parents[2]
TINY = {"engine": "inline", "rounds": 4, "num_clients": 3, "model": "mlp", "local_steps": 2,
        "dataset_args": {"num_samples": 300}}


def tiny_args(out: Path, *extra: str, rounds: int = 4) -> list[str]:
    return ["--engine", "inline", "--rounds", str(rounds), "--num-clients", "3", "--model", "mlp",
            "--local-steps", "2", "dataset_args.num_samples=300", "--out", str(out), "--no-progress",
            *extra]


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (relative name → bytes): "nothing written" is an equality."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def refused(argv: list[str], capsys, field: str) -> str:
    """Run the CLI in-process; assert exit 2 and one ``error: <field>: ...`` line; return it."""
    code = run_cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {field}: "), err
    return err


def finished_run(out: Path, **overrides) -> Simulation:
    cfg = load_config(None, {**TINY, "checkpoint_every": 1, **overrides, "out": str(out)})
    sim = Simulation(cfg)
    sim.run()
    return sim


def interrupted_run(out: Path, at: int, **overrides) -> None:
    """A run with checkpoints every round, stopped by Ctrl-C in round ``at`` (before its checkpoint)."""
    def interrupt(row):
        if row["round"] == at:
            raise KeyboardInterrupt

    cfg = load_config(None, {**TINY, "checkpoint_every": 1, **overrides, "out": str(out)})
    with pytest.raises(KeyboardInterrupt):
        Simulation(cfg, on_round=interrupt).run()


# ------------------------------------------------------------------------------ the lock
def test_a_locked_directory_is_refused_and_free_again_after_release(tmp_path) -> None:
    out = tmp_path / "r"
    out.mkdir()
    lock = RunLock(out)
    with pytest.raises(ConfigError, match=rf"^out: .* is in use by another run \(pid {os.getpid()}\)"):
        RunWriter.check(out)
    with pytest.raises(ConfigError, match="in use"):
        RunLock(out, "resume")
    lock.release()
    assert not (out / LOCK_NAME).exists()
    assert RunWriter.check(out) == "new"


def test_the_lock_is_held_during_the_run_and_released_after(tmp_path) -> None:
    seen: list[bool] = []

    def probe(row):
        with pytest.raises(ConfigError, match="in use"):
            RunWriter.check(tmp_path / "r", overwrite=True)
        seen.append(True)

    cfg = load_config(None, {**TINY, "rounds": 1, "out": str(tmp_path / "r")})
    Simulation(cfg, on_round=probe).run()
    assert seen == [True, True]  # rounds 0 and 1
    assert not (tmp_path / "r" / LOCK_NAME).exists()


@pytest.mark.slow
def test_a_second_run_with_the_same_out_stops_at_once_and_the_first_goes_on(tmp_path) -> None:
    out = tmp_path / "r"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "simulations.run"]
    first = subprocess.Popen([*cmd, *tiny_args(out, rounds=100000)], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.csv").exists():
            assert first.poll() is None, "the first run ended early"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        config = (out / "config.yaml").read_bytes()
        second = subprocess.run([*cmd, *tiny_args(out, rounds=2)], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        assert second.stderr.strip() == (f"error: out: {out} is in use by another run (pid {first.pid}); "
                                         "wait for it to end or choose another --out")
        assert first.poll() is None  # the first run is unaffected
        assert (out / "config.yaml").read_bytes() == config
        rows = read_metrics(out)
        assert [r["round"] for r in rows] == list(range(len(rows)))  # its own rows only
    finally:
        first.kill()  # SIGKILL: the OS drops the lock, a stale lock file stays
        first.wait()
    assert (out / LOCK_NAME).exists()
    assert run_cli.main(tiny_args(out, "--overwrite", rounds=1)) == 0  # a dead run blocks nothing


# ------------------------------------------------------------------------------ refusals
def test_a_non_run_directory_is_refused_even_with_overwrite(tmp_path, capsys) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    (home / ".bashrc").write_text("export X=1")
    before = snapshot(home)
    err = refused(tiny_args(home), capsys, "out")
    assert "not a run directory" in err
    err = refused(tiny_args(home, "--overwrite"), capsys, "overwrite")
    assert ".bashrc, notes.txt" in err and "only clears run directories" in err
    assert snapshot(home) == before


def test_an_unfinished_run_without_checkpoints_is_refused(tmp_path, capsys) -> None:
    out = tmp_path / "r"
    interrupted_run(out, at=2, checkpoint_every=0)
    before = snapshot(out)
    err = refused(tiny_args(out), capsys, "out")
    assert "unfinished run" in err and "--overwrite" in err
    assert snapshot(out) == before


def test_rerunning_an_interrupted_run_without_resume_is_refused(tmp_path, capsys) -> None:
    out = tmp_path / "r"
    interrupted_run(out, at=3)
    before = snapshot(out)
    assert "checkpoints/round-000002/global.safetensors" in before
    err = refused(tiny_args(out), capsys, "out")
    assert f"--resume {out}" in err and "--overwrite" in err
    assert snapshot(out) == before


def test_overwrite_clears_everything_old_checkpoints_included(tmp_path) -> None:
    out = tmp_path / "r"
    interrupted_run(out, at=3)
    (out / "error.txt").write_text("from a sweep")
    assert run_cli.main(tiny_args(out, "--overwrite", rounds=2)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "metrics.csv", "model.safetensors",
                                                     "summary.json"]
    assert [r["round"] for r in read_metrics(out)] == [0, 1, 2]


def test_overwrite_refuses_to_clear_the_folder_holding_its_config(tmp_path, capsys) -> None:
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "config.yaml").write_text("strategy: fedavg\nrounds: 1\n")
    before = snapshot(exp)
    err = refused(["--config", str(exp / "config.yaml"), *tiny_args(exp, "--overwrite")], capsys, "overwrite")
    assert "move the config" in err
    assert snapshot(exp) == before


def test_resuming_a_finished_run_is_refused(tmp_path, capsys) -> None:
    out = tmp_path / "r"
    finished_run(out)
    before = snapshot(out)
    err = refused(["--resume", str(out)], capsys, "resume")
    assert "finished run" in err
    assert snapshot(out) == before


def test_resume_and_overwrite_together_are_refused(tmp_path, capsys) -> None:
    out = tmp_path / "r"
    interrupted_run(out, at=3)
    before = snapshot(out)
    refused(["--resume", str(out), "--overwrite"], capsys, "overwrite")
    assert snapshot(out) == before


def test_resume_refuses_another_config_but_rounds_may_grow(tmp_path) -> None:
    full = finished_run(tmp_path / "full", rounds=5)
    out = tmp_path / "r"
    interrupted_run(out, at=3)  # checkpoint of round 2; the run was for 4 rounds
    before = snapshot(out)
    other = load_config(None, {**TINY, "checkpoint_every": 1, "lr": 0.5, "seed": 3, "out": str(out)})
    with pytest.raises(ConfigError, match=r"^resume: the config differs from .* in lr, seed; "):
        Simulation(other, resume=True)
    assert snapshot(out) == before
    longer = load_config(None, {**TINY, "checkpoint_every": 1, "rounds": 5, "out": str(out)})
    result = Simulation(longer, resume=True).run()
    assert load_config(out / "config.yaml").rounds == 5
    want = load_arrays(tmp_path / "full" / "model.safetensors")
    assert all(result.arrays[k].tobytes() == want[k].tobytes() for k in want)  # as if never stopped
    assert [r["test_accuracy"] for r in result.rows] == [r["test_accuracy"] for r in full.writer.rows]


# ------------------------------------------------------------------------------ checkpoints
def damage(out: Path, how: str) -> None:
    ckpt = out / "checkpoints" / "round-000004"
    if how == "truncated-global":
        data = (ckpt / "global.safetensors").read_bytes()
        (ckpt / "global.safetensors").write_bytes(data[: len(data) // 2])
    elif how == "bad-state":
        (ckpt / "state.json").write_text('{"format": 2, "round": 4, "rows": [')
    elif how == "flipped-byte":  # still parses: only the checksum can tell
        data = bytearray((ckpt / "global.safetensors").read_bytes())
        data[-1] ^= 1
        (ckpt / "global.safetensors").write_bytes(bytes(data))
    elif how == "bad-latest":
        (out / "checkpoints" / "latest").write_text("round-0000\x00zz\n")


@pytest.mark.parametrize(("how", "resumed_from"), [("truncated-global", 3), ("bad-state", 3),
                                                    ("flipped-byte", 3), ("bad-latest", 4)])
def test_a_damaged_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, caplog, how, resumed_from) -> None:
    full = finished_run(tmp_path / "full")
    out = tmp_path / "r"
    finished_run(out)
    (out / "summary.json").unlink()  # killed after the last checkpoint, before the summary
    damage(out, how)
    cfg = load_config(out / "config.yaml", {"out": str(out)})
    with caplog.at_level(logging.WARNING, logger="fedagg"):
        sim = Simulation(cfg, resume=True)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].endswith(f"resuming from round-{resumed_from:06d}"), warnings
    assert len(warnings[0].splitlines()) == 1
    assert sim.checkpoint is not None and sim.checkpoint.round == resumed_from
    result = sim.run()
    want = load_arrays(tmp_path / "full" / "model.safetensors")
    assert all(result.arrays[k].tobytes() == want[k].tobytes() for k in want)  # bit for bit
    assert [r["test_accuracy"] for r in result.rows] == [r["test_accuracy"] for r in full.writer.rows]


def test_no_intact_checkpoint_is_a_one_line_error(tmp_path, capsys) -> None:
    out = tmp_path / "r"
    finished_run(out)
    (out / "summary.json").unlink()
    for name in ("round-000003", "round-000004"):
        (out / "checkpoints" / name / "strategy.json").write_text("{")
    before = snapshot(out)
    err = refused(["--resume", str(out)], capsys, "resume")
    assert "no intact checkpoint" in err and "round-000004 (strategy.json" in err
    assert snapshot(out) == before
