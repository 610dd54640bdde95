"""The package's import layers: no cycle, and each module imports only from its layer or below.

Walks every module of hwoptim with ``ast`` (imports inside functions count too: a lazy
import is still a dependency). docs/architecture.md draws the same layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import hwoptim

PACKAGE = Path(hwoptim.__file__).parent

#: lowest first; a module may import its own layer and the layers below it
LAYERS: list[tuple[str, ...]] = [
    ("hwoptim._numbers", "hwoptim._warn", "hwoptim._entry_points", "hwoptim._grad_norm", "hwoptim._torch_compat",
     "hwoptim._skips", "hwoptim.compile"),
    ("hwoptim.backends", "hwoptim.backends.*"),
    ("hwoptim._extensions", "hwoptim._window", "hwoptim.clip", "hwoptim.num_items", "hwoptim._precision"),
    ("hwoptim._guard", "hwoptim._binding", "hwoptim._checkpoint", "hwoptim._sharded"),
    ("hwoptim.wrapper",),
    ("hwoptim.amp", "hwoptim.wrapper_dict"),
    ("hwoptim.build", "hwoptim.testing", "hwoptim.testing.*"),
    ("hwoptim._mmengine_log", "hwoptim._mmengine_safe_load"),
    ("hwoptim", "hwoptim.mmengine"),
    ("hwoptim.__main__",),
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The hwoptim modules ``name`` imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if full in modules else base)
    return {m for m in out if m in modules and m != name}


def _layer(name: str) -> int:
    for index, layer in enumerate(LAYERS):
        for pattern in layer:
            if name == pattern or (pattern.endswith(".*") and name.startswith(pattern[:-1])):
                return index
    raise AssertionError(f"{name} is in no layer: add it to LAYERS (and docs/architecture.md)")


GRAPH = {name: _imports(name, path, _modules()) for name, path in _modules().items()}


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_a_module_imports_only_its_layer_and_below(module: str) -> None:
    upward = sorted(m for m in GRAPH[module] if _layer(m) > _layer(module))
    assert not upward, f"{module} (layer {_layer(module)}) imports {upward} from above it"


def test_the_package_has_no_import_cycle() -> None:
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(module):], module]))
        if module in done:
            return
        for imported in sorted(GRAPH[module]):
            visit(imported, [*path, module])
        done.add(module)

    for module in sorted(GRAPH):
        visit(module, [])


def test_the_core_never_imports_the_mmengine_bridge() -> None:
    importers = sorted(m for m, imported in GRAPH.items() if "hwoptim.mmengine" in imported)
    assert importers == [], importers


def test_the_checks_see_a_cycle_and_an_upward_import() -> None:
    """The walker itself: the old wrapper -> mmengine -> build -> amp -> wrapper circle."""
    graph = {k: set(v) for k, v in GRAPH.items()}
    graph["hwoptim.wrapper"].add("hwoptim.mmengine")
    assert _layer("hwoptim.mmengine") > _layer("hwoptim.wrapper")
    seen: list[str] = []

    def reaches(start: str, goal: str) -> bool:
        stack = list(graph[start])
        while stack:
            module = stack.pop()
            if module == goal:
                return True
            if module not in seen:
                seen.append(module)
                stack.extend(graph[module])
        return False

    assert reaches("hwoptim.wrapper", "hwoptim.wrapper")
