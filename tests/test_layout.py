"""The layout's direction rules (docs/architecture.md), read from the imports of every module.

    model   <- numpy and reference.errors only
    asl     <- model                                   (the method)
    io      <- model                                   (file formats; io and asl never import each other)
    oracle  <- model, asl, io                          (traces, the checker, goldens)
    eval    <- model, asl, io, and the oracle's trace  (tasks, runner, report)
    cli     <- everything; the only reference module that imports gpu
    gpu     <- model, asl, io; never oracle, eval or cli (gpu.selfcheck, the device check, is a tool like the CLI)

No cycles between modules; no project import inside a function (except the CLI's of gpu, which keeps the reference
free of the port); no library module reads the tests' folder. The rules are checked on source text, so a planted
wrong-way import fails them (tested below).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ERRORS = "reference.errors"
ALLOWED = {  # layer -> the layers it may import
    "reference.errors": set(),
    "reference.model": {"reference.model"},
    "reference.asl": {"reference.model", "reference.asl"},
    "reference.io": {"reference.model", "reference.io"},
    "reference.oracle": {"reference.model", "reference.asl", "reference.io", "reference.oracle"},
    "reference.eval": {"reference.model", "reference.asl", "reference.io", "reference.eval", "reference.oracle.trace"},
    "reference.cli": {"reference", "gpu"},
    "reference": {"reference"},  # reference/__init__.py, __main__.py
    "gpu": {"reference.model", "reference.asl", "reference.io", "gpu"},
    "gpu.selfcheck": {"reference", "gpu"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    """The most specific key of ALLOWED that names the module or a package above it."""
    candidates = [k for k in ALLOWED if module == k or module.startswith(k + ".")]
    return max(candidates, key=len)


def project_imports(source: str) -> list[tuple[str, bool, int]]:
    """(imported project module, inside a function, line) for every import of reference or gpu."""
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                names = [child.module] + [f"{child.module}.{a.name}" for a in child.names]
            for name in names:
                if name.split(".")[0] in ("reference", "gpu"):
                    found.append((name, inner, child.lineno))
            visit(child, inner)

    visit(ast.parse(source), False)
    return found


def allowed(importer: str, imported: str) -> bool:
    if imported == ERRORS or imported.startswith(ERRORS + "."):
        return True
    targets = ALLOWED[layer(importer)]
    return any(imported == t or imported.startswith(t + ".") or t.startswith(imported + ".") for t in targets)


def violations(importer: str, source: str) -> list[str]:
    bad = []
    for imported, in_function, line in project_imports(source):
        base = imported if imported.count(".") < 2 or not imported.rsplit(".", 1)[1][:1].isupper() else \
            imported.rsplit(".", 1)[0]
        if not allowed(importer, base):
            bad.append(f"{importer}:{line} imports {base} ({layer(importer)} may import {sorted(ALLOWED[layer(importer)])})")
        if in_function and not (importer == "reference.cli" and base.startswith("gpu")):
            bad.append(f"{importer}:{line} imports {base} inside a function (only the CLI's gpu imports may)")
    return bad


def modules() -> dict[str, Path]:
    files = [p for d in ("reference", "gpu") for p in (ROOT / d).rglob("*.py")]
    return {module_name(p): p for p in files}


def test_every_module_imports_only_in_the_allowed_direction():
    bad = [v for name, path in modules().items() for v in violations(name, path.read_text())]
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    mods = modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for imported, in_function, _ in project_imports(path.read_text()):
            target = imported if imported in mods else imported.rsplit(".", 1)[0]
            if target in mods and target != name and not in_function:
                deps.add(target)
        graph[name] = deps
    state, cycle = {}, []

    def visit(node, stack):
        state[node] = "open"
        for dep in graph[node]:
            if state.get(dep) == "open":
                cycle.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [node])
    assert not cycle, f"import cycle: {' -> '.join(cycle[0])}"


def paths_to_tests(source: str) -> list[str]:
    """String constants that are paths into tests/ (not prose that mentions it)."""
    return [n.value for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and (n.value == "tests" or n.value.startswith("tests/") and " " not in n.value)]


def test_no_library_module_reads_the_tests_folder():
    readers = [name for name, path in modules().items() if name != "gpu.selfcheck" and paths_to_tests(path.read_text())]
    assert not readers, readers


@pytest.mark.parametrize("importer, source", [
    ("reference.model.transformer", "from reference.asl.methods import run_prefill\n"),
    ("reference.asl.methods", "from reference.io.checkpoint import load_weights\n"),
    ("reference.io.checkpoint", "from reference.asl.params import Params\n"),
    ("reference.oracle.trace", "from reference.eval.runner import run_eval\n"),
    ("reference.eval.runner", "from reference.cli import load_model\n"),
    ("gpu.engine", "from reference.oracle.conformance import compare\n"),
    ("reference.oracle.bundle", "import gpu.engine\n"),
    ("reference.oracle.bundle", "def f():\n    from reference.io.fetch import resolve_model\n"),
])
def test_a_planted_wrong_way_import_is_caught(importer, source):
    assert violations(importer, source)


def test_a_planted_read_of_the_tests_folder_is_caught():
    assert paths_to_tests('GOLDEN_DIR = ROOT / "tests" / "goldens"\n') and paths_to_tests('p = "tests/goldens"\n')
    assert not paths_to_tests('"""regenerate tests/goldens with make goldens"""\n')


def test_the_rules_accept_what_they_should():
    assert not violations("reference.asl.methods", "from reference.model.weights import Weights\n")
    assert not violations("reference.eval.runner", "from reference.oracle.trace import make_trace\n")
    assert not violations("reference.cli", "def f():\n    from gpu.engine import PortEngine\n")
