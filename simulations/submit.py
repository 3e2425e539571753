"""``python -m simulations.submit``: run a simulation as a Ray job on a cluster and fetch its results.

    python -m simulations.submit --address http://127.0.0.1:8265 -- \\
        --strategy fedavg --rounds 20 --model mlp --out runs/fedavg-cluster
    python -m simulations.submit --address http://HEAD:8265 --fetch raysubmit_XXXX   # an earlier job

Everything after ``--`` is handed to ``python -m simulations.run`` (see its ``--help``); it is
validated here first (invalid input: one line, exit 2, nothing submitted). The job:

- first checks the cluster's environment with a tiny job (same working directory, environment
  variables and placement as the run; it reports the ``python`` the job would run and the versions
  of fedagg's dependencies there): a missing or wrong dependency is one line and exit 2, before
  anything is submitted (``--no-env-check`` skips the check);
- ships the working directory (``--working-dir``, default ``.``: the repository) without
  ``.venv``, ``runs``, ``.git``, caches (``runtime_env.working_dir`` + ``excludes``); the cluster's
  ``python`` must have fedagg's dependencies installed (start ``ray`` from that environment);
- runs ``python -m simulations.job -- <run args>``, which adds ``--ray-address auto`` (the job's own
  cluster), ``--out runs/<submission id>`` unless the run sets one, and ``--no-progress``, runs the
  simulation, and prints the packed run directory in the job's log (see :mod:`simulations.job`);
- gets the environment variables that keep a loopback cluster on 127.0.0.1
  (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) and quiet (``RAY_USAGE_STATS_ENABLED=0``), plus ``--env``.

``submit`` follows the job's log (``--quiet``: not), waits for it to finish, then unpacks the run
directory from the log into ``--fetch-to`` (default: the run's ``--out`` when relative, else
``runs/<its name>``). Exit code: 0 succeeded and fetched; 1 the job failed or was stopped (its last
log lines are printed), could not be reached, timed out, or its run directory could not be fetched;
2 invalid input or a cluster environment without fedagg's dependencies; 130 interrupted (the job is
stopped).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import re
import secrets
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedagg.errors import ConfigError
from simulations.cli import Parser
from simulations.job import LINE, FetchError, extract_archive, resolve_run_args, unpack_dir

#: Never shipped with the working directory (besides what .gitignore files exclude).
EXCLUDES = [".venv", "venv", ".git", "runs", "__pycache__", "*.pyc", "*.egg-info", ".pytest_cache",
            ".ruff_cache", ".hypothesis", ".mypy_cache", "build", "dist", ".cache"]
#: Environment of the job driver (and of everything it starts).
JOB_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "RAY_DEDUP_LOGS": "0", "HF_HUB_OFFLINE": "1"}
TERMINAL_OK = "SUCCEEDED"
#: Marker of the environment check's one report line in its job log.
ENV_MARK = "FEDAGG-ENV"
#: Seconds the environment check may take (it waits like any job for a place to run).
ENV_CHECK_TIMEOUT = 300.0
#: What the environment check runs on the cluster: one line (Ray echoes the entrypoint in the
#: log), stdlib only (it must run where nothing is installed). ``{dists}``: a JSON list of names.
_ENV_PROBE = (
    "import importlib.metadata as m, json, re, sys; "
    "key = lambda name: re.sub(r'[-_.]+', '-', (name or '').lower()); "
    "have = {key(d.metadata['Name']): d.version for d in m.distributions()}; "
    "print('" + ENV_MARK + " ' + json.dumps({'python': sys.executable, 'version': sys.version.split()[0], "
    "'dists': {d: have.get(key(d)) for d in json.loads('{dists}')}}))"
)
#: Lines of a job log that Ray writes itself (not the entrypoint's output).
_RAY_LINE = re.compile(r"^(\d{4}-\d\d-\d\d [\d:,]+\s+[A-Z]+ |Running entrypoint for job )")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m simulations.submit", description=__doc__,
               usage="python -m simulations.submit --address URL [options] -- <simulations.run args>",
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", required=True,
                   help="the cluster's job API (dashboard), e.g. http://127.0.0.1:8265")
    p.add_argument("--fetch", metavar="SUBMISSION_ID", default=None,
                   help="submit nothing: wait for this job (run with `python -m simulations.job`) "
                   "and fetch its run directory")
    p.add_argument("--fetch-to", metavar="DIR", default=None,
                   help="where the run directory goes (default: the run's --out when relative, "
                   "else runs/<its name>)")
    p.add_argument("--no-fetch", action="store_true", help="do not fetch (e.g. --out on a shared filesystem)")
    p.add_argument("--no-wait", action="store_true", help="print the submission id and return at once")
    p.add_argument("--timeout", type=float, default=None, help="give up waiting after this many seconds "
                   "(the job keeps running)")
    p.add_argument("--quiet", action="store_true", help="do not print the job's log while waiting")
    p.add_argument("--verbose", action="store_true", help="show Ray's client-side logs (upload etc.)")
    p.add_argument("--working-dir", default=".", help="directory shipped to the cluster (default .)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="more paths/patterns to leave out of the upload (repeatable)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the job (repeatable)")
    p.add_argument("--entrypoint-num-cpus", type=float, default=None, help="CPUs reserved for the job driver")
    p.add_argument("--entrypoint-num-gpus", type=float, default=None, help="GPUs reserved for the job driver")
    p.add_argument("--entrypoint-resources", default=None, metavar="JSON",
                   help='custom resources for the job driver, e.g. \'{"slow_worker": 1}\'')
    p.add_argument("--submission-id", default=None, help="job id (default fedagg-<strategy>-<time>-<hex>)")
    p.add_argument("--max-fetch-mb", type=float, default=32.0,
                   help="cap on the packed run directory sent back through the job log (default 32)")
    p.add_argument("--no-env-check", action="store_true",
                   help="submit without first checking that the cluster's python has fedagg's dependencies")
    return p


def _split(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    argv = list(argv)
    if "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1:]
    return argv, []


def _env(pairs: Sequence[str]) -> dict[str, str]:
    env = dict(JOB_ENV)
    for text in pairs:
        if "=" not in text:
            raise ConfigError("env", f"expected KEY=VALUE, got {text!r}")
        key, value = text.split("=", 1)
        env[key] = value
    return env


def _resources(text: str | None) -> dict[str, float] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict) or not all(isinstance(v, (int, float)) for v in value.values()):
        raise ConfigError("entrypoint_resources", f"expected a JSON mapping of names to numbers, got {text!r}")
    return {str(k): float(v) for k, v in value.items()}


def fetch_target(run_dir: Path, fetch_to: str | None) -> Path:
    """Local directory for the run: ``fetch_to``, the run's own relative path, or ``runs/<name>``."""
    if fetch_to is not None:
        return Path(fetch_to)
    return run_dir if not run_dir.is_absolute() else Path("runs") / run_dir.name


