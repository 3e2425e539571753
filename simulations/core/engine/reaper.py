"""Clean-up of a local Ray instance whose driver ended without shutting it down.

A local Ray instance (``ray.init()`` without an address) fate-shares with its driver: after
``kill -9`` of the driver, or a Ctrl-C while ``ray.init`` is still starting, the GCS, raylet and
workers die at once, but Ray's dashboard and runtime-env agents (children of the raylet) first try
to report the raylet's death to the dead GCS and stay about 60 s (a fixed timeout in Ray's
``publish_error_to_driver``).

:func:`reaped` starts a small watchdog process in its own session (so a terminal's Ctrl-C does not
reach it), tied to this process by a pipe. Every half second it records the children this process
has started since the block began, and their descendants (pid and start time: a reused pid is never
mistaken for one of them; children from before the block are left alone). If the block ends
normally, the watchdog exits. If this process dies (the pipe closes) or the block ends with an
exception, it kills (SIGKILL) every recorded descendant that is still alive, and their children.
Processes started in the last half second before a ``kill -9`` may be missed (they then linger as
before). Linux only (``/proc``); elsewhere the block runs unwatched. The agents rename themselves
(``ray::DashboardAgent``) and overwrite their environment block, so neither the command line nor
the environment can identify them after the fact: the process tree recorded while the driver
lives is what does.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

#: Seconds between two records of the driver's descendants.
POLL_SECONDS = 0.5

#: The watchdog (stdlib only). argv: driver pid, poll seconds, then ``pid:start`` of the driver's
#: children from before the block (left alone). stdin: ``done`` = exit quietly; end of file = kill
#: the recorded descendants.
_WATCHDOG = r"""
import os, select, signal, sys, time
driver, poll = int(sys.argv[1]), float(sys.argv[2])
before = {tuple(int(x) for x in arg.split(":")) for arg in sys.argv[3:]}
me = os.getpid()

def table():
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat", "rb") as f:
                    text = f.read()
            except OSError:
                continue
            fields = text[text.rindex(b")") + 2:].split()
            if fields[0] != b"Z":
                out[int(d)] = (int(fields[1]), int(fields[19]))  # ppid, start time
    return out

def grow(known, procs):
    # The driver's children started since the watchdog (not those it had before), and theirs.
    children = {}
    for p, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(p)
    todo = [c for c in children.get(driver, []) if c != me and (c, procs[c][1]) not in before]
    todo += [p for p, start in known.items() if procs.get(p, (0, -1))[1] == start]
    for p in todo:
        known.setdefault(p, procs[p][1])
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in known:
                known[c] = procs[c][1]
                todo.append(c)

known = {}
while True:
    grow(known, table())
    if select.select([0], [], [], poll)[0]:
        data = os.read(0, 16)
        if data.startswith(b"done"):
            sys.exit(0)
        if not data:
            break
for _ in range(4):  # a dying parent may still start a child: look again briefly
    procs = table()
    grow(known, procs)
    for pid, start in known.items():
        if procs.get(pid, (0, -1))[1] == start:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    time.sleep(0.25)
"""


def supported() -> bool:
    """Whether the process tree can be read here (Linux ``/proc``)."""
    return sys.platform.startswith("linux") and Path(f"/proc/{os.getpid()}/stat").exists()


def proc_stat(pid: int) -> tuple[int, int, int] | None:
    """(parent pid, session id, start time in clock ticks) of ``pid``; None once it has exited
    (a zombie included)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = text[text.rindex(b")") + 2:].split()
    return None if fields[0] == b"Z" else (int(fields[1]), int(fields[3]), int(fields[19]))


def process_table() -> dict[int, tuple[int, int, int]]:
    """{pid: :func:`proc_stat`} of every live process."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := proc_stat(int(entry))) is not None:
            table[int(entry)] = stat
    return table


def still_running(pid: int, start: int) -> bool:
    """Whether ``pid`` is still the live process that started at ``start`` (clock ticks): a
    reused pid is not."""
    stat = proc_stat(pid)
    return stat is not None and stat[2] == start


def children(pid: int) -> dict[int, int]:
    """{pid: start time in clock ticks} of the live children of ``pid``."""
    return {p: start for p, (ppid, _, start) in process_table().items() if ppid == pid}


@contextlib.contextmanager
def reaped() -> Iterator[int | None]:
    """Run the block under a watchdog (its pid is yielded; None where unsupported) that kills the
    processes this one started during the block if this process dies before the block ends, or
    if the block raises (see the module docstring)."""
    if not supported():
        yield None
        return
    before = [f"{pid}:{start}" for pid, start in children(os.getpid()).items()]
    watchdog = subprocess.Popen(
        [sys.executable, "-S", "-c", _WATCHDOG, str(os.getpid()), str(POLL_SECONDS), *before],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    assert watchdog.stdin is not None
    clean = False
    try:
        yield watchdog.pid
        clean = True
    finally:
        with contextlib.suppress(OSError):
            if clean:
                watchdog.stdin.write(b"done")
            watchdog.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            watchdog.wait(10 if clean else 5)
