"""The shape of the package: no import cycle, no import from a lower floor to a higher one, no example code in the core.

Every ``import`` / ``from ... import`` statement of every module under ``hf_subspace/`` counts — at module level,
inside functions, under ``if TYPE_CHECKING:``, relative or absolute. Importing ``a.b.c`` also runs the
``__init__`` of the package ``a.b`` (unless the importer is inside ``a.b``), so that counts as an import of
``a.b`` too; the root ``hf_subspace/__init__.py`` is the public facade on the top floor, which no module inside
the package may import (``from . import __version__`` included).

:data:`FLOORS` is the one place the layering is declared. A module may import modules of its own floor (the cycle
check keeps those acyclic) and of lower floors, never of a higher one. A new module must be put on a floor here.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "hf_subspace"

#: The floors of hf_subspace, lowest first: ``(name, [module or subpackage, ...])``, names relative to the package
#: (a subpackage covers all of its modules; ``""`` is the root ``__init__``, the facade).
FLOORS: list[tuple[str, list[str]]] = [
    ("foundation: no hf_subspace import but each other",
     ["_version", "errors", "atomic", "opcount", "cache", "auto_classes", "checkpoints"]),
    ("the maps P and their autograd products; what a valid request is",
     ["projections", "products", "validation"]),
    ("per tensor of θ: which tensors, their parametrization, quantized and sharded θ0, the delta, fingerprints",
     ["layer", "quantized", "dtensor", "fingerprint", "layout", "delta", "blocked", "embedding", "merging",
      "recompute"]),
    ("the engine and what reparameterizes a model with it (one process, DDP, FSDP2)",
     ["engine", "plain", "reparam", "fsdp", "distributed"]),
    ("PEFT: the tuner, model cards and the Hub, the registration with peft",
     ["tuner", "hub", "_registry"]),
    ("training: the arguments both trainers share, TWA, the Trainer, non-finite steps",
     ["arguments", "twa", "nonfinite", "trainer"]),
    ("analysis: intrinsic-dimension sweeps, effective rank", ["analysis"]),
    ("the command line", ["cli"]),
    ("the public facade", [""]),
]

#: Example code, outside the floors: it may import the core, the core may not import it ...
DEMO = "demo"
#: ... except the CLI's demo tasks (the MNIST sweep task, ``hf-subspace twa --dataset`` on the packaged image data sets).
DEMO_IMPORTERS = {"analysis.tasks", "cli"}
#: the deprecated aliases of the modules that moved into ``hf_subspace.demo`` (kept for one release)
DEMO_SHIMS = {"data": "demo.data", "examples_support": "demo.examples", "vision": "demo.vision"}



# -- the import graph ----------------------------------------------------------------------------------------------
def _modules() -> dict[str, tuple[Path, bool]]:
    """``{relative dotted name: (file, is a package __init__)}`` for every module under hf_subspace/."""
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT / PACKAGE).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_package)
    return out


MODULES = _modules()


def _known(name: str) -> str | None:
    """The longest prefix of ``name`` (relative dotted, ``""`` = the root) that is one of our modules."""
    parts = name.split(".") if name else []
    while parts:
        if ".".join(parts) in MODULES:
            return ".".join(parts)
        parts.pop()
    return ""


def _targets(importer: str, is_package: bool, node: ast.AST) -> list[str]:
    """The modules of ours (relative names) that ``node`` runs, parent package ``__init__`` files included."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = [PACKAGE, *importer.split(".")] if importer else [PACKAGE]
            if not is_package:
                base = base[:-1]
            base = base[:len(base) - (node.level - 1)]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        # `from pkg import submodule` imports the submodule; `from pkg import function`, pkg itself
        names = [f"{module}.{a.name}" if f"{module}.{a.name}"[len(PACKAGE) + 1:] in MODULES else module
                 for a in node.names]
    found = []
    for name in names:
        if name != PACKAGE and not name.startswith(PACKAGE + "."):
            continue
        target = _known(name[len(PACKAGE) + 1:])
        if target == "":
            found.append("")  # the root facade (`from hf_subspace import X`, `from . import __version__`)
            continue
        chain = target.split(".")
        found.append(target)
        for i in range(len(chain) - 1, 0, -1):  # the package __init__ files above it, up to the importer's own
            pkg = ".".join(chain[:i])
            if importer == pkg or importer.startswith(pkg + "."):
                break
            found.append(pkg)
    return found


def _edges() -> dict[tuple[str, str], list[int]]:
    """``{(importer, imported): [line, ...]}`` over every import statement of every module."""
    edges: dict[tuple[str, str], list[int]] = {}
    for name, (path, is_package) in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(name, is_package, node):
                    if target != name:
                        edges.setdefault((name, target), []).append(node.lineno)
    return edges


EDGES = _edges()


def _where(edge: tuple[str, str]) -> str:
    importer, imported = edge
    path = MODULES[importer][0].relative_to(ROOT)
    return f"{path}:{','.join(map(str, sorted(set(EDGES[edge]))))} imports {PACKAGE}{'.' if imported else ''}{imported}"


def _in(module: str, entry: str) -> bool:
    return module == entry or (entry != "" and module.startswith(entry + "."))


def _floor(module: str) -> int | None:
    matches = [(len(entry), i) for i, (_, entries) in enumerate(FLOORS) for entry in entries if _in(module, entry)]
    return max(matches)[1] if matches else None


