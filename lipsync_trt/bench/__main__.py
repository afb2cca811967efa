"""python -m lipsync_trt.bench [BENCHMARK] [options] (see lipsync_trt.bench.commands; offline: lipsync_trt.bench.cli)."""
import sys

from .commands import main

sys.exit(main())
