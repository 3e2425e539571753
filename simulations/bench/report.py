"""Keep one section per benchmark in ``docs/benchmarks.md`` (between HTML-comment markers)."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

from simulations.results import atomic_write_text

DEFAULT_DOC = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n\nEvery section below is written by `python -m simulations.bench NAME` from a run on the machine it names.\n"


def machine() -> str:
    """One line describing this machine (CPU count, platform, Python, torch)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            names = [ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{os.cpu_count()} CPU cores ({cpu}), {gpu}, Python {platform.python_version()}, "
            f"torch {torch.__version__}, {platform.system()} {platform.release()}")


def write_section(name: str, markdown: str, doc: str | Path = DEFAULT_DOC) -> Path:
    """Replace (or append) the ``name`` section of ``doc`` with ``markdown``."""
    path = Path(doc)
    text = path.read_text() if path.exists() else HEADER
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{markdown.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    atomic_write_text(path, text)
    return path
