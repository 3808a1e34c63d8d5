"""The packages only import downward: dress_model <- runtime <- contracts <- agent | coordinator <- simulations <- cli;
no module imports itself round a circle; no package (benchmarks and tests included) reads another's private names.

protos/ is generated wire code beside the bottom: it imports nothing of ours but itself. runtime/ runs processes
and issues certificates, knowing nothing of the fleet's contracts. Read with ast, so a
function-local import counts as much as a top-level one.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("dress_model", "protos", "runtime", "contracts", "agent", "coordinator", "simulations", "cli")
ALLOWED: dict[str, set[str]] = {
    "dress_model": set(),
    "protos": set(),
    "runtime": {"dress_model"},
    "contracts": {"dress_model", "protos", "runtime"},
    "agent": {"dress_model", "protos", "runtime", "contracts"},
    "coordinator": {"dress_model", "protos", "runtime", "contracts"},
    "simulations": {"dress_model", "protos", "runtime", "contracts", "agent", "coordinator"},
    "cli": {"dress_model", "protos", "runtime", "contracts", "agent", "coordinator", "simulations"},
}
HEAVY_FOR_PROTOS = {"torch", "dress_model", "flwr"}


def imported_packages(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_point_down_only(package: str) -> None:
    assert modules(package), f"{package}/ has no modules"
    wrong = {}
    for path in modules(package):
        ours = (imported_packages(path) & set(PACKAGES)) - {package}
        if bad := ours - ALLOWED[package]:
            wrong[str(path.relative_to(ROOT))] = sorted(bad)
    assert not wrong, f"{package} may import only {sorted(ALLOWED[package])}; found {wrong}"


def test_protos_carry_no_model() -> None:
    for path in modules("protos"):
        assert not imported_packages(path) & HEAVY_FOR_PROTOS, path


def test_every_package_is_checked() -> None:
    found = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "benchmarks"}
    assert found == set(PACKAGES)


def test_the_checker_sees_a_function_local_import(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from simulations.run import run_simulation\n    import coordinator.launcher\n")
    assert {"simulations", "coordinator"} <= imported_packages(source)


# -- no import circle between modules, no private name used across packages ---------------------------------

CHECKED = (*PACKAGES, "benchmarks", "tests")  # private access is checked in the benchmarks and tests too


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of our packages (a package by its ``__init__``)."""
    found = {}
    for package in PACKAGES:
        for path in modules(package):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imported_modules(path: Path, known: dict[str, Path]) -> set[str]:
    """Our modules ``path`` imports, function-local imports included."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if full in known:
                    out.add(full)
                elif node.module in known:
                    out.add(node.module)
    return out


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_no_module_imports_itself_round_a_circle() -> None:
    known = module_files()
    graph = {name: imported_modules(path, known) - {name} for name, path in known.items()}
    assert not circles(graph), f"import circles: {circles(graph)}"


def test_the_circle_finder_finds_one() -> None:
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def private_names(package: str) -> set[str]:
    """``_name``s a package defines: functions, classes, attributes it assigns, module-level names."""
    names = set()
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            name = None
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = node.name
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                name = node.attr
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                name = node.id
            if name and name.startswith("_") and not name.startswith("__"):
                names.add(name)
    return names


def private_uses(path: Path, own: set[str], others: dict[str, set[str]]) -> list[str]:
    """Where ``path`` reads another package's private name (``x._name`` not of ``self``/``cls`` and not one its
    own package defines), imports one, or reads a private attribute of something it imported from Flower."""
    tree = ast.parse(path.read_text(), filename=str(path))
    flower = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
              and node.module and node.module.split(".")[0] == "flwr" for alias in node.names}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in others:
            found += [f"line {node.lineno}: imports {node.module}.{a.name}" for a in node.names
                      if a.name.startswith("_") and not a.name.startswith("__")]
        if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
            continue
        if isinstance(node.value, ast.Name) and node.value.id in flower:
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr} (Flower's)")
        elif not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")) and node.attr not in own:
            owners = sorted(p for p, names in others.items() if node.attr in names)
            if owners:
                found.append(f"line {node.lineno}: .{node.attr} ({', '.join(owners)}'s)")
    return found


def test_no_package_reads_anothers_private_names() -> None:
    defined = {package: private_names(package) for package in CHECKED}
    wrong = {}
    for package in CHECKED:
        others = {p: names for p, names in defined.items() if p != package and p in PACKAGES}
        for path in sorted((ROOT / package).rglob("*.py")):
            if uses := private_uses(path, defined[package], others):
                wrong[str(path.relative_to(ROOT))] = uses
    assert not wrong, f"private names used across packages: {wrong}"


def test_the_private_check_sees_a_reach_across(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("from flwr.x import Thing\nfrom dress_model.kernels import _native\n"
                      "a = layer._norm\nb = Thing._run_id\nc = self._mine\n")
    uses = private_uses(source, set(), {"dress_model": {"_norm", "_native"}})
    assert len(uses) == 3 and any("_run_id" in u for u in uses) and any("_native" in u for u in uses)


# What only the coordinator or a simulation needs; a device's base install lacks it (pyproject extras).
COORDINATOR_ONLY = ("sqlalchemy", "alembic", "psycopg", "ray", "matplotlib", "grpc_tools")
AGENT_ONLY_IMPORTS = f"""
import importlib.abc, sys
class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {COORDINATOR_ONLY!r}:
            raise ImportError(f"{{name}} is not in a device's install")
sys.meta_path.insert(0, Missing())
import agent.calibration, agent.client_app, agent.lifecycle, agent.monitor, agent.serving
from cli.agent import main
"""


def test_the_agent_runs_on_the_base_install() -> None:
    """`dress-agent` and the ClientApp import nothing of the coordinator's or the simulation's extras."""
    done = subprocess.run([sys.executable, "-c", AGENT_ONLY_IMPORTS], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
