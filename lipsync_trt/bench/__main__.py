"""python -m lipsync_trt.bench (see lipsync_trt.bench.cli)."""
import sys

from .cli import main

sys.exit(main())