def _client(address: str, verbose: bool = False) -> Any:
    import logging

    from ray.job_submission import JobSubmissionClient

    if not verbose:  # Ray logs every file it leaves out of the upload
        for name in [n for n in logging.root.manager.loggerDict if n.startswith("ray")]:
            logging.getLogger(name).setLevel(logging.ERROR)

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # ConnectionError, or RuntimeError from a non-Ray HTTP server
        raise ConnectionError(f"cannot reach the Ray job API at {address}: {exc}".splitlines()[0]) from None


def _visible(text: str) -> str:
    """The job log without the packed run directory."""
    return "".join(line for line in text.splitlines(keepends=True) if not line.startswith(LINE))


def wait(client: Any, job_id: str, *, timeout: float | None, follow: bool, poll: float = 1.0) -> str:
    """Wait until the job ends (or ``timeout``); print new log text when ``follow``; return status."""
    from ray.job_submission import JobStatus

    t0 = time.monotonic()
    shown = 0
    while True:
        status = client.get_job_status(job_id)
        if follow:
            logs = client.get_job_logs(job_id)
            end = logs.rfind("\n") + 1
            if end > shown:
                sys.stdout.write(_visible(logs[shown:end]))
                sys.stdout.flush()
                shown = end
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return str(status.value)
        if timeout is not None and time.monotonic() - t0 > timeout:
            return "TIMEOUT"
        time.sleep(poll)


def _tail(client: Any, job_id: str, n: int = 20) -> str:
    try:
        lines = _visible(client.get_job_logs(job_id)).splitlines()
    except Exception:  # the log is a courtesy; the status already says it failed
        return ""
    return "\n".join(lines[-n:])


