"""The direction of imports between the rooms of the system (docs/ARCHITECTURE.md), checked on the source.

Every import counts, also the ones inside functions: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("edge_client", "coordinator", "export", "hardware")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(*packages: str) -> dict[str, Path]:
    return {_module_name(p): p for pkg in packages for p in sorted((ROOT / pkg).rglob("*.py"))}


ALL = _modules(*PACKAGES)


def _imports(module: str) -> Iterator[tuple[str, str, int]]:
    """(imported module, imported name or '', line) for every import statement of a module."""
    path = ALL[module]
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, "", node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing package
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            for alias in node.names:
                yield base, alias.name, node.lineno


def _targets(module: str) -> Iterator[tuple[str, int]]:
    """Every module a module depends on (`from pkg import mod` counts as pkg.mod when mod is a module)."""
    for base, name, line in _imports(module):
        yield (f"{base}.{name}" if f"{base}.{name}" in ALL else base), line


def _violations(sources: str, forbidden: tuple[str, ...], allowed: tuple[str, ...] = ()) -> list[str]:
    out = []
    for module in (m for m in ALL if m == sources or m.startswith(sources + ".")):
        for target, line in _targets(module):
            hit = any(target == f or target.startswith(f + ".") for f in forbidden)
            if hit and not any(target == a or target.startswith(a + ".") for a in allowed):
                out.append(f"{ALL[module].relative_to(ROOT)}:{line} imports {target}")
    return out


def test_edge_client_imports_nothing_from_coordinator_export_hardware_or_torch() -> None:
    assert _violations("edge_client", ("coordinator", "export", "hardware", "torch", "onnx", "onnxscript")) == []


def test_the_wire_contract_imports_nothing_else_from_fedge() -> None:
    assert _violations("edge_client.wire", PACKAGES, allowed=("edge_client.wire",)) == []


def test_export_imports_model_definitions_and_checkpoints_never_training_code() -> None:
    assert _violations("export", ("coordinator",), allowed=("coordinator.models",)) == []


def test_model_definitions_import_no_training_fleet_or_export_code() -> None:
    forbidden = ("coordinator.pretrain", "coordinator.fleet", "coordinator.recsys", "coordinator.cli",
                 "coordinator.demo", "export", "hardware")
    assert _violations("coordinator.models", forbidden) == []


def test_hardware_reaches_the_coordinator_only_through_its_public_modules() -> None:
    """The harness runs real processes and reads what the coordinator stored through FleetState (no SQL of its
    own) and starts brokers through the fleet's broker helper."""
    assert _violations("hardware", ("coordinator",), allowed=("coordinator.fleet.state", "coordinator.fleet.broker",
                                                             "coordinator.cli")) == []
    assert "SELECT " not in (ROOT / "hardware" / "hil.py").read_text()


def _reaches_private(node: ast.AST) -> bool:
    """``x._name`` where x is not self, cls or super(): a private member of another module or object."""
    if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
        return False
    value = node.value
    if isinstance(value, ast.Name) and value.id in ("self", "cls"):
        return False
    return not (isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "super")


@pytest.mark.parametrize("module", sorted(ALL))
def test_no_private_name_is_reached_across_modules(module: str) -> None:
    tree = ast.parse(ALL[module].read_text())
    reached = [f"line {n.lineno}: from {n.module} import {a.name}" for n in ast.walk(tree)
               if isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] in PACKAGES
               for a in n.names if a.name.startswith("_") and not a.name.startswith("__")]
    reached += [f"line {n.lineno}: {ast.unparse(n)}" for n in ast.walk(tree) if _reaches_private(n)]
    assert reached == []


def test_the_checker_sees_a_violation() -> None:
    """The rules above are only worth something if a real import of the forbidden kind is caught."""
    targets = dict(_targets("coordinator.fleet.server"))
    assert "edge_client.wire" in targets and "coordinator.fleet.strategies" in targets
    assert _violations("coordinator.fleet", ("edge_client.wire",)) != []
    assert _reaches_private(ast.parse("self.store._reject(err)").body[0].value.func)
    assert not _reaches_private(ast.parse("self._reject(err)").body[0].value.func)


# Names that may stand in two modules: the commands of the two CLIs (fedge, fedge-edge) and their consoles, the
# output names the TFLite conversion worker repeats because it runs in its own virtualenv without fedge, and two
# different summaries (a demo's and the pretraining benchmark's).
TWIN_ALLOWED = frozenset({"run", "status", "publish", "console", "OUTPUTS", "summarise", "app", "main", "log"})


def test_no_public_name_is_defined_in_two_modules() -> None:
    """Twin names (three `predict`s, two `HEAD_KEYS`, ...) made a reader guess which one a call meant."""
    where: dict[str, list[str]] = {}
    for module, path in ALL.items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef):
                names = [node.name]
            elif isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            else:
                continue
            for name in names:
                if not name.startswith("_") and name not in TWIN_ALLOWED:
                    where.setdefault(name, []).append(module)
    assert {name: mods for name, mods in where.items() if len(mods) > 1} == {}
