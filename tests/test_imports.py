"""The package's import graph, read from the source with `ast`: arrows point one way.

    kernels <- ops <- losses / objective <- loop <- commands        (README "Layout")

Every module of tinybert_fast/** is
parsed, never imported; its imports (absolute and relative, at module level or inside functions,
and importlib.import_module calls with a literal name; not those under `if TYPE_CHECKING:`,
which never run) give the edges.  `from P import name` is
an edge to the module P.name when there is one, else to P.  A package's __init__ is a module of
its own: importing a.b.c is an edge to a.b.c only (an edge to every parent package would make the
package's __init__, which imports everything, part of every cycle).

The rules: no cycle; nothing outside the CLI wing (tinybert_fast/commands/, tinybert_fast/cli.py)
imports the commands or argparse, so the wing is a leaf; nothing in kernels imports from the
package outside kernels except the import-free constants module (tinybert_fast._semantics); the
eager reference reaches no op and no kernel, not even through another module; no kernel family
(tinybert_fast/kernels/<family>.py) imports another, and the helpers they share (kernels/_*.py)
import no family; the same between the ops' families.

Run against another checkout: `python tests/test_imports.py /path/to/checkout` prints what
breaks each rule and exits 1 when anything does.
"""

from __future__ import annotations

import ast
import importlib.metadata
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "tinybert_fast"
KERNELS = "tinybert_fast.kernels"
OPS = "tinybert_fast.ops"
REFERENCE = "tinybert_fast.reference"
# the CLI wing: argparse lives here only, and nothing else imports it (a leaf)
COMMANDS = "tinybert_fast.commands"
CLI = "tinybert_fast.cli"
# import-free by design: the one module of the package that kernels may import
CONSTANTS = "tinybert_fast._semantics"
# (source folder under the checkout, dotted package it installs as)
SOURCES = (("tinybert_fast", PACKAGE),)


class Module:
    def __init__(self, name: str, path: Path, is_package: bool):
        self.name, self.path, self.is_package = name, path, is_package
        self.imports: dict[str, int] = {}  # imported module -> first line
        self.external: dict[str, int] = {}  # imported top-level name outside the package -> line


def find_modules(root: Path) -> dict[str, Module]:
    """{dotted name: Module} of every .py file under the source folders of `root`."""
    modules = {}
    for folder, package in SOURCES:
        base = root / folder
        if not base.is_dir():
            raise FileNotFoundError(f"{base} is not a folder: is {root} a checkout of the project?")
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            name = ".".join([package, *parts])
            modules[name] = Module(name, path, is_package)
    return modules


def _resolve_relative(module: Module, level: int, target: str | None) -> str:
    """The absolute name of `from <level dots><target> import ...` written in `module`."""
    base = module.name.split(".")
    if not module.is_package:  # a module's level-1 anchor is its package
        base = base[:-1]
    if level > 1:
        base = base[:-(level - 1)]
    return ".".join(base + ([target] if target else []))


def _literal(node) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _import_module_call(node: ast.Call) -> tuple[str, str | None] | None:
    """(name, package) of importlib.import_module("name"[, package]) with a literal name."""
    f = node.func
    if not (isinstance(f, ast.Attribute) and f.attr == "import_module"
            or isinstance(f, ast.Name) and f.id == "import_module"):
        return None
    name = _literal(node.args[0]) if node.args else None
    if name is None:
        return None
    package = None
    if len(node.args) > 1:
        package = node.args[1]
    for kw in node.keywords:
        if kw.arg == "package":
            package = kw.value
    if isinstance(package, ast.Name) and package.id in ("__package__", "__name__"):
        package = package.id
    else:
        package = _literal(package) if package is not None else None
    return name, package


