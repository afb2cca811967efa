"""argparse options shared by the commands that load a backend (`generate`, `serve`)."""
from __future__ import annotations

import argparse


def add_backend_args(p: argparse.ArgumentParser) -> None:
    """--backend, --device, --precision, --engines: which runtime runs the networks, where, and from what."""
    from .backends import NAMES   # (imports no optional runtime)

    p.add_argument("--backend", default="auto", choices=["auto", *NAMES],
                   help="runtime (default auto: TensorRT when --engines holds a TensorRT build of these checkpoints and CUDA is there, else torch on CUDA, else Core ML on macOS, "
                        "else ONNX Runtime when installed, else torch); `python -m lipsync_trt info` lists what is "
                        "usable here")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="generator precision (default fp32). fp16/bf16 are for CUDA, where they should halve the "
                        "generator's cost (not measured on a GPU yet); the torch backend also runs them on a CPU "
                        "(slowly: for checking their fidelity with `compare`)")
    p.add_argument("--engines", metavar="DIR", default=None,
                   help="folder of builds from `python -m lipsync_trt.build`. TensorRT: its engines for these "
                        "checkpoints (default engines/; built there when missing). ONNX Runtime: a build of these "
                        "checkpoints found there is used; else ONNX is exported and verified once into the cache "
                        "folder ($LIPSYNC_TRT_CACHE, default ~/.cache/lipsync_trt) and reused from there")


def add_blend_arg(p: argparse.ArgumentParser) -> None:
    """--blend: how the generated box meets the template frame (compose.parse_blend checks the value)."""
    from .compose import DEFAULT_FEATHER

    p.add_argument("--blend", default="none", metavar="none|feather[:PX]",
                   help="none (default): paste the generated box as the reference does, with a hard edge; "
                        f"feather[:PX]: fade it into the template frame over PX pixels inside the box edge (default "
                        f"{DEFAULT_FEATHER}; raised cosine), which hides the seam; outside the box and deeper than PX "
                        "inside it the pixels are the same as with none")
