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



# The names a Transport goes by in the sources (``t``, ``self.t``, ``client.t``, ``transport``).
TRANSPORT_NAMES = {"t", "tr", "transport", "_t", "_transport"}


def _raw_client_uses(source: str, where: str) -> list[tuple[int, str]]:
    """(line, expression) of each ``X.r`` where X is a Transport by its name: the raw
    redis-py client, which skips the Transport's reconnects."""
    out = []
    for node in ast.walk(ast.parse(source, where)):
        if not (isinstance(node, ast.Attribute) and node.attr == "r"):
            continue
        base = node.value
        name = base.id if isinstance(base, ast.Name) else getattr(base, "attr", None)
        if name in TRANSPORT_NAMES:
            out.append((node.lineno, ast.unparse(node)))
    return sorted(out)


def test_only_the_transport_touches_the_redis_client() -> None:
    """Every Redis command goes through a Transport method (and so through ``call``, with its
    reconnects); no module but common/transport.py reaches for the raw client."""
    files = [path for layer in (*sorted(LAYERS), "spotline")
             for path in sorted((ROOT / layer).rglob("*.py"))
             if path != ROOT / "common" / "transport.py"]
    assert len(files) > 50, "the package sources were not found"
    raw = [f"{path.relative_to(ROOT)}:{line} {expr}" for path in files
           for line, expr in _raw_client_uses(path.read_text(encoding="utf-8"), str(path))]
    assert not raw, ("the raw Redis client outside common/transport.py (add a Transport "
                     "method):\n" + "\n".join(raw))


def test_the_raw_client_guard_sees_each_spelling() -> None:
    source = ("t.r.get('k')\nself.t.r.incr('k')\nclient.t.r.xlen('s')\n"
              "transport.r.delete('k')\nr = self.transport.r\ncolour.r + 1\n")
    assert _raw_client_uses(source, "probe.py") == [
        (1, "t.r"), (2, "self.t.r"), (3, "client.t.r"), (4, "transport.r"),
        (5, "self.transport.r")]


def test_the_application_lives_in_packages() -> None:
    """spotline/ holds packages (cli, bench, pipeline, eval, export, ...) and no loose module but
    __init__.py and __main__.py; every folder with Python modules under it is a package."""
    app = ROOT / "spotline"
    loose = sorted(path.name for path in app.glob("*.py")
                   if path.name not in {"__init__.py", "__main__.py"})
    assert not loose, f"modules outside a package in spotline/: {loose}"
    folders = {path.parent for path in app.rglob("*.py")} - {app}
    assert len(folders) >= 5, "the application's packages were not found"
    bare = sorted(str(f.relative_to(ROOT)) for f in folders if not (f / "__init__.py").is_file())
    assert not bare, f"folders of modules without an __init__.py: {bare}"


def test_every_package_is_installed() -> None:
    """Each package folder is in pyproject.toml's packages list (spotline.common is common/,
    ...), so a wheel holds every module the source tree has."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]
    listed = set(config["setuptools"]["packages"])
    found = set()
    for top in ("spotline", *sorted(LAYERS)):
        for init in (ROOT / top).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT).parts
            found.add(".".join(parts if top == "spotline" else ("spotline", *parts)))
    assert found - listed == set(), f"packages missing from pyproject.toml: {found - listed}"
