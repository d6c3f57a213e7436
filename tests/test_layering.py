"""The layout keeps its promises (docs/architecture.md): every module imports in a fresh interpreter,
imports form no cycle, ``dpolab.rl`` stands without ``dpolab.train``, the pure maths (``dpolab.losses``,
``dpolab.rl.advantages``) needs only torch, math and the standard library, the language-model blocks
(``dpolab.lm``) need no data, training or CLI code (the run directory's file helpers, ``dpolab.runs``,
are below them), and no private name crosses a module.

Imports are read from the source (every ``import`` statement, also those inside functions), so a
cycle through a lazy import counts too."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "dpolab"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module imported, names taken from it, line) for every import statement of ``path`` that can run
    (those under ``if TYPE_CHECKING:`` only name types for checkers)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", getattr(block.test, "attr", None)) == "TYPE_CHECKING"
                   for n in ast.walk(block)}
    out = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.append((node.module, [a.name for a in node.names], node.lineno))
    return out


def _edges(name: str) -> set[str]:
    """The dpolab modules ``name`` imports: ``from a.b import c`` is an edge to ``a.b.c`` when that is a
    module, else to ``a.b``."""
    deps = set()
    for module, names, _ in _imports(MODULES[name]):
        if not module.startswith("dpolab"):
            continue
        subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
        deps |= set(subs) if subs and len(subs) == len(names) else {module}
        deps |= set(subs)
    return {d for d in deps if d in MODULES and d != name}


def test_every_module_imports_in_a_fresh_interpreter():
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    names = [m for m in MODULES if not m.endswith("__main__")]  # __main__ runs the CLI
    proc = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_no_import_cycle():
    graph = {m: _edges(m) for m in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            assert cycle is None, " -> ".join(cycle)


def _offenders(prefix: str, allowed) -> list[str]:
    bad = []
    for name, path in MODULES.items():
        if name == prefix or name.startswith(prefix + "."):
            bad += [f"{path.relative_to(SRC)}:{line} imports {module}" for module, _, line in _imports(path)
                    if not allowed(module)]
    return bad


def test_rl_does_not_import_train():
    assert _offenders("dpolab.rl", lambda m: not m.startswith("dpolab.train")) == []


def test_pure_maths_imports_only_torch_math_and_the_standard_library():
    def pure(module: str) -> bool:
        top = module.split(".")[0]
        return (top in ("torch", "math", "__future__") or top in sys.stdlib_module_names
                or module.startswith("dpolab.losses"))

    assert _offenders("dpolab.losses", pure) == []
    assert _offenders("dpolab.rl.advantages", pure) == []


def test_language_model_blocks_import_no_data_training_or_cli_code():
    lower = ("dpolab.lm", "dpolab.losses", "dpolab.rl.advantages", "dpolab.errors", "dpolab.hub", "dpolab.runs")
    assert _offenders("dpolab.lm", lambda m: not m.startswith("dpolab") or m.startswith(lower)) == []


def test_no_private_name_is_imported_from_another_module():
    bad = []
    for name, path in MODULES.items():
        for module, names, line in _imports(path):
            if module.startswith("dpolab") and module != name:
                bad += [f"{path.relative_to(SRC)}:{line} takes {module}.{n}" for n in names
                        if n.startswith("_") and n != "__version__"]
    assert bad == []


def test_the_check_sees_imports_inside_functions():
    """The analysis itself: a lazy import is an edge (so a cycle through one would be caught)."""
    assert "dpolab.train.engine" in _edges("dpolab.train.dpo")
    lazy = [m for m, _, _ in _imports(MODULES["dpolab.train.dpo"]) if m == "dpolab.train.reference"]
    assert lazy, "train/dpo imports the reference lazily, inside train()"


def test_docs_architecture_names_every_file():
    """docs/architecture.md lists the real tree: every module of the package has its line."""
    text = (SRC.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    missing = [str(p.relative_to(PACKAGE)) for p in MODULES.values()
               if p.name != "__init__.py" and f" {p.name} " not in text.replace("\n", " \n")]
    assert missing == [], missing
