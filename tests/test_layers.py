"""The package's layers: no import cycle anywhere (the root package, kernels/ and imports inside functions
included), no module importing a layer above its own, and the loader/runner split (runner modules never import
the build or artifact code).

Imports are read from the source (every `import`, including those inside functions, which run later but are
dependencies all the same; `from .. import name` of the root package counts as importing the root), and the
runner split is also checked at run time in a fresh interpreter. The layer order, lowest first (a module may
import modules of its own layer and of the layers below; inside a layer the no-cycle rule applies):

     1. version, errors             nothing of the package
     2. recipe                      the recipe: constants and index arithmetic
     3. tables, runtimes, models,   lookup tables (value/255, feather ramp); optional runtimes; the networks;
        inputs, audio, video,       input limits; audio in, video out, the avatar folder
        avatar
     4. kernels                     the Triton compositing kernels (recipe + tables, never compose)
     5. compose, demo               compositing and the template cache; the synthetic avatar and weights
     6. build, artifacts, backends  the loader (build, artifacts) below the runner registry
     7. batcher, pipeline, stream,  the cores: many clients -> one model call, the offline pipeline, the live
        timeline, live              stream and the 25 fps timeline (its slots and speech rule, the clocked stream)
     8. api                         LipSync
     9. the root package, cli_args, the public surface; shared CLI options; compare
        compare
    10. serve                       the transport (serve/webrtc.py included): never imports distributed
    11. distributed, pipecat        Ray over serve and the core; the Pipecat service (in-process or over serve)
    12. bench                       every benchmark
    13. __main__                    the command line, where serve and distributed are both known (serve --ray)

docs/ARCHITECTURE.md shows the same order.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "lipsync_trt"
KERNELS = REPO / "kernels"          # installed as lipsync_trt.kernels (setup.py's package_dir)
RUNNER_MODULES = ("base", "pytorch", "onnxruntime", "tensorrt", "coreml")
LOADER = ("lipsync_trt.build", "lipsync_trt.artifacts")   # the loader layer and the builder beneath it
ROOT = "lipsync_trt"
LAYERS = (   # lowest first; names relative to lipsync_trt ("" is the root package); see the docstring
    ("version", "errors"),
    ("recipe",),
    ("tables", "runtimes", "models", "inputs", "audio", "video", "avatar"),
    ("kernels",),
    ("compose", "demo"),
    ("build", "artifacts", "backends"),
    ("batcher", "pipeline", "stream", "timeline", "live"),
    ("api",),
    ("", "cli_args", "compare"),
    ("serve",),
    ("distributed", "pipecat"),
    ("bench",),
    ("__main__",),
)


def _modules() -> dict[str, Path]:
    """Every module of the installed package, by dotted name: lipsync_trt/ and kernels/ (lipsync_trt.kernels)."""
    out = {}
    for root, package in ((PACKAGE, (ROOT,)), (KERNELS, (ROOT, "kernels"))):
        for path in root.rglob("*.py"):
            parts = package + path.relative_to(root).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path], source: str | None = None) -> set[str]:
    """Modules of the package that `name` imports anywhere in its source (resolved to the most specific module;
    a name of the root package, `from .. import __version__`, is an import of the root)."""
    is_package = path.name == "__init__.py"
    found = set()
    tree = ast.parse(path.read_text() if source is None else source, str(path))
    for node in ast.walk(tree):
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
            if (t == ROOT or t.startswith(ROOT + ".")) and t != name:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    """Import edges; importing a.b.c also runs the __init__ of its subpackage a.b, unless the importer is inside
    a.b (then it is already running), and except lipsync_trt's own, which every module runs first (an explicit
    import of the root, `from .. import name`, is an edge all the same)."""
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


def _layer(name: str) -> int:
    """Index in LAYERS of a module (its longest matching entry); KeyError for a module no layer names."""
    rel = name[len(ROOT) + 1:] if name != ROOT else ""
    best = None
    for i, layer in enumerate(LAYERS):
        for entry in layer:
            if (rel == entry or (entry and rel.startswith(entry + "."))) and (best is None or len(entry) > best[1]):
                best = (i, len(entry))
    if best is None:
        raise KeyError(f"{name} is in no layer of tests/test_layers.py: add it to LAYERS (and docs/ARCHITECTURE.md)")
    return best[0]


def test_the_import_reader_sees_function_level_and_root_imports(tmp_path):
    """The reader itself: imports inside functions count (the old cycles hid there), and so does a name taken
    from the root package (build.manifest's `from .. import __version__` closed a cycle through the root)."""
    modules = _modules()
    edges = _imports("lipsync_trt.backends", modules["lipsync_trt.backends"], modules)
    assert "lipsync_trt.artifacts" in edges and "lipsync_trt.backends.base" in edges
    source = ("import numpy\nfrom . import export\n\n\ndef f():\n    from .. import __version__\n"
              "    from ..kernels import available\n    import lipsync_trt.serve.client\n")
    edges = _imports("lipsync_trt.build.manifest", tmp_path / "manifest.py", modules, source)
    assert edges == {"lipsync_trt", "lipsync_trt.build.export", "lipsync_trt.kernels", "lipsync_trt.serve.client"}


def test_kernels_and_the_root_are_in_the_graph():
    graph = _graph()
    assert {"lipsync_trt", "lipsync_trt.kernels", "lipsync_trt.kernels.paste"} <= set(graph)
    assert "lipsync_trt.kernels.prepare" in graph["lipsync_trt.kernels.paste"]
    assert "lipsync_trt.kernels" in graph["lipsync_trt.compose"]


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycle_anywhere():
    """No strongly connected set of modules in the whole package (root, kernels and deferred imports included)."""
    assert _cycles(_graph()) == []


def test_every_module_has_a_layer():
    unplaced = []
    for name in _modules():
        try:
            _layer(name)
        except KeyError:
            unplaced.append(name)
    assert unplaced == []


def test_no_module_imports_a_layer_above_its_own():
    """The order of LAYERS (the docstring's): serve never imports distributed, kernels never compose, nothing below
    the root imports the root, and so on."""
    upward = sorted(f"{name} ({_layer(name) + 1}) imports {t} ({_layer(t) + 1})"
                    for name, edges in _graph().items() for t in edges if _layer(t) > _layer(name))
    assert upward == []


def test_the_layer_order_is_the_documented_one():
    """docs/ARCHITECTURE.md lists the same layers, in the same order."""
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    doc = [line for line in text.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    names = [tuple(n.strip(" `").rstrip("/") for n in row.split("|")[2].split(",")) for row in doc]
    want = [tuple("the root package" if e == "" else e for e in layer) for layer in LAYERS]
    assert names == want


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


@pytest.mark.parametrize("module", ["lipsync_trt.backends", *(f"lipsync_trt.backends.{m}" for m in RUNNER_MODULES)])
@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
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
