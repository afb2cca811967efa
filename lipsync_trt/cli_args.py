"""argparse options shared by the commands that load a backend (`generate`, `serve`)."""
from __future__ import annotations

import argparse


def add_backend_args(p: argparse.ArgumentParser) -> None:
    """--backend, --device, --precision, --engines: which runtime runs the networks, where, and from what."""
    from .backends import NAMES   # (imports no optional runtime)

    p.add_argument("--backend", default="auto", choices=["auto", *NAMES],
                   help="runtime (default auto: TensorRT engines on CUDA, else torch on CUDA, else Core ML on macOS, "
                        "else ONNX Runtime when installed, else torch); `python -m lipsync_trt info` lists what is "
                        "usable here")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="model precision (fp16/bf16 need CUDA or an fp16 engine; default fp32)")
    p.add_argument("--engines", metavar="DIR", default=None,
                   help="folder of built engines/ONNX from `python -m lipsync_trt.build` (default: engines/ for "
                        "TensorRT, the cache folder for ONNX Runtime; built there when missing)")
