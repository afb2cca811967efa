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
import importlib
import sys
import types

_WHERE = {"AUDIO_ENCODER": "..models.io", "GENERATOR": "..models.io",
          "DEFAULT_BATCH": ".builder", "DEFAULT_OUT": ".builder", "PRECISIONS": ".builder", "TARGETS": ".builder",
          "build": ".builder", "parse_batch": ".builder", "build_parser": ".cli", "main": ".cli",
          "OPSET": ".export", "check_onnx": ".export", "export_onnx": ".export",
          "FORMAT": ".manifest", "build_key": ".manifest", "find_build": ".manifest", "gpu_name": ".manifest",
          "key_hash": ".manifest", "read_manifest": ".manifest",
          "TOLERANCE": ".verify", "real_shaped_inputs": ".verify", "verify": ".verify"}


def __getattr__(name: str):
    """The names below, imported at first use: `python -m lipsync_trt.build` runs this file before its CLI, which
    must handle signals before torch loads (errors.run_command)."""
    if name not in _WHERE:
        raise AttributeError(f"module 'lipsync_trt.build' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name], __name__), name)


class _Package(types.ModuleType):
    """This package, whose exported names stay the functions when a submodule of the same name is imported (the
    import system sets `lipsync_trt.build.verify` to the module verify.py, which would hide the function verify)."""

    def __setattr__(self, name: str, value) -> None:
        if name in _WHERE and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__all__ = ["AUDIO_ENCODER", "DEFAULT_BATCH", "DEFAULT_OUT", "FORMAT", "GENERATOR", "OPSET", "PRECISIONS", "TARGETS",
           "TOLERANCE", "build", "build_key", "build_parser", "check_onnx", "export_onnx", "find_build", "gpu_name",
           "key_hash", "main", "parse_batch", "read_manifest", "real_shaped_inputs", "verify"]
