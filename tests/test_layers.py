"""The loader/runner split: runner modules never import the build or artifact code, and no import cycle runs
through the backends, the loader layer or the build package.

Imports are read from the source (every `import`, including those inside functions, which run later but
are dependencies all the same), and checked at run time in a fresh interpreter.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lipsync_trt"
RUNNER_MODULES = ("base", "torch", "onnxruntime", "tensorrt", "coreml")
LOADER = ("lipsync_trt.build", "lipsync_trt.artifacts")   # the loader layer and the builder beneath it
LAYERED = ("lipsync_trt.backends", "lipsync_trt.build", "lipsync_trt.artifacts", "lipsync_trt.runtimes",
           "lipsync_trt.models")


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of the package that `name` imports anywhere in its source (resolved to the most specific module)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:   # `import a.b.c` or `from a.b import attr`: the module that holds it
                t = t.rpartition(".")[0]
            if t.startswith("lipsync_trt.") and t != name:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    """Import edges; importing a.b.c also runs the __init__ of its subpackage a.b, unless the importer is inside
    a.b (then it is already running), and except lipsync_trt's own, which every module runs first."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        edges = _imports(name, path, modules)
        for t in list(edges):
            parts = t.split(".")
            parents = (".".join(parts[:i]) for i in range(2, len(parts)))
            edges.update(p for p in parents if not _in(name, (p,)))   # one's own packages are already running
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _in(name: str, layers: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in layers)


def test_the_import_reader_sees_function_level_imports():
    """The reader itself: imports inside functions count (the old cycle hid there)."""
    modules = _modules()
    edges = _imports("lipsync_trt.backends", modules["lipsync_trt.backends"], modules)
    assert "lipsync_trt.artifacts" in edges and "lipsync_trt.backends.base" in edges


@pytest.mark.parametrize("module", RUNNER_MODULES)
def test_runner_modules_never_import_the_loader_or_build_code(module):
    modules = _modules()
    name = f"lipsync_trt.backends.{module}"
    imported = _imports(name, modules[name], modules)
    assert not [m for m in imported if _in(m, LOADER)], f"{name} imports {sorted(imported)}"


def test_the_registry_reaches_the_loader_layer_only_through_artifacts():
    """backends.load asks lipsync_trt.artifacts; nothing under backends/ imports the build package."""
    graph = _graph()
    for name in (n for n in graph if _in(n, ("lipsync_trt.backends",))):
        assert not [m for m in graph[name] if _in(m, ("lipsync_trt.build",))], name


def test_no_import_cycle_through_backends_loader_or_build():
    cycles = [c for c in _cycles(_graph()) if any(_in(m, LAYERED) for m in c)]
    assert cycles == []


@pytest.mark.parametrize("module", ["lipsync_trt.backends", *(f"lipsync_trt.backends.{m}" for m in RUNNER_MODULES)])
def test_importing_a_backend_loads_no_build_or_artifact_code(module):
    """In a fresh interpreter: importing a runner module (and asking what is available, and 'auto' on the CPU)
    leaves lipsync_trt.build and lipsync_trt.artifacts unimported."""
    code = ("import importlib, json, sys; importlib.import_module(sys.argv[1]); "
            "from lipsync_trt import backends; backends.available(); backends.select('auto', 'cpu'); "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('lipsync_trt'))))")
    proc = subprocess.run([sys.executable, "-c", code, module], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert module in loaded
    assert [m for m in loaded if _in(m, LOADER)] == []
