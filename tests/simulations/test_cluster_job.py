"""A real single-node Ray cluster on 127.0.0.1: a run submitted with ``simulations.submit`` (results
fetched through the job log) and one with the plain ``ray job submit`` CLI (results on the shared
filesystem). The test starts the head as ``ray start --head --block`` in its own session, on free
ports and its own temp dir, then stops it with SIGTERM and checks that every process it started is
gone (``ray stop`` would stop every Ray on the machine) and that nothing listened or connected
outside the loopback interface. Where the test runs as root with ``ip netns``, a second test builds a
real two-node cluster inside two network namespaces it creates (and deletes)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
RAY = VENV_BIN / "ray"
RUN = ["--strategy", "fedavg", "--rounds", "3", "--num-clients", "4", "--model", "mlp", "--seed", "1",
       "--local-steps", "2", "--batch-size", "16", "--lr", "0.1"]
DATA = "dataset_args.num_samples=600"  # key=value overrides go last (simulations.run's parser)

NO_CLUSTER = not Path("/proc/self/stat").exists() or not RAY.exists()


# ------------------------------------------------------------------------------ /proc helpers
def _stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, session id, start time in clock ticks) of ``pid``, None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    if fields[0] == "Z":  # a zombie has exited; only its parent's wait() is missing
        return None
    return int(fields[1]), int(fields[3]), int(fields[19])


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _ours(root: int, marker: str) -> dict[int, int]:
    """{pid: start time} of the processes the cluster started: descendants of ``root``, its session,
    and any process whose command line names our temp dir (in case one was re-parented)."""
    stats = {p: s for p in _pids() if (s := _stat(p)) is not None}
    children: dict[int, list[int]] = {}
    for p, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(p)
    found, todo = set(), [root]
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            if c not in found:
                found.add(c)
                todo.append(c)
    found |= {p for p, (_, sid, _) in stats.items() if sid == root}
    found |= {p for p in stats if marker in _cmdline(p) and p != os.getpid()}
    found.discard(root)
    return {p: stats[p][2] for p in found if p in stats}


def _alive(procs: dict[int, int]) -> dict[int, str]:
    out = {}
    for pid, start in procs.items():
        s = _stat(pid)
        if s is not None and s[2] == start:  # same pid *and* same start time: not a reused pid
            out[pid] = _cmdline(pid)[:120]
    return out


def _sockets(pids: list[int]) -> list[tuple[str, str, str, int]]:
    """(state, local ip:port, remote ip:port, pid) of every TCP socket the processes hold."""
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes[link[8:-1]] = pid
        except OSError:
            continue
    out = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[9] in inodes:
                out.append((f[3], _ip(f[1], v6), _ip(f[2], v6), inodes[f[9]]))
    return out


def _ip(hexaddr: str, v6: bool) -> str:
    addr, port = hexaddr.split(":")
    raw = bytes.fromhex(addr)
    if not v6:
        return f"{socket.inet_ntop(socket.AF_INET, raw[::-1])}:{int(port, 16)}"
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    return f"[{socket.inet_ntop(socket.AF_INET6, words)}]:{int(port, 16)}"


def _on_loopback(state: str, local: str, remote: str) -> bool:
    """Local end on loopback (or an unbound socket), remote end on loopback (or none: listening)."""
    def lo(a: str) -> bool:
        ip = a.rsplit(":", 1)[0].strip("[]")
        return ip.startswith("127.") or ip == "::1" or ip.startswith("::ffff:127.")

    def unset(a: str) -> bool:
        return a.rsplit(":", 1)[0].strip("[]") in ("0.0.0.0", "::")

    local_ok = lo(local) or (unset(local) and local.endswith(":0"))
    remote_ok = lo(remote) or (unset(remote) and remote.endswith(":0"))
    return local_ok and remote_ok


# ------------------------------------------------------------------------------ no cluster needed
def test_run_directory_survives_a_trip_through_a_noisy_job_log(tmp_path):
    from simulations import job

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    files = {"config.yaml": b"rounds: 3\n", "metrics.csv": b"round\n0\n", "summary.json": b"{}\n",
             "model.safetensors": os.urandom(20000), "checkpoints/round-2.safetensors": os.urandom(5000)}
    for name, data in files.items():
        (run / name).write_bytes(data)
    (run / ".metrics.csv.x.tmp").write_bytes(b"half-written")  # never shipped
    data = job.pack_dir(run)
    buf = io.StringIO()
    assert job.emit_archive(run, data, out=buf)
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("FEDAGG-RUNDIR-BEGIN {") and lines[-1] == "FEDAGG-RUNDIR-END"
    assert all(len(line) <= len("FEDAGG-RUNDIR ") + 4096 for line in lines[1:-1])
    # Ray's and the run's own lines may come in between.
    noisy = ["Running entrypoint for job x", *lines[:3], "(raylet) a warning", *lines[3:], "bye"]
    head, back = job.extract_archive("\n".join(noisy))
    assert back == data and head["name"] == "run" and head["bytes"] == len(data)
    dest = tmp_path / "dest"
    written = job.unpack_dir(back, dest)
    assert sorted(p.relative_to(dest).as_posix() for p in written) == sorted(files)
    assert written[-1].name == "summary.json"  # last: it marks a finished run
    assert all((dest / name).read_bytes() == content for name, content in files.items())

    damaged = [*noisy]
    i = noisy.index(lines[2])  # the second chunk: flip one base64 character
    pos = len("FEDAGG-RUNDIR ") + 100
    damaged[i] = damaged[i][:pos] + ("B" if damaged[i][pos] != "B" else "C") + damaged[i][pos + 1:]
    with pytest.raises(job.FetchError, match="damaged"):
        job.extract_archive("\n".join(damaged))
    with pytest.raises(job.FetchError, match="no complete run directory"):
        job.extract_archive("\n".join(noisy[:-2]))  # cut before the END marker
    buf = io.StringIO()
    assert not job.emit_archive(run, data, out=buf, max_bytes=len(data) - 1)
    with pytest.raises(job.FetchError, match=f"is {len(data)} bytes packed, over the {len(data) - 1}-byte cap"):
        job.extract_archive(buf.getvalue())


def test_archive_members_cannot_escape_the_destination(tmp_path):
    import tarfile

    from simulations import job

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(job.FetchError, match="outside the run directory"):
        job.unpack_dir(buf.getvalue(), tmp_path / "dest")
    assert not (tmp_path / "escape.txt").exists()


def test_job_arguments_name_the_run_directory_and_the_cluster(tmp_path):
    from fedagg.errors import ConfigError
    from simulations import job

    run = job.resolve_run_args(["--strategy", "fedau", "--rounds", "2"], default_out="runs/abc")
    assert run.argv == ["--strategy", "fedau", "--rounds", "2", "--out", "runs/abc",
                        "--ray-address", "auto", "--no-progress"]
    assert run.run_dir == Path("runs/abc") and run.strategy == "fedau" and not run.out_given
    # The user's run directory and cluster address are kept.
    cfg = tmp_path / "c.yaml"
    cfg.write_text("strategy: fedavg\nout: /shared/r1\nray: {address: 10.0.0.1:6379}\n")
    run = job.resolve_run_args(["--config", "c.yaml", "--no-progress"], base_dir=tmp_path)
    assert run.argv == ["--config", "c.yaml", "--no-progress"]
    assert run.run_dir == Path("/shared/r1") and run.out_given
    run = job.resolve_run_args(["--out", "runs/x", "ray.address=auto"])
    assert run.argv == ["--out", "runs/x", "ray.address=auto", "--no-progress"]
    with pytest.raises(ConfigError, match="rounds"):
        job.resolve_run_args(["--rounds", "0"])


def test_submit_checks_its_input_before_contacting_the_cluster(tmp_path, capsys):
    from simulations import submit

    dead = "http://127.0.0.1:9"  # nothing listens there
    assert submit.main(["--address", dead]) == 2
    assert "give the run's arguments after `--`" in capsys.readouterr().err
    assert submit.main(["--address", dead, "--", "--rounds", "0"]) == 2
    assert capsys.readouterr().err == "error: rounds: Input should be greater than or equal to 1 (got 0)\n"
    assert submit.main(["--address", dead, "--entrypoint-resources", "[1]", "--", "--rounds", "1"]) == 2
    assert "entrypoint_resources: expected a JSON mapping" in capsys.readouterr().err
    done = tmp_path / "done"
    done.mkdir()
    (done / "summary.json").write_text("{}")
    assert submit.main(["--address", dead, "--fetch-to", str(done), "--", "--rounds", "1"]) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert submit.main(["--address", dead, "--quiet", "--", "--rounds", "1"]) == 1
    assert capsys.readouterr().err.startswith(f"error: cannot reach the Ray job API at {dead}")
    assert submit.fetch_target(Path("runs/a"), None) == Path("runs/a")
    assert submit.fetch_target(Path("/shared/x/a"), None) == Path("runs/a")
    assert submit.fetch_target(Path("runs/a"), "elsewhere") == Path("elsewhere")


class FakeJobs:
    """The part of Ray's ``JobSubmissionClient`` that ``submit`` uses. A job runs at once, here, as
    the cluster would run it: its entrypoint in a shell whose ``PATH`` is ``path`` (the environment
    of the ``ray start`` process) plus the job's ``env_vars``, in its working directory; its log
    has the lines Ray adds (as Ray 2.55 writes them: a set-up line, then the output, then the
    entrypoint echoed)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.jobs: dict[str, tuple[str, int, str]] = {}
        self.stopped: list[str] = []

    def submit_job(self, *, entrypoint: str, runtime_env: dict, submission_id: str, **_: object) -> str:
        env = {"PATH": self.path, **runtime_env.get("env_vars", {})}
        done = subprocess.run(entrypoint, shell=True, env=env, cwd=runtime_env["working_dir"],
                              capture_output=True, text=True, timeout=120)
        log = (f"2026-11-30 05:28:29,031\tINFO job_manager.py:587 -- Runtime env is setting up.\n"
               f"{done.stdout}{done.stderr}Running entrypoint for job {submission_id}: {entrypoint}\n")
        self.jobs[submission_id] = (entrypoint, done.returncode, log)
        return submission_id

    def get_job_status(self, job_id: str):
        from ray.job_submission import JobStatus

        return JobStatus.SUCCEEDED if self.jobs[job_id][1] == 0 else JobStatus.FAILED

    def get_job_logs(self, job_id: str) -> str:
        return self.jobs[job_id][2]

    def get_job_info(self, job_id: str):
        from types import SimpleNamespace

        return SimpleNamespace(message=f"Job entrypoint command failed with exit code {self.jobs[job_id][1]}")

    def stop_job(self, job_id: str) -> bool:
        self.stopped.append(job_id)
        return False


