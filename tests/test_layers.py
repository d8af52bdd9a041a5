"""The layers import downward: common/ imports only common/; stages/ only common/ and stages/;
producer/ only common/ and producer/. The application (spotline/) may import anything, and
nothing below it imports it. Read from the source (ast), so a lazy import inside a function
counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ALLOWED = {"common": {"common"}, "stages": {"common", "stages"},
           "producer": {"common", "producer"}}
LAYERS = {"common", "stages", "producer"}


def _imported_layers(path: Path, layer: str) -> list[tuple[int, str]]:
    """(line, layer) of every first-party import in one file: common, stages or producer, or
    spotline for the application package."""
    package = [layer, *path.relative_to(ROOT / layer).parent.parts]  # e.g. stages, backends
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level:
            if node.level > len(package):  # from the spotline package: ..common, ..evaluate
                sub = (node.module or "").partition(".")[0]
                out.append((node.lineno, sub if sub in LAYERS else "spotline"))
            else:
                out.append((node.lineno, package[:len(package) - node.level + 1][0]))
            continue
        if isinstance(node, ast.ImportFrom):
            modules = [node.module or ""]
        elif isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        else:
            continue
        for module in modules:
            top, _, rest = module.partition(".")
            if top == "spotline":
                sub = rest.partition(".")[0]
                out.append((node.lineno, sub if sub in LAYERS else "spotline"))
            elif top in LAYERS:  # `import common.x`: a second identity of the same file
                out.append((node.lineno, f"{top} (imported as {top}, not spotline.{top})"))
    return out


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layers_import_downward(layer: str) -> None:
    files = sorted((ROOT / layer).rglob("*.py"))
    assert files, f"no Python files under {layer}/"
    upward = [f"{path.relative_to(ROOT)}:{line} imports {target}"
              for path in files for line, target in _imported_layers(path, layer)
              if target not in ALLOWED[layer]]
    assert not upward, "upward imports:\n" + "\n".join(upward)
