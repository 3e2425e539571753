"""The benchmarks page ``docs/benchmarks.md`` (one section per benchmark, between
``<!-- bench:NAME -->`` markers, written with :func:`simulations.report.write_section`) and the
machine line every benchmark records."""

from __future__ import annotations

import os
import platform
from pathlib import Path

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
