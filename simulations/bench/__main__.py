"""``python -m simulations.bench NAME [--no-write]``: run a benchmark and record it in docs/benchmarks.md."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from collections.abc import Sequence
from pathlib import Path

import simulations.bench as pkg
from simulations.bench.report import DEFAULT_DOC, HEADER
from simulations.cli import Parser
from simulations.report import write_section

_NOT_BENCHES = {"report", "__main__"}


def bench_names() -> list[str]:
    """Benchmark modules available under ``simulations/bench``."""
    return sorted(m.name for m in pkgutil.iter_modules([str(Path(pkg.__file__).parent)])
                  if m.name not in _NOT_BENCHES and not m.name.startswith("_"))


def main(argv: Sequence[str] | None = None) -> int:
    names = bench_names()
    parser = Parser(prog="python -m simulations.bench", description=__doc__)
    parser.add_argument("name", choices=names, help="benchmark to run")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--doc", default=str(DEFAULT_DOC), help="markdown file to update")
    args = parser.parse_args(argv)
    module = importlib.import_module(f"simulations.bench.{args.name}")
    markdown = module.run()
    if not args.no_write:
        path = write_section(args.doc, markdown.strip(), f"bench:{args.name}", empty=HEADER)
        print(f"recorded in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
