"""The top-level packages are layers that import one way, bottom to top:

    recipes <- preprocessing <- training <- conversion <- evaluation <- benchmarks <- launch

A module may import its own package and the packages below it, never one above. Every import
counts: module level, inside functions, and `importlib.import_module("qwen_pretrain...")` with
a literal name. Product code never calls test helpers (names ending in `_for_tests`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LAYERS = ("recipes", "preprocessing", "training", "conversion", "evaluation", "benchmarks", "launch")
RANK = {name: i for i, name in enumerate(LAYERS)}
ROOT = Path(__file__).resolve().parents[1]


def _product_modules() -> list[Path]:
    return sorted(p for layer in LAYERS for p in (ROOT / layer).rglob("*.py"))


def _imported_modules(tree: ast.AST, module: str) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in `tree`, relative ones resolved against `module`."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")[: -node.level]
                base = ".".join([*parent, base] if base else parent)
            found.append((node.lineno, base))
            # `from qwen_pretrain import training` imports the package `training`
            if base == "qwen_pretrain":
                found += [(node.lineno, f"qwen_pretrain.{alias.name}") for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def _layer_of(dotted: str) -> str | None:
    parts = dotted.split(".")
    if len(parts) >= 2 and parts[0] == "qwen_pretrain" and parts[1] in RANK:
        return parts[1]
    return None


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["qwen_pretrain", *parts])


def package_imports() -> dict[str, dict[str, list[str]]]:
    """{importing layer: {imported layer: ["file:line", ...]}} over all product modules."""
    graph: dict[str, dict[str, list[str]]] = {layer: {} for layer in LAYERS}
    for path in _product_modules():
        module = _module_name(path)
        src_layer = _layer_of(module)
        tree = ast.parse(path.read_text(), filename=str(path))
        for line, dotted in _imported_modules(tree, module):
            dst = _layer_of(dotted)
            if dst and dst != src_layer:
                graph[src_layer].setdefault(dst, []).append(f"{path.relative_to(ROOT)}:{line}")
    return graph


def test_layers_import_downward_only() -> None:
    upward = [
        f"{where} ({src} imports {dst}, a layer above it)"
        for src, targets in package_imports().items()
        for dst, places in targets.items()
        if RANK[dst] > RANK[src]
        for where in places
    ]
    assert not upward, "imports against the layer order " + " <- ".join(LAYERS) + ":\n" + "\n".join(upward)


def test_no_cycle_between_packages() -> None:
    graph = {src: set(targets) for src, targets in package_imports().items()}
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path, node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, node])):
                return cycle
        state[node] = 2
        return None

    for layer in LAYERS:
        if layer not in state and (cycle := visit(layer, [])):
            pytest.fail("import cycle between packages: " + " -> ".join(cycle))


def test_product_code_uses_no_test_helpers() -> None:
    uses = []
    for path in _product_modules():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            name = None
            if isinstance(node, ast.Name):
                name = node.id
            elif isinstance(node, ast.Attribute):
                name = node.attr
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = node.name
            elif isinstance(node, ast.alias):
                name = node.asname or node.name.rsplit(".", 1)[-1]
            if name and name.endswith("_for_tests"):
                uses.append(f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')} {name}")
    assert not uses, "product code defines or uses test helpers:\n" + "\n".join(uses)


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    """The walk must find an import nested in a function (a lazy import counts like any other)."""
    tree = ast.parse(
        "def f():\n    from qwen_pretrain.launch import cli\n"
        "def g():\n    import importlib\n    importlib.import_module('qwen_pretrain.benchmarks.cli')\n"
    )
    found = {dotted for _, dotted in _imported_modules(tree, "qwen_pretrain.recipes.x")}
    assert {"qwen_pretrain.launch", "qwen_pretrain.benchmarks.cli"} <= found
