"""python -m lipsync_trt.build : export ONNX, check it, and build TensorRT engines / Core ML packages.

    python -m lipsync_trt.build --generator G.pth --audio-encoder A.pth --target onnx|tensorrt|coreml|all
                                [--precision fp32|fp16] [--batch MIN:OPT:MAX] [--out engines/] [--force]
    python -m lipsync_trt.build --demo --target onnx         # seeded random (untrained) weights

Steps (one line each, with timings): load + verify checkpoints -> export ONNX (both models, dynamic
batch, one self-contained file each) -> onnx.checker + ONNX Runtime vs PyTorch fp32 on random and
real-shaped inputs (the build fails above tolerance) -> engines -> manifest.json.

Modules: `export` (ONNX export + structural check), `verify` (ONNX Runtime vs PyTorch), `tensorrt` and
`coreml` (engines from the verified export), `manifest` (the cache key, folder and lookups), `builder`
(the steps above), `cli`. Finding or building what a backend runs is `lipsync_trt.artifacts`; nothing
here imports `lipsync_trt.backends`.
"""
from ..models.io import AUDIO_ENCODER, GENERATOR
from .builder import DEFAULT_BATCH, DEFAULT_OUT, PRECISIONS, TARGETS, build, parse_batch
from .cli import build_parser, main
from .export import OPSET, check_onnx, export_onnx
from .manifest import FORMAT, build_key, find_build, gpu_name, key_hash, read_manifest
from .verify import TOLERANCE, real_shaped_inputs, verify

__all__ = ["AUDIO_ENCODER", "DEFAULT_BATCH", "DEFAULT_OUT", "FORMAT", "GENERATOR", "OPSET", "PRECISIONS", "TARGETS",
           "TOLERANCE", "build", "build_key", "build_parser", "check_onnx", "export_onnx", "find_build", "gpu_name",
           "key_hash", "main", "parse_batch", "read_manifest", "real_shaped_inputs", "verify"]