def _python_dir(tmp_path: Path, target: str) -> str:
    """A directory holding only ``python`` → ``target`` (a cluster whose PATH finds that python)."""
    d = tmp_path / f"bin-{Path(target).name}"
    d.mkdir()
    (d / "python").symlink_to(target)
    return str(d)


def test_env_check_reports_the_cluster_python_and_refuses_one_without_flwr(tmp_path, monkeypatch, capsys):
    from fedagg.errors import ConfigError
    from simulations import submit

    required = submit.required_distributions()
    assert {"flwr", "ray", "torch"} <= set(required) and required["flwr"] == "==1.41.0"
    spec = {"working_dir": str(REPO), "env_vars": dict(submit.JOB_ENV)}
    # A head started from this environment (its bin first on PATH): everything there.
    good = FakeJobs(f"{VENV_BIN}{os.pathsep}/usr/bin:/bin")
    report = submit.check_cluster_env(good, spec, {}, "probe-1")
    assert report["python"] == str(VENV_BIN / "python") and report["dists"]["flwr"] == "1.41.0"
    assert submit.env_problems(report, required) == [] and good.stopped == []
    # A python without flwr (the system one, when it has none) is refused, naming what is missing.
    system = shutil.which("python3", path="/usr/bin:/bin")
    if system is None or subprocess.run([system, "-c", "import flwr"], capture_output=True,
                                        env={"PATH": "/usr/bin:/bin"}).returncode == 0:
        pytest.skip("no system python3 without flwr to stand for a bare cluster")
    bare = FakeJobs(_python_dir(tmp_path, system))
    with pytest.raises(ConfigError, match=r"^cluster: the job's python \(.*\) lacks (.*, )?flwr"):
        submit.check_cluster_env(bare, spec, {}, "probe-2")
    # No `python` on the PATH at all.
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"could not run the environment check \(.*python: not found\)"):
        submit.check_cluster_env(FakeJobs(str(empty)), spec, {}, "probe-3")
    # A version outside the specifier is a problem too.
    assert submit.env_problems({"dists": {"flwr": "1.40.0", "torch": None}}, {"flwr": "==1.41.0", "torch": ""}) \
        == ["flwr 1.40.0 (needs ==1.41.0)", "torch"]
    # The CLI: exit 2, one line, and the run itself is never submitted.
    monkeypatch.setattr(submit, "_client", lambda address, verbose=False: bare)
    code = submit.main(["--address", "http://cluster:8265", "--submission-id", "run-1", "--", "--rounds", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "lacks" in err and "ray start" in err, err
    assert list(bare.jobs) == ["probe-2", "run-1-envcheck"]
    # With the check skipped the run is submitted (and, being a fake, fails to run here).
    monkeypatch.setattr(submit, "_client", lambda address, verbose=False: bare)
    assert submit.main(["--address", "http://c:8265", "--submission-id", "run-2", "--no-env-check",
                        "--quiet", "--no-fetch", "--", "--rounds", "1"]) == 1
    assert "run-2" in bare.jobs and "run-2-envcheck" not in bare.jobs


# ------------------------------------------------------------------------------ the cluster
def _free_ports(n: int, avoid: range) -> list[int]:
    """``n`` distinct free ports outside ``avoid`` (Ray refuses a port that two components share)."""
    socks, ports = [], []
    while len(ports) < n:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)  # held until all are chosen: no duplicates
        if s.getsockname()[1] not in avoid:
            ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _worker_range(width: int = 40) -> tuple[int, int]:
    """A run of ``width`` ports that are free now (Ray's workers bind in it)."""
    for _ in range(200):
        lo = 20000 + int.from_bytes(os.urandom(2), "little") % 30000
        ok = True
        for port in range(lo, lo + width):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return lo, lo + width - 1
    raise RuntimeError("no free port range for the Ray workers")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update({
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # the job's `python` is this venv's
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
        # The dashboard starts ~9 module processes; on 2 busy cores they need more than Ray's 30 s.
        "RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT": "240",
        "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "240",
    })
    return env


class Cluster:
    """``ray start --head --block`` as a child in its own session (see module docstring)."""

    def __init__(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths live here
        lo, hi = _worker_range()
        (self.gcs, self.dash, self.client, self.om, self.nm, self.agent, self.agent_grpc, self.rte,
         self.metrics) = _free_ports(9, avoid=range(lo, hi + 1))
        self.cmd = [
            str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={self.gcs}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dash}",
            f"--ray-client-server-port={self.client}", f"--object-manager-port={self.om}",
            f"--node-manager-port={self.nm}", f"--dashboard-agent-listen-port={self.agent}",
            f"--dashboard-agent-grpc-port={self.agent_grpc}", f"--runtime-env-agent-port={self.rte}",
            f"--metrics-export-port={self.metrics}", f"--min-worker-port={lo}", f"--max-worker-port={hi}",
            "--num-cpus=2", '--resources={"slow_worker": 1}', f"--temp-dir={self.tmp}",
            "--object-store-memory=100000000", "--disable-usage-stats",
        ]
        self.log = open(Path(self.tmp) / "ray-start.log", "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(self.cmd, env=_env(), cwd=REPO, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.address = f"http://127.0.0.1:{self.dash}"
        self.killed = False

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join((Path(self.tmp) / "ray-start.log").read_text().splitlines()[-n:])
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 240.0) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.address}/api/version", timeout=5) as r:
                    if r.status == 200 and "ray_version" in json.loads(r.read()):
                        return time.monotonic() - t0
            except OSError:
                pass
            time.sleep(1.0)
        raise RuntimeError(f"the job API at {self.address} did not answer in {timeout:.0f} s:\n"
                           f"{self.log_tail()}")

    def stop(self, timeout: float = 90.0) -> int | None:
        """SIGTERM the ``ray start`` child (it stops every process it started); SIGKILL our own
        session only as a last resort. Returns the child's exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.killed = True
                os.killpg(self.proc.pid, signal.SIGKILL)  # our session only (start_new_session)
                self.proc.wait(30)
        self.log.close()
        return self.proc.returncode


def _run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in _env().items() if not k.startswith("RAY_DASHBOARD")}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _check_run_dir(d: Path, engine: str) -> dict:
    from simulations.core.results import load_arrays, read_metrics

    rows = read_metrics(d)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert [r["phase"] for r in rows] == ["init", "train", "train", "train"]
    assert all(r["clients"] == 4 for r in rows[1:])
    summary = json.loads((d / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["engine"] == engine and summary["seed"] == 1
    assert summary["final_test_accuracy"] == pytest.approx(rows[-1]["test_accuracy"])
    assert 0.0 <= summary["final_test_accuracy"] <= 1.0
    model = load_arrays(d / "model.safetensors")
    assert sum(v.size for v in model.values()) == summary["model_parameters"] > 0
    return summary


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
@pytest.mark.timeout(600)
@pytest.mark.skipif(NO_CLUSTER, reason="needs Linux /proc and the ray CLI of this environment")
def test_jobs_on_a_local_cluster_and_clean_shutdown(tmp_path):
    t0 = time.monotonic()
    cluster = Cluster()
    procs: dict[int, int] = {}
    try:
        print(f"job API up after {cluster.wait_ready():.1f} s")
        # 1. simulations.submit: ray engine, joins the job's cluster (--ray-address auto), fetched
        #    back through the job log. The job driver needs the custom "slow_worker" resource.
        fetched = tmp_path / "fetched"
        submit = subprocess.Popen(
            [sys.executable, "-m", "simulations.submit", "--address", cluster.address, "--fetch-to",
             str(fetched), "--entrypoint-resources", '{"slow_worker": 1}', "--", *RUN, "--engine", "ray",
             DATA, "ray.num_workers=2"],
            cwd=REPO, env={k: v for k, v in _env().items() if not k.startswith("RAY_DASHBOARD")},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        # 2. the plain CLI, as documented: results on the (here: local) shared filesystem.
        shared = tmp_path / "shared-run"
        cli = _run([str(RAY), "job", "submit", "--address", cluster.address, "--working-dir", ".",
                    "--runtime-env-json", json.dumps({
                        "excludes": [".venv", "runs", ".git"],
                        "env_vars": {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}}),
                    "--", "python", "-m", "simulations.run", *RUN, "--engine", "inline",
                    "--no-progress", "--out", str(shared), DATA])
        sub_out, _ = submit.communicate(timeout=300)
        print(f"both jobs done after {time.monotonic() - t0:.1f} s")
        # 3. a sweep driven from here on the cluster (--ray-address HOST:PORT, without the env var:
        #    ray_session sets it for a loopback address); each cell needs half a "slow_worker".
        import yaml

        spec = {"base": {"dataset_args": {"num_samples": 600}, "num_clients": 4, "model": "mlp",
                         "rounds": 2, "local_steps": 2, "batch_size": 16},
                "grid": {"seed": [0, 1]}, "out": str(tmp_path / "sweep"),
                "cell_resources": {"num_cpus": 1, "resources": {"slow_worker": 0.5}}}
        (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
        env = {k: v for k, v in _env().items() if not k.startswith(("RAY_DASHBOARD", "RAY_ENABLE"))}
        sweep = subprocess.run([sys.executable, "-m", "simulations.sweep", str(tmp_path / "sweep.yaml"),
                                "--ray-address", f"127.0.0.1:{cluster.gcs}"], cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=300)
        print(f"sweep done after {time.monotonic() - t0:.1f} s")
        # 4. a cluster whose `python` lacks flwr (the job's PATH finds the system python3, as for a
        #    head started outside the project's environment): refused before the run is submitted.
        system = shutil.which("python3", path="/usr/bin:/bin")
        bare = None
        if system and subprocess.run([system, "-c", "import flwr"], capture_output=True).returncode:
            bare = subprocess.run(
                [sys.executable, "-m", "simulations.submit", "--address", cluster.address, "--submission-id",
                 "bare-1", "--env", f"PATH={_python_dir(tmp_path, system)}:/usr/bin:/bin", "--", *RUN, DATA],
                cwd=REPO, env={k: v for k, v in _env().items() if not k.startswith("RAY_DASHBOARD")},
                capture_output=True, text=True, timeout=300)
            from ray.job_submission import JobSubmissionClient

            jobs = {j.submission_id for j in JobSubmissionClient(cluster.address).list_jobs()}
        procs = _ours(cluster.proc.pid, cluster.tmp)
        socks = _sockets([cluster.proc.pid, *procs])

        assert submit.returncode == 0, sub_out
        assert f"cluster environment: {VENV_BIN / 'python'} (Python" in sub_out
        if bare is not None:
            assert bare.returncode == 2 and bare.stderr.count("\n") == 1, bare.stdout + bare.stderr
            assert bare.stderr.startswith("error: cluster: the job's python (") and "flwr" in bare.stderr
            assert "bare-1-envcheck" in jobs and "bare-1" not in jobs
        assert cli.returncode == 0, cli.stdout + cli.stderr
        assert "succeeded" in (cli.stdout + cli.stderr).lower()
        # The job ran on our cluster (RAY_ADDRESS is its GCS), from the uploaded working dir.
        assert f"RAY_ADDRESS=127.0.0.1:{cluster.gcs}," in sub_out
        assert f"code {cluster.tmp}/" in sub_out and "runtime_resources/working_dir_files" in sub_out
        assert f"fetched 4 files → {fetched}" in sub_out
        a = _check_run_dir(fetched, "ray")
        b = _check_run_dir(shared, "inline")
        # Same seed ⇒ same model on both engines (the project's parity guarantee), across jobs.
        from simulations.core.results import load_arrays

        ma, mb = load_arrays(fetched / "model.safetensors"), load_arrays(shared / "model.safetensors")
        assert sorted(ma) == sorted(mb) and all((ma[k] == mb[k]).all() for k in ma)
        assert a["final_test_accuracy"] == b["final_test_accuracy"]
        cfg = yaml.safe_load((fetched / "config.yaml").read_text())
        assert cfg["ray"]["address"] == "auto" and cfg["engine"] == "ray"
        assert sweep.returncode == 0, sweep.stdout + sweep.stderr
        assert "2 cells: 2 ran, 0 skipped, 0 failed" in sweep.stdout
        cells = [json.loads((tmp_path / "sweep" / "cells" / f"seed={k}" / "cell.json").read_text())
                 for k in (0, 1)]
        assert all(c["status"] == "done" for c in cells)
        for c in cells:  # each cell ran in a worker of this cluster (its log is in our temp dir)
            assert list(Path(cluster.tmp).glob(f"session_*/logs/python-core-worker-*_{c['pid']}.log"))

        # Everything on loopback: no socket of ours has a non-loopback local or remote address.
        assert len(procs) >= 5 and socks
        assert any(state == "0A" for state, *_ in socks)  # listening sockets were seen
        outside = [s for s in socks if not _on_loopback(*s[:3])]
        assert outside == []
    finally:
        procs = {**procs, **_ours(cluster.proc.pid, cluster.tmp)}
        code = cluster.stop()
        deadline = time.monotonic() + 60
        while _alive(procs) and time.monotonic() < deadline:
            time.sleep(0.5)
        survivors = _alive(procs)
        late = _alive(_ours(cluster.proc.pid, cluster.tmp))  # nothing new under our temp dir
        shutil.rmtree(cluster.tmp, ignore_errors=True)
        print(f"{len(procs)} cluster processes, all gone {time.monotonic() - t0:.1f} s after the start")
    # Ray's SIGTERM handler kills the processes it started, then exits with 1.
    assert not cluster.killed and code in (0, 1, -signal.SIGTERM, 128 + signal.SIGTERM), code
    assert survivors == {} and late == {}, (survivors, late)


# ------------------------------------------------------------------------------ two nodes
def _netns_ok() -> bool:
    if NO_CLUSTER or not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    probe = f"fa{os.getpid()}probe"
    ok = subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ok


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
@pytest.mark.timeout(600)
def test_two_node_cluster_in_network_namespaces(tmp_path):
    """A head and a worker node, each in a network namespace this test creates, joined by a veth
    pair (10.213.7.1 ↔ 10.213.7.2): nothing else is reachable from them. A job submitted from the
    head's namespace runs the ray engine with actors on both nodes; then everything is stopped with
    SIGTERM and the namespaces are deleted."""
    if not _netns_ok():
        pytest.skip("needs root, the ip tool and network namespaces (ip netns)")
    tag = f"fa{os.getpid() % 100000}"
    head_ns, work_ns = f"{tag}h", f"{tag}w"
    env = {k: v for k, v in _env().items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
    env["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] = "0"
    tmp_h = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    tmp_w = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    nodes: list[subprocess.Popen] = []
    logs = []
    procs: dict[int, int] = {}
    created: list[str] = []
    try:
        for cmd in (["netns", "add", head_ns], ["netns", "add", work_ns],
                    ["link", "add", f"{tag}a", "type", "veth", "peer", "name", f"{tag}b"],
                    ["link", "set", f"{tag}a", "netns", head_ns], ["link", "set", f"{tag}b", "netns", work_ns],
                    ["-n", head_ns, "addr", "add", "10.213.7.1/24", "dev", f"{tag}a"],
                    ["-n", work_ns, "addr", "add", "10.213.7.2/24", "dev", f"{tag}b"],
                    ["-n", head_ns, "link", "set", "lo", "up"], ["-n", work_ns, "link", "set", "lo", "up"],
                    ["-n", head_ns, "link", "set", f"{tag}a", "up"], ["-n", work_ns, "link", "set", f"{tag}b", "up"],
                    # A default route lets Ray find the node's address (a UDP connect, no traffic).
                    ["-n", head_ns, "route", "add", "default", "via", "10.213.7.2"],
                    ["-n", work_ns, "route", "add", "default", "via", "10.213.7.1"]):
            subprocess.run(["ip", *cmd], check=True, capture_output=True)
            if cmd[:2] == ["netns", "add"]:
                created.append(cmd[2])

        def start(ns: str, tmp: str, args: list[str]) -> subprocess.Popen:
            log = open(Path(tmp) / "ray-start.log", "w")  # noqa: SIM115 (closed below)
            logs.append(log)
            p = subprocess.Popen(["ip", "netns", "exec", ns, str(RAY), "start", "--block", *args,
                                  f"--temp-dir={tmp}", "--object-store-memory=100000000",
                                  "--disable-usage-stats"],
                                 env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            nodes.append(p)
            return p

        start(head_ns, tmp_h, ["--head", "--node-ip-address=10.213.7.1", "--port=6379",
                               "--dashboard-host=10.213.7.1", "--dashboard-port=8265", "--num-cpus=1"])
        in_head = ["ip", "netns", "exec", head_ns]
        deadline = time.monotonic() + 240
        while subprocess.run([*in_head, sys.executable, "-c", "import urllib.request as u; "
                              "u.urlopen('http://10.213.7.1:8265/api/version', timeout=5)"],
                             capture_output=True, env=env).returncode != 0:
            assert nodes[0].poll() is None and time.monotonic() < deadline, \
                (Path(tmp_h) / "ray-start.log").read_text()[-3000:]
            time.sleep(2)
        start(work_ns, tmp_w, ["--address=10.213.7.1:6379", "--node-ip-address=10.213.7.2", "--num-cpus=2"])
        while "/3.0 CPU" not in subprocess.run([*in_head, str(RAY), "status", "--address", "10.213.7.1:6379"],
                                               capture_output=True, text=True, env=env).stdout:
            assert nodes[1].poll() is None and time.monotonic() < deadline, \
                (Path(tmp_w) / "ray-start.log").read_text()[-3000:]
            time.sleep(2)  # until the worker node has joined: 1 + 2 CPUs
        fetched = tmp_path / "fetched"
        sub = subprocess.run([*in_head, sys.executable, "-m", "simulations.submit", "--address",
                              "http://10.213.7.1:8265", "--fetch-to", str(fetched), "--", *RUN,
                              "--engine", "ray", DATA, "ray.num_workers=3"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        procs = _ours(nodes[0].pid, tmp_h) | _ours(nodes[1].pid, tmp_w)
        assert sub.returncode == 0, sub.stdout + sub.stderr
        assert "RAY_ADDRESS=10.213.7.1:6379," in sub.stdout
        _check_run_dir(fetched, "ray")

        def actors(tmp: str) -> int:
            return sum(f.read_text(errors="replace").count("Creating actor")
                       for f in Path(tmp).glob("session_*/logs/python-core-worker-*.log"))
        # 3 client actors of 1 CPU: one on the head (1 CPU), two on the worker node (2 CPUs).
        assert actors(tmp_w) >= 2 and actors(tmp_h) >= 1, (actors(tmp_h), actors(tmp_w))
    finally:
        for p, tmp in zip(nodes, (tmp_h, tmp_w), strict=False):
            procs |= _ours(p.pid, tmp)
        print(f"{len(procs)} processes on the two nodes")
        for p in reversed(nodes):  # the worker node first, then the head
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(90)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)  # our own session only
                    p.wait(30)
        for log in logs:
            log.close()
        deadline = time.monotonic() + 60
        while _alive(procs) and time.monotonic() < deadline:
            time.sleep(0.5)
        survivors = _alive(procs)
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(tmp_h, ignore_errors=True)
        shutil.rmtree(tmp_w, ignore_errors=True)
    assert survivors == {}, survivors
    assert not {head_ns, work_ns} & set(subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                        text=True).stdout.split())
