"""python -m lipsync_trt.bench [BENCHMARK] [options] (see lipsync_trt.bench.commands; offline: lipsync_trt.bench.cli)."""
import sys

from ..errors import run_command


def _main() -> int:
    from .commands import main   # (torch: inside run_command, so a signal while it loads ends the run in one line)

    return main()


sys.exit(run_command(_main))