def _outside_floors(module: str) -> bool:
    return _in(module, DEMO) or module in DEMO_SHIMS


# -- the tests -----------------------------------------------------------------------------------------------------
def test_the_graph_sees_function_level_and_relative_imports():
    assert ("_registry", "hub") in EDGES  # `from . import hub` inside functions
    assert ("engine", "layer") in EDGES  # `from .layer import SubspaceLayer` inside a method
    assert ("tuner.model", "engine") in EDGES and ("tuner", "tuner.model") in EDGES  # `from ..engine`, `from .model`
    assert ("_registry", "tuner") in EDGES  # `from .tuner.config import ...` also runs tuner/__init__.py
    assert any(importer == "cli" for importer, _ in EDGES)  # cli imports almost everything inside functions


def test_every_module_is_on_a_floor():
    missing = [m for m in MODULES if not _outside_floors(m) and _floor(m) is None]
    assert not missing, f"put these modules on a floor in tests/test_imports.py FLOORS: {missing}"
    entries = [e for _, entries in FLOORS for e in entries]
    assert len(entries) == len(set(entries)), "a module is on two floors"
    unknown = [e for e in entries if e not in MODULES]
    assert not unknown, f"FLOORS names modules that do not exist: {unknown}"


def test_every_module_says_what_it_owns():
    missing = [m or "__init__" for m, (path, _) in MODULES.items()
               if not (ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or "").strip()]
    assert not missing, f"modules without a docstring saying what they own: {missing}"


def test_no_module_imports_from_a_higher_floor():
    upward = []
    for edge in sorted(EDGES):
        importer, imported = edge
        if _outside_floors(importer) or _outside_floors(imported):
            continue
        low, high = _floor(importer), _floor(imported)
        if high > low:
            upward.append(f"{_where(edge)} (floor {low} '{FLOORS[low][0]}' -> floor {high} '{FLOORS[high][0]}')")
    assert not upward, "imports from a lower floor to a higher one:\n" + "\n".join(upward)


def test_no_import_cycle():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for importer, imported in EDGES:
        graph[importer].add(imported)
    # Tarjan's strongly connected components
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(MODULES)))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    report = []
    for component in cycles:
        report.append(f"cycle among {component}, e.g.:\n  " + "\n  ".join(map(_where, _a_cycle(graph, component))))
    assert not report, "import cycles:\n" + "\n".join(report)


def _a_cycle(graph: dict[str, set[str]], component: list[str]) -> list[tuple[str, str]]:
    """The edges of a shortest cycle through ``component[0]`` inside the strongly connected ``component``."""
    start, members = component[0], set(component)
    parent: dict[str, str] = {}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & members):
            if w == start:
                path = [(v, w)]
                while v != start:
                    path.insert(0, (parent[v], v))
                    v = parent[v]
                return path
            if w not in parent:
                parent[w] = v
                queue.append(w)
    raise AssertionError(f"no cycle through {start}")


def test_the_core_imports_no_example_code():
    offending = [_where(e) for e in sorted(EDGES)
                 if _in(e[1], DEMO) and not _outside_floors(e[0]) and e[0] not in DEMO_IMPORTERS]
    assert not offending, "the core imports hf_subspace.demo (example code):\n" + "\n".join(offending)
    # nothing imports the deprecated aliases (they only warn), and they import nothing but their new module
    via_alias = [_where(e) for e in sorted(EDGES) if e[1] in DEMO_SHIMS]
    assert not via_alias, "imports of the deprecated aliases:\n" + "\n".join(via_alias)
    assert {e for e in EDGES if e[0] in DEMO_SHIMS} == {(old, new) for old, new in DEMO_SHIMS.items()} | {
        (old, DEMO) for old in DEMO_SHIMS}
    # and the demo tasks allowed to, do (so the allow-list does not outlive them)
    assert {e[0] for e in EDGES if _in(e[1], DEMO) and e[0] in DEMO_IMPORTERS} == DEMO_IMPORTERS


def test_importing_the_package_loads_no_example_code():
    code = ("import sys, hf_subspace, hf_subspace.cli, hf_subspace.analysis; "
            "print(sorted(m for m in sys.modules if m.startswith('hf_subspace.demo') "
            "or m in ('hf_subspace.data', 'hf_subspace.vision', 'hf_subspace.examples_support')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("old", sorted(DEMO_SHIMS))
def test_the_old_paths_of_the_demo_modules_still_work_and_warn(old):
    new = DEMO_SHIMS[old]
    assert set(EDGES) >= {(old, new)}
    code = (f"import warnings; warnings.simplefilter('error', FutureWarning)\n"
            f"try:\n    import {PACKAGE}.{old}\nexcept FutureWarning as w:\n    print(w)\n"
            f"warnings.simplefilter('ignore', FutureWarning)\n"
            f"import {PACKAGE}.{old} as old, {PACKAGE}.{new} as new\n"
            f"names = [n for n in vars(new) if not n.startswith('__')]\n"
            f"print(all(getattr(old, n) is getattr(new, n) for n in names), len(names) > 3, old is new)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    warning, same = out.stdout.strip().splitlines()
    assert f"{PACKAGE}.{old} moved to {PACKAGE}.{new}" in warning
    assert same == "True True True"  # the alias is the module: settings made through it are the module's
