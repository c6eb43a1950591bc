"""The package's architecture, checked on the source: every featshard import (imports inside functions included, the
`if TYPE_CHECKING:` ones too) goes from a layer to itself or a layer before it, no two modules import each other
(directly or through others), and `store` imports no torch, PIL or faiss.

    base (errors, logs, options, system)  <-  store  <-  extract  <-  index  <-  runner  <-  tools  <-  api, cli
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "featshard"
LAYERS = {"base": 0, "store": 1, "extract": 2, "index": 3, "runner": 4, "tools": 5, "top": 6}
TOP = {"featshard", "featshard.api", "featshard.cli", "featshard.__main__"}
BASE = {"featshard.errors", "featshard.logs", "featshard.options", "featshard.system"}
HEAVY = ("torch", "torchvision", "PIL", "faiss")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(name: str) -> int:
    if name in TOP:
        return LAYERS["top"]
    if name in BASE:
        return LAYERS["base"]
    sub = name.split(".")[1]
    if sub not in LAYERS:
        raise AssertionError(f"{name} belongs to no layer: put it in a layer package or add it to BASE/TOP")
    return LAYERS[sub]


def imports(path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported featshard module, line) for every import statement anywhere in the file."""
    out: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "featshard"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "featshard":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                if sub in known:
                    out.append((sub, node.lineno))
                elif not (node.module == "featshard" and alias.name == "__version__"):
                    out.append((node.module, node.lineno))
    return out


def graph() -> dict[str, list[tuple[str, int]]]:
    mods = modules()
    return {name: [(m, line) for m, line in imports(path, set(mods)) if m != name] for name, path in mods.items()}


def test_every_import_goes_down_the_layers() -> None:
    wrong = [f"{src} (line {line}) imports {dst}: {_layer_name(src)} may not import {_layer_name(dst)}"
             for src, deps in graph().items() for dst, line in deps if layer(dst) > layer(src)]
    assert not wrong, "\n".join(wrong)


def _layer_name(name: str) -> str:
    return next(k for k, v in LAYERS.items() if v == layer(name))


def test_no_import_cycles() -> None:
    edges = {src: {dst for dst, _ in deps} for src, deps in graph().items()}
    cycles = [c for c in _strongly_connected(edges) if len(c) > 1]
    assert not cycles, f"import cycles: {cycles}"


def _strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative enough for a package this size)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


@pytest.mark.parametrize("name", sorted(n for n in modules() if n.startswith("featshard.store")))
def test_store_imports_no_torch_pil_or_faiss(name: str) -> None:
    tree = ast.parse(modules()[name].read_text(encoding="utf-8"))
    found = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    found |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
              and node.module and node.level == 0}
    assert not found & set(HEAVY), f"{name} imports {sorted(found & set(HEAVY))}"


def test_the_checker_sees_a_wrong_import(tmp_path: Path) -> None:
    """The checks above would fail on a store module importing the runner, or two modules importing each other."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from featshard.runner import worker\n    import featshard.index.merge\n")
    found = imports(bad, set(modules()))
    assert ("featshard.runner.worker", 2) in found and ("featshard.index.merge", 3) in found
    assert layer("featshard.runner.worker") > layer("featshard.store.shards")
    assert [c for c in _strongly_connected({"a": {"b"}, "b": {"a"}, "c": {"a"}}) if len(c) > 1] == [["a", "b"]]
