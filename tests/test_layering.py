"""The layers stay layered, and the numpy-only aggregators do not load torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_packages(package: str) -> dict[str, set[str]]:
    """``{file: top-level packages it imports}`` for every module of ``package`` (any import
    statement, also inside functions)."""
    out: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        out[str(path.relative_to(ROOT))] = names
    return out


def test_fedagg_imports_neither_strategies_nor_simulations() -> None:
    bad = {f: sorted(n & {"strategies", "simulations", "flwr", "ray"})
           for f, n in imported_packages("fedagg").items() if n & {"strategies", "simulations", "flwr", "ray"}}
    assert bad == {}


def test_import_fedagg_aggregators_does_not_load_torch() -> None:
    code = "import sys, fedagg.aggregators as a; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_strategies_do_not_import_simulations() -> None:
    bad = {f: "simulations" for f, n in imported_packages("strategies").items() if "simulations" in n}
    assert bad == {}
