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


COMPAT = "strategies/flower_compat.py"


def private_reaches(path: Path) -> list[str]:
    """Where ``path`` reaches into an object's private fields: ``x.__dict__[...]``,
    ``x.__dict__.get(...)`` or an assignment to ``x._name`` on something other than ``self``/``cls``."""
    hits = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and node.attr == "__dict__":
            hits.append(f"{path.relative_to(ROOT)}:{node.lineno} __dict__")
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
        for t in targets:
            if (isinstance(t, ast.Attribute) and t.attr.startswith("_") and not t.attr.startswith("__")
                    and not (isinstance(t.value, ast.Name) and t.value.id in ("self", "cls"))):
                hits.append(f"{path.relative_to(ROOT)}:{t.lineno} .{t.attr} =")
    return hits


def test_only_the_compat_module_touches_flowers_private_fields() -> None:
    """Flower internals (message ids, source nodes, record fill, task identity) live in one
    module, so the flwr pin can move by editing it (issue 16)."""
    files = [p for pkg in ("strategies", "simulations") for p in sorted((ROOT / pkg).rglob("*.py"))]
    hits = [h for p in files if str(p.relative_to(ROOT)) != COMPAT for h in private_reaches(p)]
    assert not hits, hits
    assert private_reaches(ROOT / COMPAT)  # the detector sees the compat module's own writes
    supercore = {f for f, n in imported_packages("strategies").items() if "flwr" in n
                 and "flwr.supercore.task_identity" in (ROOT / f).read_text()}
    assert supercore == {COMPAT}


def imported_modules(package: str) -> dict[str, set[str]]:
    """``{file: dotted modules it imports}`` (``from a.b import c`` gives ``a.b`` and ``a.b.c``)."""
    out: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
        out[str(path.relative_to(ROOT))] = names
    return out


def test_the_run_core_imports_no_tool_study_or_benchmark() -> None:
    """``simulations.core`` (config, runner, engines, client app, results) is below the command
    lines, studies and benchmarks that use it: it imports only itself among simulations' modules."""
    mods = imported_modules("simulations/core")
    assert len(mods) >= 12  # the detector sees the core's files
    bad = {f: sorted(m for m in n if m.startswith("simulations.") and not m.startswith("simulations.core"))
           for f, n in mods.items()}
    bad = {f: m for f, m in bad.items() if m}
    assert bad == {}
    assert any("simulations.core.config" in n for n in mods.values())  # and sees its imports