def _job_spec(args: argparse.Namespace, env: dict[str, str],
              resources: dict[str, float] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(runtime_env, placement keyword arguments) shared by the run's job and the environment check."""
    runtime_env = {"working_dir": str(args.working_dir), "excludes": [*EXCLUDES, *args.exclude],
                   "env_vars": env}
    kwargs: dict[str, Any] = {}
    if args.entrypoint_num_cpus is not None:
        kwargs["entrypoint_num_cpus"] = args.entrypoint_num_cpus
    if args.entrypoint_num_gpus is not None:
        kwargs["entrypoint_num_gpus"] = args.entrypoint_num_gpus
    if resources:
        kwargs["entrypoint_resources"] = resources
    return runtime_env, kwargs


def _submit(client: Any, args: argparse.Namespace, entry_args: list[str], job_id: str,
            env: dict[str, str], resources: dict[str, float] | None) -> str:
    import shlex

    max_bytes = int(args.max_fetch_mb * 2**20)
    entrypoint = f"python -m simulations.job --max-bytes {max_bytes} -- {shlex.join(entry_args)}"
    runtime_env, kwargs = _job_spec(args, env, resources)
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                               submission_id=job_id, **kwargs)
    print(f"submitted {job_id} to {args.address}: {entrypoint}", flush=True)
    return str(job_id)


# ------------------------------------------------------------------------------ environment check
def required_distributions() -> dict[str, str]:
    """{distribution: version specifier} of fedagg's runtime dependencies, from its installed
    metadata (extras left out); ``flwr``, ``ray``, ``torch`` when fedagg is not installed."""
    from importlib import metadata

    from packaging.requirements import Requirement

    try:
        texts = metadata.requires("fedagg") or []
    except metadata.PackageNotFoundError:
        texts = []
    out: dict[str, str] = {}
    for text in texts:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            out[req.name] = str(req.specifier)
    return out or {"flwr": "", "ray": "", "torch": ""}


def env_probe_entrypoint(dists: Sequence[str]) -> str:
    """The shell command of the environment check: the job's ``python`` prints one
    ``FEDAGG-ENV {json}`` line (its path, version and the version of each of ``dists``, null if
    missing)."""
    import shlex

    return shlex.join(["python", "-c", _ENV_PROBE.replace("{dists}", json.dumps(list(dists)))])


def parse_env_report(log: str) -> dict[str, Any] | None:
    """The environment check's report from its job log (None if the log holds none)."""
    for line in log.splitlines():
        if line.startswith(ENV_MARK + " "):
            try:
                report = json.loads(line[len(ENV_MARK) + 1:])
            except json.JSONDecodeError:
                return None
            return report if isinstance(report, dict) and isinstance(report.get("dists"), dict) else None
    return None


def env_problems(report: dict[str, Any], required: dict[str, str]) -> list[str]:
    """Dependencies the reported environment lacks or has in a version outside the specifier,
    e.g. ``["flwr", "torch 2.1.0 (needs >=2.2)"]``."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion

    problems = []
    for name, spec in required.items():
        version = report["dists"].get(name)
        if version is None:
            problems.append(name)
            continue
        try:
            ok = SpecifierSet(spec).contains(version, prereleases=True)
        except InvalidVersion:
            ok = True  # an unparsable local version: not ours to judge
        if not ok:
            problems.append(f"{name} {version} (needs {spec})")
    return problems


_ENV_FIX = ("start the Ray head from fedagg's environment (`source .venv/bin/activate` before "
            "`ray start`) or install fedagg's dependencies into the cluster's python "
            "(`pip install -e .`); --no-env-check submits anyway")


def check_cluster_env(client: Any, runtime_env: dict[str, Any], placement: dict[str, Any],
                      probe_id: str, *, timeout: float = ENV_CHECK_TIMEOUT) -> dict[str, Any]:
    """Run the environment check as a job with the run's ``runtime_env`` and ``placement``; return
    its report. Raises ConfigError (field ``cluster``) when the job's python lacks a dependency or
    cannot run, ConnectionError when the check does not finish within ``timeout`` seconds (the
    check job is then stopped, as on Ctrl-C; a finished one stays in the job list as a record:
    Ray marks a job deleted right after it ended as FAILED)."""
    required = required_distributions()
    client.submit_job(entrypoint=env_probe_entrypoint(sorted(required)), runtime_env=runtime_env,
                      submission_id=probe_id, **placement)
    try:
        status = wait(client, probe_id, timeout=timeout, follow=False, poll=0.5)
    except KeyboardInterrupt:
        client.stop_job(probe_id)
        raise
    if status == "TIMEOUT":
        client.stop_job(probe_id)
        raise ConnectionError(f"the cluster environment check (job {probe_id}) did not finish in "
                              f"{timeout:.0f} s; --no-env-check skips it")
    log = client.get_job_logs(probe_id)
    report = parse_env_report(log)
    if report is None:
        lines = [ln.strip() for ln in _visible(log).splitlines() if ln.strip() and not _RAY_LINE.match(ln)]
        why = lines[-1] if lines else f"job {status}"
        raise ConfigError("cluster", f"the job's `python` could not run the environment check "
                          f"({why}): {_ENV_FIX}")
    problems = env_problems(report, required)
    if problems:
        listed = ", ".join(problems[:4]) + (f" and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise ConfigError("cluster", f"the job's python ({report.get('python')}, Python "
                          f"{report.get('version')}) lacks {listed}: {_ENV_FIX}")
    return report


def describe_env(report: dict[str, Any], names: Sequence[str] = ("flwr", "ray", "torch")) -> str:
    """One line: the cluster's python and the versions of ``names``."""
    dists = report.get("dists", {})
    versions = ", ".join(f"{n} {dists[n]}" for n in names if dists.get(n))
    return f"{report.get('python')} (Python {report.get('version')}), {versions}"


