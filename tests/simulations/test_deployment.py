"""The Flower App on Flower's deployment runtime, on loopback.

One ``flower-superlink --insecure`` and three ``flower-supernode`` processes on 127.0.0.1 (each with
``partition-id``/``num-partitions`` in its node config and its own ClientAppIo port), driven by
``flwr run <repo> <connection>`` exactly as a user would: FedAU under Bernoulli availability and the
Flag Aggregator against a Byzantine client learn; a bad ``--run-config`` value ends the run with the
CLI's one-line error; a SuperNode killed mid-run is recorded as a timeout and the run completes.

Every process the test starts is stopped by pid (terminate, then kill), with the processes Flower
started under it (SuperExec, ServerApp, ClientApps). Flower's state lives in a temporary FLWR_HOME
per process, so ``~/.flwr`` is not touched.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from simulations.core.results import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("flower-deployment"),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
NODES = 3
#: Small and fast, yet well above chance (10 %) after two rounds: 2,000 MNIST-1D samples, an MLP,
#: 200 local steps with momentum.
BASE = {"rounds": 2, "lr": 0.1, "local-steps": 200, "momentum": 0.9, "batch-size": 32, "model": "mlp",
        "overrides": "dataset_args.num_samples=2000"}
#: The whole run (start-up included) must finish within this (a guard against hangs, not a timing).
RUN_LIMIT = 600.0


def run_config(**values: object) -> str:
    """``--run-config`` text for ``BASE`` updated with ``values`` (``_`` in names reads ``-``)."""
    items = {**BASE, **{k.replace("_", "-"): v for k, v in values.items()}}
    return " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                    for k, v in items.items())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descendants(pid: int) -> list[int]:
    """Pids of every process under ``pid`` (children first found, then theirs), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def stop(pids: list[int], grace: float = 10.0) -> None:
    """SIGTERM ``pids``, then SIGKILL those still alive after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            if alive(pid):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)


class Federation:
    """A SuperLink and SuperNodes on loopback, started and stopped by this test."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                    # one torch thread per process, as the simulator's workers: same floats
                    "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.port = free_port()
        self.cli_env = {**self.env, "FLWR_HOME": str(root / "cli")}

    def start(self, nodes: int) -> None:
        """The SuperLink (waits until it answers), ``nodes`` SuperNodes and a CLI connection to it."""
        self._start("superlink", ["flower-superlink", "--insecure", "--host", "127.0.0.1",
                                  "--port", str(self.port), "--disable-runtime-dependency-installation"])
        self._wait_healthy()
        for k in range(nodes):
            self._start(f"node{k}", ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                                     "--host", "127.0.0.1", "--port", str(free_port()),
                                     "--node-config", f"partition-id={k} num-partitions={nodes}"])
        cli = self.root / "cli"
        cli.mkdir()
        (cli / "config.toml").write_text(f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
                                         f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')

    def _start(self, name: str, cmd: list[str]) -> None:
        home = self.root / name
        home.mkdir()
        with (self.root / f"{name}.log").open("wb") as log:
            self.procs[name] = subprocess.Popen(cmd, env={**self.env, "FLWR_HOME": str(home)}, cwd=home,
                                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def _wait_healthy(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs["superlink"].poll() is not None:
                raise RuntimeError(f"flower-superlink exited: {self.log('superlink')}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1)
                return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("flower-superlink did not come up")

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")[-3000:]

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "flwr"), *args], env=self.cli_env, cwd=self.root,
                              capture_output=True, text=True, timeout=timeout)

    def submit(self, run_config: str) -> tuple[subprocess.Popen[str], Path]:
        """``flwr run <repo> loopback --stream``: returns at the end of the run (and its log file)."""
        out = self.root / f"flwr-run-{len(list(self.root.glob('flwr-run-*')))}.log"
        proc = subprocess.Popen([str(BIN / "flwr"), "run", str(REPO), "loopback", "--stream",
                                 "--run-config", run_config], env=self.cli_env, cwd=self.root,
                                stdout=out.open("w"), stderr=subprocess.STDOUT, text=True)
        return proc, out

    def finish(self, proc: subprocess.Popen[str], out: Path) -> dict:
        """Wait for a submitted run; its status from ``flwr ls`` (and the streamed log as ``log``)."""
        try:
            proc.wait(timeout=RUN_LIMIT)
        except subprocess.TimeoutExpired:
            stop([proc.pid])
            raise AssertionError(f"run did not finish:\n{out.read_text()[-3000:]}\n{self.log('superlink')}") from None
        text = out.read_text()
        match = re.search(r"Successfully started run (\d+)", text)
        assert match, text
        res = self.flwr("ls", "loopback", "--run-id", match.group(1), "--format", "json")
        status = json.loads(res.stdout)["runs"][0]
        status["log"] = text
        return status

    def run(self, run_config: str) -> dict:
        return self.finish(*self.submit(run_config))

    def kill_node(self, k: int) -> None:
        """SIGKILL SuperNode ``k`` and what runs under it (a crash, not a shutdown)."""
        proc = self.procs[f"node{k}"]
        for pid in [proc.pid, *descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)

    def close(self) -> list[int]:
        """Stop every process started here (SuperNodes first) with everything under it; their pids."""
        stopped = []
        for name in sorted(self.procs, key=lambda n: n == "superlink"):
            proc = self.procs[name]
            pids = [proc.pid, *descendants(proc.pid)]
            stop(pids)
            proc.wait(timeout=30)
            stopped += pids
        return stopped


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    fed = Federation(tmp_path_factory.mktemp("flower"))
    try:
        fed.start(NODES)
        yield fed
    finally:
        stopped = fed.close()
    assert not [pid for pid in stopped if alive(pid)]


def finished(status: dict) -> None:
    assert status["status"] == "finished:completed", (status["status-details"], status["log"][-3000:])


def test_fedau_with_bernoulli_availability_learns_on_supernodes(federation, tmp_path) -> None:
    # num-clients unset: one client per SuperNode, read from the nodes' num-partitions
    out = tmp_path / "fedau"
    status = federation.run(run_config(strategy="fedau", seed=0, **{"participation.process": "bernoulli",
                                       "participation.probabilities.mean": 0.7}, out=str(out)))
    finished(status)
    rows = read_metrics(out)
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "model.safetensors").is_file()
    assert summary["num_clients"] == NODES and summary["engine"] == "flower"
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert summary["final_test_accuracy"] > 0.3  # chance: 0.1
    # Bernoulli availability: not every client every round, and the replies match who was asked
    assert [r["available"] for r in rows[1:]] == [2, 3]
    assert all(r["clients"] == r["sent"] == r["available"] and r["timeouts"] == 0 for r in rows[1:])
    assert "round 2/2" in status["log"]  # progress reaches `flwr run --stream` / `flwr log`

    # the same run on the inline engine's per-client path (one thread per client, as the SuperNodes
    # here, which call the ClientApp once per message): same availability, the same model bit for
    # bit, the same metrics (up to evaluation threads)
    from simulations.core.config import load_config
    from simulations.core.results import load_arrays
    from simulations.core.runner import Simulation

    cfg = load_config(None, {"strategy": "fedau", "seed": 0, "rounds": 2, "num_clients": NODES, "lr": 0.1,
                             "local_steps": 200, "momentum": 0.9, "batch_size": 32, "model": "mlp",
                             "participation": {"process": "bernoulli", "probabilities": {"mean": 0.7}},
                             "dataset_args": {"num_samples": 2000}, "engine": "inline",
                             "batched_clients": False, "out": str(tmp_path / "inline")})
    ref = Simulation(cfg).run()
    assert [r["available"] for r in ref.rows[1:]] == [r["available"] for r in rows[1:]]
    for key in ("train_loss", "test_loss", "test_accuracy"):
        assert [r[key] for r in rows] == pytest.approx([r[key] for r in ref.rows], rel=1e-5, nan_ok=True)
    model = load_arrays(out / "model.safetensors")
    assert model.keys() == ref.arrays.keys()
    for name, array in ref.arrays.items():
        assert model[name].tobytes() == array.tobytes(), name


