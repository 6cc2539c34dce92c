"""The package's shape: no import circles, no private names across module lines, short functions.

Oracle: the import statements themselves, read with `ast` from every module of kvjax/
(module-level and function-local alike: a local import hides a circle, it does not remove
it). Importing `a.b.c` also runs the packages `a.b` and `a`, so an import of a submodule
counts as an import of each enclosing package too (except the importer's own ancestors,
which Python has already started). No JAX is needed: this runs in milliseconds.
"""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "kvjax"


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _imports(name: str, path: pathlib.Path, mods: dict):
    """Yield (imported module, imported name or None) for every kvjax import in a module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "kvjax":
                continue
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                yield (sub, None) if sub in mods else (module, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "kvjax":
                    yield alias.name, None


def _graph():
    mods = _modules()
    edges, private = {}, []
    for name, path in mods.items():
        ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        deps = set()
        for module, attr in _imports(name, path, mods):
            parts = module.split(".")
            for i in range(1, len(parts) + 1):     # the module and every package that encloses it
                m = ".".join(parts[:i])
                if m in mods and m != name and m not in ancestors:
                    deps.add(m)
            if attr is not None and attr.startswith("_") and not attr.startswith("__") and module != name:
                private.append(f"{name} imports {module}.{attr}")
        edges[name] = deps
    return edges, private


def _cycles(edges: dict) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    edges, _ = _graph()
    assert _cycles(edges) == []


def test_no_private_names_across_modules():
    _, private = _graph()
    assert private == []


def test_the_checks_can_fail():
    """The cycle finder and the private-name rule catch what they are meant to catch."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    edges, _ = _graph()
    assert {"kvjax.cache", "kvjax.cache.attend"} <= edges["kvjax.decode.programs"]   # the graph sees real imports


MAX_FUNCTION_LINES = 60   # a function a reader can hold at once; split longer ones into named steps


def test_functions_are_short():
    """No function or method in kvjax/ runs past MAX_FUNCTION_LINES lines (decorators excluded)."""
    long = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} {node.name} ({n} lines)")
    assert long == []


def test_layers_point_down():
    """The bottom of the house imports nothing above it: config and attention math nothing of
    kvjax, the cache package neither the model, the presses, decoding nor the engine."""
    edges, _ = _graph()
    assert edges["kvjax.config"] == set()
    assert edges["kvjax.attention_math"] == set()
    above = ("kvjax.model", "kvjax.attention", "kvjax.press", "kvjax.decode", "kvjax.engine", "kvjax.serve")
    for name, deps in edges.items():
        if name.startswith("kvjax.cache"):
            assert not [d for d in deps if any(d == a or d.startswith(a + ".") for a in above)], name
