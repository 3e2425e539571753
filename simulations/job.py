"""``python -m simulations.job -- <run args>``: the entrypoint of a run submitted as a Ray job.

It is what :mod:`simulations.submit` asks the cluster to execute, and what you give to a plain
``ray job submit`` when you want to fetch the results afterwards::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m simulations.job -- --strategy fedavg --rounds 3 --out runs/demo
    python -m simulations.submit --address http://127.0.0.1:8265 --fetch <submission id>

What it does, on the cluster:

1. resolves the run's config exactly as ``python -m simulations.run`` would (invalid input: exit 2),
   adds ``--out runs/<strategy>-<timestamp>`` when no run directory is set (so it is known before the
   run starts), ``--ray-address auto`` when the config names no cluster (inside a job ``auto`` is the
   job's own cluster: Ray sets ``RAY_ADDRESS`` for the job driver) and ``--no-progress``;
2. runs the simulation in this process (``simulations.run.main``);
3. on success, packs the run directory into a ``.tar.gz`` (in memory) and prints it base64-encoded
   in the job's log, one ``FEDAGG-RUNDIR <chunk>`` line each, between a
   ``FEDAGG-RUNDIR-BEGIN {json}`` line (file name, size, SHA-256) and ``FEDAGG-RUNDIR-END``. The job
   log is the one thing the HTTP job API (``JobSubmissionClient.get_job_logs``) can always hand back,
   so the results come home without a shared filesystem or SSH. The archive is capped at
   ``--max-bytes`` (default 32 MiB, about 43 MiB of log); a larger run directory is not printed (a
   ``FEDAGG-RUNDIR-TOOBIG`` line says where it is on the cluster): write it to a shared filesystem
   instead (``--out /shared/...``) and skip fetching (``simulations.submit --no-fetch``).

Exit code: the run's (0 done, 1 run error, 2 invalid input).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime as _dt
import hashlib
import io
import json
import os
import shlex
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedagg.errors import ConfigError
from simulations.cli import Parser

BEGIN = "FEDAGG-RUNDIR-BEGIN"
LINE = "FEDAGG-RUNDIR"
END = "FEDAGG-RUNDIR-END"
TOOBIG = "FEDAGG-RUNDIR-TOOBIG"
#: Default cap on the packed run directory (bytes of .tar.gz, before base64).
MAX_BYTES = 32 * 2**20
_CHUNK = 4096


@dataclasses.dataclass
class ResolvedRun:
    """What a job will run: ``argv`` for ``simulations.run``, its ``run_dir``, its ``strategy``,
    whether the user set the run directory (``out_given``), and the config's ``warnings``
    (:func:`simulations.core.config.config_warnings`)."""

    argv: list[str]
    run_dir: Path
    strategy: str
    out_given: bool
    warnings: list[str] = dataclasses.field(default_factory=list)


def resolve_run_args(run_args: Sequence[str], *, default_out: str | None = None,
                     base_dir: str | Path | None = None) -> ResolvedRun:
    """The ``simulations.run`` arguments a job runs, and its run directory.

    Adds ``--out`` (``default_out``, else ``runs/<strategy>-<timestamp>``) when neither the flags,
    the ``key=value`` overrides nor the ``--config`` file set one, ``--ray-address auto`` when the
    config names no cluster, and ``--no-progress``. ``base_dir`` resolves a relative ``--config``
    (the submitting side validates against its working directory). Raises ``ConfigError`` for
    invalid input, exactly as the run would.
    """
    from simulations.core.config import config_warnings, load_config
    from simulations.run import build_parser, collect_overrides, resume_config

    argv = list(run_args)
    ns = build_parser().parse_args(argv)  # exits 2 with one line on a bad flag
    if ns.config and base_dir is not None and not Path(ns.config).is_absolute():
        ns.config = str(Path(base_dir) / ns.config)
    if ns.resume:  # the run's own directory (on a shared filesystem, or the same working dir)
        run_dir = Path(ns.resume)
        if base_dir is not None and not run_dir.is_absolute():
            ns.resume = str(Path(base_dir) / run_dir)
        cfg = resume_config(ns)
        extra = [] if "--no-progress" in argv else ["--no-progress"]
        return ResolvedRun([*argv, *extra], run_dir, cfg.strategy, True)
    cfg = load_config(ns.config, collect_overrides(ns))
    out_given = cfg.out is not None
    if cfg.out is None:
        if default_out is None:
            stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            default_out = f"runs/{cfg.strategy}-{stamp}"
        argv += ["--out", default_out]
        run_dir = Path(default_out)
    else:
        run_dir = Path(cfg.out)
    if cfg.ray.address is None:
        argv += ["--ray-address", "auto"]
    if "--no-progress" not in argv:
        argv.append("--no-progress")
    return ResolvedRun(argv, run_dir, cfg.strategy, out_given, config_warnings(cfg))


# ------------------------------------------------------------------------------ packing
def pack_dir(run_dir: str | Path) -> bytes:
    """``run_dir`` as ``.tar.gz`` bytes; members are relative to ``run_dir`` (no leading dir)."""
    root = Path(run_dir)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.is_symlink() and not path.name.endswith(".tmp"):
                tar.add(path, arcname=path.relative_to(root).as_posix(), recursive=False)
    return buf.getvalue()


def emit_archive(run_dir: str | Path, data: bytes, out: Any = None, max_bytes: int = MAX_BYTES) -> bool:
    """Print ``data`` (a packed run directory) between markers; False when it exceeds ``max_bytes``."""
    out = out or sys.stdout
    where = str(Path(run_dir).resolve())
    if len(data) > max_bytes:
        print(f"{TOOBIG} {json.dumps({'bytes': len(data), 'max_bytes': max_bytes, 'path': where})}",
              file=out, flush=True)
        return False
    head = {"name": Path(run_dir).name, "path": where, "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}
    text = base64.b64encode(data).decode()
    lines = [f"{BEGIN} {json.dumps(head)}"]
    lines += [f"{LINE} {text[i:i + _CHUNK]}" for i in range(0, len(text), _CHUNK)]
    lines.append(END)
    out.write("\n".join(lines) + "\n")
    out.flush()
    return True


class FetchError(RuntimeError):
    """The job log holds no (intact) run directory; the message says why."""


def extract_archive(log: str) -> tuple[dict[str, Any], bytes]:
    """``(header, .tar.gz bytes)`` of the last run directory printed in a job ``log``.

    Lines that are not ours (Ray's or the run's own output) may be interleaved; the archive is
    checked against its size and SHA-256.
    """
    head: dict[str, Any] | None = None
    chunks: list[str] = []
    done = False
    toobig: dict[str, Any] | None = None
    for line in log.splitlines():
        if line.startswith(BEGIN + " "):
            head, chunks, done = json.loads(line[len(BEGIN) + 1:]), [], False
        elif line.startswith(TOOBIG + " "):
            toobig = json.loads(line[len(TOOBIG) + 1:])
        elif line.strip() == END and head is not None:
            done = True
        elif line.startswith(LINE + " ") and head is not None and not done:
            chunks.append(line[len(LINE) + 1:].strip())
    if head is None or not done:
        if toobig is not None:
            raise FetchError(f"the run directory is {toobig['bytes']} bytes packed, over the "
                             f"{toobig['max_bytes']}-byte cap; it stays on the cluster at "
                             f"{toobig['path']} (use a shared filesystem --out, or --max-fetch-mb)")
        raise FetchError("the job log holds no complete run directory (was it run with "
                         "`python -m simulations.job`?)")
    data = base64.b64decode("".join(chunks))
    if len(data) != head["bytes"] or hashlib.sha256(data).hexdigest() != head["sha256"]:
        raise FetchError("the run directory in the job log is damaged (size or SHA-256 mismatch)")
    return head, data


def unpack_dir(data: bytes, dest: str | Path) -> list[Path]:
    """Extract a :func:`pack_dir` archive into ``dest`` (regular files only, no path escapes)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    written = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        for m in members:
            target = (root / m.name).resolve()
            if root not in target.parents:
                raise FetchError(f"refusing archive member outside the run directory: {m.name}")
        # summary.json last: its presence marks a finished run (simulations.core.results).
        members.sort(key=lambda m: m.name == "summary.json")
        from fedagg.io import atomic_write_bytes

        for m in members:
            fh = tar.extractfile(m)
            assert fh is not None
            atomic_write_bytes(root / m.name, fh.read())
            written.append(root / m.name)
    return written