def main(argv: Sequence[str] | None = None) -> int:
    own, run_args = _split(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(own)
    if (args.fetch is None) == (not run_args):
        print("error: give the run's arguments after `--`, or --fetch SUBMISSION_ID (not both)",
              file=sys.stderr)
        return 2
    dest: Path | None = None
    try:
        env = _env(args.env)
        resources = _resources(args.entrypoint_resources)
        if not Path(args.working_dir).is_dir():
            raise ConfigError("working_dir", f"{args.working_dir} is not a directory")
        job_id = args.fetch
        entry_args = list(run_args)
        if job_id is None:  # validate locally, name the job and its run directory
            run = resolve_run_args(run_args, base_dir=args.working_dir, default_out="runs/-")
            for line in run.warnings:
                print(f"warning: {line}", file=sys.stderr)
            stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            job_id = args.submission_id or f"fedagg-{run.strategy}-{stamp}-{secrets.token_hex(2)}"
            run_dir = run.run_dir
            if not run.out_given:
                run_dir = Path("runs") / job_id
                entry_args += ["--out", str(run_dir)]
            dest = fetch_target(run_dir, args.fetch_to)
            if not (args.no_fetch or args.no_wait) and (dest / "summary.json").exists():
                raise ConfigError("fetch_to", f"{dest} already holds a finished run; choose --fetch-to")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        client = _client(args.address, args.verbose)
        if args.fetch is None:
            if not args.no_env_check:
                runtime_env, placement = _job_spec(args, env, resources)
                try:
                    report = check_cluster_env(client, runtime_env, placement, f"{job_id}-envcheck")
                except KeyboardInterrupt:
                    print("\ninterrupted: nothing submitted", file=sys.stderr)
                    return 130
                print(f"cluster environment: {describe_env(report)}", flush=True)
            job_id = _submit(client, args, entry_args, job_id, env, resources)
            if args.no_wait:
                print(f"fetch later: python -m simulations.submit --address {args.address} --fetch {job_id}")
                return 0
        try:
            status = wait(client, job_id, timeout=args.timeout, follow=not args.quiet)
        except KeyboardInterrupt:
            client.stop_job(job_id)
            print(f"\ninterrupted: stopped job {job_id}", file=sys.stderr)
            return 130
        if status == "TIMEOUT":
            print(f"error: job {job_id} still running after {args.timeout:.0f} s (it keeps running; "
                  f"`ray job stop --address {args.address} {job_id}` stops it)", file=sys.stderr)
            return 1
        if status != TERMINAL_OK:
            info = client.get_job_info(job_id)
            reason = (info.message or "").split(", last available logs")[0].splitlines()
            print(f"error: job {job_id} {status}: {reason[0] if reason else ''}".rstrip(), file=sys.stderr)
            tail = _tail(client, job_id)
            if tail:
                print("last lines of its log:\n" + tail, file=sys.stderr)
            return 1
        if args.no_fetch:
            print(f"job {job_id} succeeded (not fetched)")
            return 0
        head, data = extract_archive(client.get_job_logs(job_id))
        if dest is None:  # --fetch: the run directory's name comes with the archive
            dest = fetch_target(Path(head["path"]), args.fetch_to)
            if (dest / "summary.json").exists():
                raise ConfigError("fetch_to", f"{dest} already holds a finished run; choose --fetch-to")
        n = len(unpack_dir(data, dest))
        print(f"job {job_id} succeeded; fetched {n} files → {dest}")
        return 0
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ConnectionError, FetchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:  # the job API answered with an error (e.g. an unknown job id)
        print(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