def _type_checking_nodes(tree: ast.AST) -> set[ast.AST]:
    """Every node inside an `if TYPE_CHECKING:` block: imports for annotations only, which
    never run, so they are no edge of the import graph."""
    nodes: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and (
                isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
                or isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING"):
            for stmt in node.body:
                nodes.update(ast.walk(stmt))
    return nodes


def build_graph(root: Path) -> dict[str, Module]:
    """find_modules(root), each with its imports of the package's own modules filled in."""
    modules = find_modules(root)

    def add(module: Module, target: str, line: int) -> None:
        if target.split(".")[0] != PACKAGE:
            module.external.setdefault(target.split(".")[0], line)
            return
        # the deepest existing module of the dotted name
        parts = target.split(".")
        while parts and ".".join(parts) not in modules:
            parts.pop()
        if parts and parts[0] == PACKAGE:
            module.imports.setdefault(".".join(parts), line)

    for module in modules.values():
        tree = ast.parse(module.path.read_text(encoding="utf-8"), filename=str(module.path))
        type_only = _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if node in type_only:
                continue
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(module, alias.name, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                source = (_resolve_relative(module, node.level, node.module) if node.level
                          else node.module)
                for alias in node.names:
                    full = f"{source}.{alias.name}"
                    add(module, full if full in modules else source, node.lineno)
            elif isinstance(node, ast.Call) and (call := _import_module_call(node)):
                name, package = call
                if name.startswith("."):
                    if package is None:
                        continue
                    # the anchor: this module's package (__package__), this module (__name__)
                    # or the literal package name
                    if package == "__package__":
                        base = module.name.split(".")[:None if module.is_package else -1]
                    elif package == "__name__":
                        base = module.name.split(".")
                    else:
                        base = package.split(".")
                    level = len(name) - len(name.lstrip("."))
                    base = base[:len(base) - (level - 1)]
                    name = ".".join(base + [name.lstrip(".")])
                add(module, name, node.lineno)
    return modules


def _where(modules: dict[str, Module], src: str, dst: str) -> str:
    m = modules[src]
    return f"{src} -> {dst} ({m.path.name}:{m.imports[dst]})"


def find_cycles(modules: dict[str, Module]) -> list[list[str]]:
    """The import cycles: each strongly connected component of more than one module (or a module
    importing itself), as one cycle through it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    counter = 0

    def strongconnect(v: str) -> None:  # Tarjan's algorithm (graphs here are small: recursion)
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in modules[v].imports:
            if w not in index:
                strongconnect(w)
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
            if len(component) > 1 or v in modules[v].imports:
                components.append(sorted(component))

    for v in sorted(modules):
        if v not in index:
            strongconnect(v)
    cycles = []
    for component in components:
        inside = set(component)
        # one concrete cycle: walk from the first module inside the component until it repeats
        path, seen = [component[0]], {component[0]: 0}
        while True:
            nxt = next(w for w in sorted(modules[path[-1]].imports) if w in inside)
            if nxt in seen:
                cycles.append(path[seen[nxt]:] + [nxt])
                break
            seen[nxt] = len(path)
            path.append(nxt)
    return cycles


def _reachable(modules: dict[str, Module], start: str) -> dict[str, list[str]]:
    """{module: one import chain from start to it} of every module start reaches."""
    chains = {start: [start]}
    todo = [start]
    while todo:
        v = todo.pop(0)
        for w in sorted(modules[v].imports):
            if w not in chains:
                chains[w] = chains[v] + [w]
                todo.append(w)
    return chains


def _in(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _family(name: str, package: str) -> str | None:
    """The family module `package.<family>` that `name` is, or None (the package's __init__, a
    shared underscore module, or outside the package)."""
    if not _in(name, package) or name == package:
        return None
    first = name[len(package) + 1:].split(".")[0]
    return None if first.startswith("_") else f"{package}.{first}"


def violations(root: Path) -> dict[str, list[str]]:
    """{rule: what breaks it} over the checkout at root (empty lists: all rules hold)."""
    modules = build_graph(root)
    out: dict[str, list[str]] = {}
    out["no import cycle"] = [" -> ".join(cycle) for cycle in find_cycles(modules)]
    out["kernels import nothing above them"] = [
        _where(modules, src, dst) for src in sorted(modules) if _in(src, KERNELS)
        for dst in modules[src].imports if not _in(dst, KERNELS) and dst != CONSTANTS]
    chains = _reachable(modules, REFERENCE) if REFERENCE in modules else {}
    out["the reference reaches no op and no kernel"] = [
        " -> ".join(chain) for dst, chain in sorted(chains.items())
        if _in(dst, OPS) or _in(dst, KERNELS)]
    out["nothing outside the CLI wing imports commands or argparse"] = [
        f"{src} -> {dst} ({modules[src].path.name}:{line})" for src in sorted(modules)
        if not (_in(src, COMMANDS) or src == CLI)
        for dst, line in [*modules[src].imports.items(), *modules[src].external.items()]
        if _in(dst, COMMANDS) or dst == "argparse"]
    for package, label in ((KERNELS, "kernel"), (OPS, "op")):
        broken = []
        for src in sorted(modules):
            if not _in(src, package) or src == package:
                continue
            mine = _family(src, package)  # None: a shared underscore module
            for dst in modules[src].imports:
                theirs = _family(dst, package)
                if theirs is not None and theirs != mine:
                    broken.append(_where(modules, src, dst))
        out[f"no {label} family imports another"] = broken
    return out


# --- tests ---------------------------------------------------------------------------------------

RULES = list(violations(REPO))


@pytest.fixture(scope="module")
def found():
    return violations(REPO)


def test_graph_sees_the_package():
    """The walk finds the modules and the edges it is meant to judge (else every rule would hold
    vacuously)."""
    modules = build_graph(REPO)
    for name in (PACKAGE, OPS, KERNELS, REFERENCE, CONSTANTS, f"{KERNELS}._utils",
                 f"{KERNELS}.attention_mse_qk", f"{OPS}.attention_mse_qk"):
        assert name in modules, f"{name} not found among {sorted(modules)}"
    # relative imports: of a sibling, of a sibling package's module, from kernels/ up to the
    # constants; an import inside a function is test_rules_catch_what_they_forbid's
    assert f"{PACKAGE}._checks" in modules[REFERENCE].imports
    assert REFERENCE in modules[f"{PACKAGE}.capture"].imports
    assert f"{KERNELS}.attention_mse_qk" in modules[f"{OPS}.attention_mse_qk"].imports
    assert CONSTANTS in modules[f"{KERNELS}.attention_mse"].imports
    # the constants module is import-free: nothing at all, not even torch
    tree = ast.parse(modules[CONSTANTS].path.read_text(encoding="utf-8"))
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


def test_rules_catch_what_they_forbid(tmp_path):
    """Each rule fails on a tree that breaks it: a cycle, an upward import from a kernel, a
    reference reaching a kernel through another module, one family importing another."""
    for folder, files in {
        "tinybert_fast": {"__init__.py": "from . import reference\n",
                          "reference.py": "from . import _helper\n",
                          "_helper.py": "def f():\n    from .kernels import soft_ce\n",
                          "a.py": "import tinybert_fast.b\n", "b.py": "from .a import x\n",
                          "c.py": "import importlib\n"
                                  "importlib.import_module('.d', __package__)\n",
                          "d.py": "from importlib import import_module\n"
                                  "import_module('tinybert_fast.c')\n",
                          "_semantics.py": "X = 1\n",
                          "cli.py": "import argparse\nfrom .commands import run\n",
                          "study.py": "def f():\n    from argparse import Namespace\n",
                          "e.py": "from .commands.run import x\n"},
        "tinybert_fast/commands": {"__init__.py": "", "run.py": "import argparse\n"},
        "tinybert_fast/ops": {"__init__.py": "", "one.py": "from .two import y\n",
                              "two.py": "from ._shared import z\n", "_shared.py": ""},
        "tinybert_fast/kernels": {"__init__.py": "", "_utils.py": "",
                                  "soft_ce.py": "from .._semantics import X\n",
                                  "attention_kl.py": "from .soft_ce import LN2\n"
                                                     "from ..ops import one\n"},
    }.items():
        (tmp_path / folder).mkdir(parents=True)
        for name, text in files.items():
            (tmp_path / folder / name).write_text(text)
    broken = violations(tmp_path)
    assert broken["no import cycle"] == ["tinybert_fast.a -> tinybert_fast.b -> tinybert_fast.a",
                                         "tinybert_fast.c -> tinybert_fast.d -> tinybert_fast.c"]
    assert broken["kernels import nothing above them"] == [
        "tinybert_fast.kernels.attention_kl -> tinybert_fast.ops.one (attention_kl.py:2)"]
    assert broken["the reference reaches no op and no kernel"] == [
        "tinybert_fast.reference -> tinybert_fast._helper -> tinybert_fast.kernels.soft_ce"]
    assert broken["no kernel family imports another"] == [
        "tinybert_fast.kernels.attention_kl -> tinybert_fast.kernels.soft_ce (attention_kl.py:1)"]
    assert broken["no op family imports another"] == [
        "tinybert_fast.ops.one -> tinybert_fast.ops.two (one.py:1)"]
    assert broken["nothing outside the CLI wing imports commands or argparse"] == [
        "tinybert_fast.e -> tinybert_fast.commands.run (e.py:1)",
        "tinybert_fast.study -> argparse (study.py:2)"]


def top_level_names(root: Path) -> set[str]:
    """The import names the checkout's root provides: its packages (folders with an __init__.py)
    and modules (.py files)."""
    return {p.name if p.is_dir() else p.stem for p in root.iterdir()
            if (p.is_dir() and (p / "__init__.py").is_file()) or p.suffix == ".py"}


def test_no_top_level_name_shadows_an_installed_distribution():
    """`python -m pytest` and `python -m benchmarks` put the checkout's root first on sys.path, so
    a top-level package there hides an installed distribution's module of the same name from
    every library that imports it.  A top-level `kernels/` did: transformers >= 5.25 requires and
    imports Hugging Face's `kernels`, and got ours ("cannot import name 'CUDAProperties'")."""
    names = top_level_names(REPO)
    assert {"tinybert_fast", "benchmarks"} <= names, names
    owners = importlib.metadata.packages_distributions()
    clashes = {name: owners[name] for name in sorted(names)
               if set(owners.get(name, ())) - {"tinybert-fast", "tinybert_fast"}}
    assert clashes == {}, f"the checkout's top-level names that distributions own: {clashes}"


@pytest.mark.parametrize("rule", RULES)
def test_rule_holds(found, rule):
    assert found[rule] == [], f"{rule}:\n  " + "\n  ".join(found[rule])


def main(argv: list[str]) -> int:
    root = Path(argv[0]).resolve() if argv else REPO
    status = 0
    for rule, broken in violations(root).items():
        print(f"{'FAIL' if broken else 'ok'}: {rule}")
        for line in broken:
            print(f"    {line}")
        status |= bool(broken)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