# ------------------------------------------------------------------------------ CLI
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        cut = argv.index("--")
        own, run_args = argv[:cut], argv[cut + 1:]
    elif argv[:1] in (["-h"], ["--help"]):
        own, run_args = argv, []
    else:
        own, run_args = [], argv
    parser = Parser(prog="python -m simulations.job", description=__doc__,
                    usage="python -m simulations.job [options] -- <simulations.run args>",
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-bytes", type=int, default=MAX_BYTES,
                        help=f"cap on the packed run directory printed to the log (default {MAX_BYTES})")
    parser.add_argument("--default-out", default=None, help="run directory when the run sets none")
    args = parser.parse_args(own)
    try:
        run = resolve_run_args(run_args, default_out=args.default_out)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import simulations

    print(f"fedagg job: code {Path(simulations.__file__).parent}, RAY_ADDRESS="
          f"{os.environ.get('RAY_ADDRESS', '')}, run directory {run.run_dir.resolve()}", flush=True)
    print("fedagg job: python -m simulations.run " + shlex.join(run.argv), flush=True)
    from simulations.run import main as run_main

    rc = run_main(run.argv)
    sys.stdout.flush()
    if rc != 0:
        return rc
    emit_archive(run.run_dir, pack_dir(run.run_dir), max_bytes=args.max_bytes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
