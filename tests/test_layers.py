"""The layer contract: imports inside reid_deploy flow one way (see docs/ARCHITECTURE.md).

Every ``import reid_deploy.X`` / ``from reid_deploy.X import`` in the package, at module level or inside a
function, is read from the source; a module may import its own package and any package of a lower layer.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "reid_deploy"

# lowest first; a unit imports only units of a strictly lower layer, or itself
LAYERS = [
    {"errors", "files", "console", "keys", "crypto", "spec"},
    {"data", "model"},
    {"inference"},
    {"evaluate", "retrieval"},
    {"train", "deploy", "serve", "client"},
    {"cli"},
    {"__main__"},
]
# inside the base layer, and between evaluate and retrieval, one direction only
ALLOWED_SIDEWAYS = {("files", "errors"), ("files", "spec"), ("keys", "errors"), ("crypto", "errors"),
                    ("console", "errors"), ("crypto", "files"), ("spec", "errors"), ("evaluate", "retrieval")}


def _unit(module: str) -> str:
    return module.split(".")[1] if module.count(".") else module


def _layer(unit: str) -> int:
    for level, units in enumerate(LAYERS):
        if unit in units:
            return level
    raise AssertionError(f"reid_deploy.{unit} is in no layer of tests/test_layers.py: place it there")


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("reid_deploy."):
            found.add(_unit(node.module))
        elif isinstance(node, ast.ImportFrom) and node.module == "reid_deploy":
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(_unit(a.name) for a in node.names if a.name.startswith("reid_deploy."))
    return found


def violations() -> list[str]:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        unit = rel.parts[0].removesuffix(".py")
        if unit == "__init__":
            continue
        for target in _imports(path) - {unit, "__version__"}:
            if _layer(target) < _layer(unit) or (unit, target) in ALLOWED_SIDEWAYS:
                continue
            bad.append(f"reid_deploy/{rel} imports reid_deploy.{target}")
    return bad


def test_imports_flow_down_the_layers():
    assert violations() == []


def test_contract_catches_an_upward_import(tmp_path, monkeypatch):
    fake = tmp_path / "reid_deploy"
    (fake / "inference").mkdir(parents=True)
    (fake / "inference" / "bad.py").write_text("def f():\n    from reid_deploy.evaluate.metrics import x\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert violations() == ["reid_deploy/inference/bad.py imports reid_deploy.evaluate"]
