"""The code's shape, checked: imports point down through the layers, never in a circle, and no
module touches another's private names.

The layers, bottom to top (README "How it is built" draws the same map)::

    0  harness.errors, harness.core       errors, cache paths and publishing, programs, progress, subprocesses, deadlines
    1  harness.vm                          machine spec and argv, the QEMU process, console, snapshots
    2  harness.transport                   serial, SSH, keys, the testinfra backend
    3  harness.images                      recipes, builders (tiny, debian), boot disks
    4  harness.hosts                       host facts, the accelerator probe
    5  harness.guest                       boot(), Guest, BootOptions; what guests show (guestfacts); warmstart
    6  harness.nested                      L1 hosts and the guests inside them
    7  harness.diskfmt, harness.reports    disk-format round trips; matrix, reports
    8  harness.tools                       bench, soak
    9  harness.cli, harness (public face)  the command line, ``harness/__init__``

A module may import its own layer and the layers below.  Imports under ``if TYPE_CHECKING:``
are annotations only and do not count.  The check reads the source (AST): no import runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "harness"
LAYERS: list[tuple[str, ...]] = [
    ("harness.errors", "harness.core"),
    ("harness.vm",),
    ("harness.transport",),
    ("harness.images",),
    ("harness.hosts",),
    ("harness.guest", "harness.guestfacts", "harness.warmstart"),
    ("harness.nested",),
    ("harness.diskfmt", "harness.reports"),
    ("harness.tools",),
    ("harness.cli", "harness.__main__", "harness"),
]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    best, found = -1, None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, found = len(p), i
    if found is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS (and README's map)")
    return found


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                for n in ast.walk(sub):
                    if hasattr(n, "lineno"):
                        lines.add(n.lineno)
    return lines


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports(path: Path) -> list[tuple[str, int, list[str]]]:
    """(imported harness module, line, names imported from it) of one file, type-checking imports left out."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    me, is_pkg = module_name(path), path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, []) for a in node.names if a.name.split(".")[0] == "harness"]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(me, is_pkg, node)
            if target.split(".")[0] != "harness":
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                # `from harness.vm import machine` imports a module; `from harness.vm.spec import Accel` a name.
                if (ROOT.parent / Path(*sub.split("."))).with_suffix(".py").is_file() or \
                        (ROOT.parent / Path(*sub.split("."))).is_dir():
                    out.append((sub, node.lineno, []))
                else:
                    out.append((target, node.lineno, [a.name]))
    return out


FILES = sorted(ROOT.rglob("*.py"))
GRAPH = {module_name(p): imports(p) for p in FILES}


def test_every_module_is_in_a_layer() -> None:
    for module in GRAPH:
        layer_of(module)


@pytest.mark.parametrize("path", FILES, ids=lambda p: module_name(p))
def test_imports_point_down(path: Path) -> None:
    me = module_name(path)
    mine = layer_of(me)
    upward = [f"{path.relative_to(ROOT.parent)}:{line}: {me} (layer {mine}) imports {target} (layer {layer_of(target)})"
              for target, line, _ in GRAPH[me] if target != me and layer_of(target) > mine]
    assert not upward, "\n".join(upward)


def test_no_import_cycles() -> None:
    edges = {m: {t for t, _, _ in deps if t in GRAPH and t != m} for m, deps in GRAPH.items()}
    # A package's __init__ that re-exports its own modules is not a cycle with them.
    for m in edges:
        edges[m] = {t for t in edges[m] if not (m.startswith(t + ".") and t in GRAPH)}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


@pytest.mark.parametrize("path", FILES, ids=lambda p: module_name(p))
def test_no_module_touches_another_modules_private_names(path: Path) -> None:
    me = module_name(path)
    found = [f"{path.relative_to(ROOT.parent)}:{line}: from {target} import {name}"
             for target, line, names in GRAPH[me] for name in names
             if name.startswith("_") and not name.startswith("__") and target != me]
    # obj._private on anything but self/cls (e.g. guest._ssh, machine.hard_kill).
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = ast.unparse(node.value)
            if owner not in ("self", "cls") and owner.split(".")[0] not in ("sys", "os", "type(self)"):
                found.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}: {owner}.{node.attr}")
    assert not found, "\n".join(found)


def test_every_package_ships_in_the_wheel() -> None:
    import tomllib

    listed = set(tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {module_name(p) for p in ROOT.rglob("__init__.py")}
    assert packages <= listed, f"add to pyproject.toml's packages: {sorted(packages - listed)}"
