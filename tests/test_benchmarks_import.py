"""Every benchmark script imports: a name moved or renamed in the package must be renamed in the scripts too
(benchmarks/etth1_head.py imported residual_head.RIDGE_GRID for a session after it became LAG_RIDGE_GRID, and
nothing ran it). Importing runs no benchmark: each keeps its work under ``if __name__ == "__main__"``."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parent.parent / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("path", BENCHMARKS, ids=[p.stem for p in BENCHMARKS])
def test_benchmark_script_imports(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(path.parent))
    name = f"_benchmark_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    assert callable(getattr(module, "main", None)), f"{path.name} has no main()"


PACKAGES = ("coordinator", "edge_client", "export", "hardware")


@pytest.mark.parametrize("path", BENCHMARKS, ids=[p.stem for p in BENCHMARKS])
def test_every_name_a_benchmark_imports_from_fedge_exists(path: Path) -> None:
    """Imports inside functions run only when that part of the benchmark does (etth1_head.py's feature extraction
    imported protocol._features, renamed frozen_features): check each one by name."""
    import ast

    missing = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
            module = importlib.import_module(node.module)
            missing += [f"{node.module}.{a.name} (line {node.lineno})" for a in node.names
                        if not hasattr(module, a.name) and importlib.util.find_spec(f"{node.module}.{a.name}") is None]
    assert not missing, missing
