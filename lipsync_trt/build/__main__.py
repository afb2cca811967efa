"""python -m lipsync_trt.build"""
import sys

from .cli import main

sys.exit(main())
