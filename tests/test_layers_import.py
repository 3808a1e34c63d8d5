"""The packages only import downward: dress_model <- runtime <- contracts <- agent | coordinator <- simulations <- cli.

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
