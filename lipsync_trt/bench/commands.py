"""`python -m lipsync_trt.bench [BENCHMARK] [options]`: every benchmark of the package, found in its modules.

A module of lipsync_trt.bench is a benchmark when it sets `BENCHMARK = ("name", "one line")` at its top level and
has `main(argv) -> int`: nothing else lists or runs it (the constant is read from the source, so listing imports no
benchmark). Without a name the offline benchmark runs, as `python -m lipsync_trt.bench --demo --quick` always did.
"""
from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

DEFAULT = "offline"


def benchmarks() -> dict[str, tuple[str, str]]:
    """Benchmark name -> (module of lipsync_trt.bench, one line), the default first, then by name."""
    found = {}
    for path in sorted(Path(__file__).parent.glob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8"), str(path)).body:
            if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                    and node.targets[0].id == "BENCHMARK"):
                name, line = ast.literal_eval(node.value)
                found[name] = (path.stem, line)
    return dict(sorted(found.items(), key=lambda kv: (kv[0] != DEFAULT, kv[0])))


def listing() -> str:
    """The benchmarks, one a line, for --help."""
    table = benchmarks()
    width = max(map(len, table))
    rows = [f"  {name:<{width}}  {line}" for name, (_, line) in table.items()]
    return ("benchmarks: python -m lipsync_trt.bench NAME [options] (NAME --help for its options; without a NAME, "
            f"{DEFAULT}):\n" + "\n".join(rows))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark named by the first argument (the default when it names none) with the rest."""
    argv = list(sys.argv[1:] if argv is None else argv)
    table = benchmarks()
    named = bool(argv) and argv[0] in table
    module = importlib.import_module(f"{__package__}.{table[argv[0] if named else DEFAULT][0]}")
    return module.main(argv[1:] if named else argv)