def test_flag_aggregator_learns_with_a_byzantine_supernode(federation, tmp_path) -> None:
    out = tmp_path / "flag"
    status = federation.run(run_config(
        strategy="flag", num_clients=NODES, attack="alie", num_byzantine=1, out=str(out),
        overrides="dataset_args.num_samples=2000 strategy_args.scale=median-norm",
        **{"participation.process": "always", "participation.probabilities.mean": ""}))
    finished(status)
    rows = read_metrics(out)
    assert [r["byzantine"] for r in rows[1:]] == [1, 1]  # one of the three replies replaced per round
    assert all(r["clients"] == NODES for r in rows[1:])
    assert rows[-1]["test_accuracy"] > 0.3


def test_bad_run_config_fails_the_run_with_the_cli_error(federation, tmp_path, capsys) -> None:
    from simulations import run as cli

    assert cli.main(["--strategy", "nope", "--out", str(tmp_path / "cli")]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: strategy: unknown value 'nope'")
    status = federation.run(run_config(strategy="nope", num_clients=NODES, out=str(tmp_path / "app")))
    assert status["status"] == "finished:failed"
    assert status["status-details"].endswith(line.removeprefix("error: "))
    assert line in status["log"]  # the same line, in the run's log
    assert not (tmp_path / "app").exists()  # nothing written


def test_a_supernode_killed_mid_run_is_recorded_and_the_run_completes(federation, tmp_path) -> None:
    # min-replies 0: on a loaded machine a live node may miss the timeout too; the run goes on
    out = tmp_path / "killed"
    proc, log = federation.submit(run_config(
        strategy="fedau", num_clients=NODES, round_timeout=30, min_replies=0, out=str(out),
        **{"participation.process": "always", "participation.probabilities.mean": ""}))
    deadline = time.monotonic() + RUN_LIMIT
    while not ((out / "metrics.csv").is_file() and len(read_metrics(out)) >= 2):  # round 1 done
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)
    federation.kill_node(0)
    status = federation.finish(proc, log)
    finished(status)
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [0, 1, 2] and (out / "summary.json").is_file()
    after = rows[2]
    assert after["sent"] == NODES and after["timeouts"] + after["failures"] >= 1  # the dead node
    assert after["clients"] + after["timeouts"] + after["failures"] == NODES
    assert "round_timeout: 30.0" in (out / "config.yaml").read_text()
