"""Core ML packages (`.mlpackage` ML programs) converted with coremltools; conversion works on any OS.

torch.export (batch axis dynamic) -> run_decompositions({}) -> ct.convert(convert_to="mlprogram") with a
flexible batch (ct.RangeDim over the build's MIN..MAX) and float32 inputs/outputs. The generator computes
in fp16 by default (--precision fp32 keeps fp32); the audio encoder always computes in fp32 so the features
match the reference. The same two packages are what an iOS/macOS app would bundle (Xcode compiles a
.mlpackage to .mlmodelc); tensor names and shapes are those of `models.io`.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import BackendError
from ..models.io import AUDIO_ENCODER, BATCH_AXIS, GENERATOR, NetworkIO
from ..runtimes import coremltools as ct

DEPLOYMENT_TARGET = "iOS16"   # ML programs with fp16 compute and flexible shapes: iOS 16 / macOS 13


def convert_probe() -> str | None:
    """None when .mlpackage conversion works here (coremltools importable; any OS), else why not."""
    return ct.reason()


def _convert_one(model: torch.nn.Module, net: NetworkIO, batch: tuple[int, int, int], fp16: bool, path: Path) -> Path:
    import warnings

    lo, opt, hi = batch
    fixed = lo == hi   # a one-size profile: a fixed batch (torch.export cannot trace a dynamic axis of size 1)
    # an example batch inside the profile (and not 1, which torch.export specializes)
    example = tuple(torch.rand(spec.batched(lo if fixed else min(max(2, lo), hi))) for spec in net.inputs)
    dynamic = None if fixed else tuple({BATCH_AXIS: torch.export.Dim("batch", min=lo, max=hi)} for _ in example)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model.eval(), example, dynamic_shapes=dynamic)
        program = program.run_decompositions({})
        rd = lo if fixed else ct.RangeDim(lower_bound=lo, upper_bound=hi, default=opt)
        inputs = [ct.TensorType(name=spec.name, shape=(rd, *spec.shape), dtype=np.float32) for spec in net.inputs]
        mlmodel = ct.convert(program, inputs=inputs, outputs=[ct.TensorType(name=net.output.name, dtype=np.float32)],
                             convert_to="mlprogram",
                             compute_precision=ct.precision.FLOAT16 if fp16 else ct.precision.FLOAT32,
                             minimum_deployment_target=getattr(ct.target, DEPLOYMENT_TARGET))
    mlmodel.short_description = f"lipsync_trt {path.stem} (SyncTalk_2D, mode 'ave')"
    mlmodel.save(str(path))
    return path


def convert(generator: torch.nn.Module, audio_encoder: torch.nn.Module, out_dir: str | os.PathLike,
            precision: str = "fp16", batch: tuple[int, int, int] = (1, 4, 16)) -> tuple[Path, Path]:
    """Write out_dir/generator.mlpackage and out_dir/audio_encoder.mlpackage; return their paths."""
    reason = convert_probe()
    if reason:
        raise BackendError(reason)
    out_dir = Path(out_dir)
    try:
        gen = _convert_one(generator, GENERATOR, batch, precision == "fp16", out_dir / "generator.mlpackage")
        enc = _convert_one(audio_encoder, AUDIO_ENCODER, batch, False, out_dir / "audio_encoder.mlpackage")
    except BackendError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise BackendError(f"Core ML conversion failed (coremltools {ct.__version__}, torch {torch.__version__}): "
                           f"{first}") from exc
    return gen, enc


def describe(path: str | os.PathLike) -> dict:
    """Reload a saved package's spec: {'inputs': {name: (shape, batch range)}, 'outputs': [names], 'type': ...}."""
    reason = convert_probe()
    if reason:
        raise BackendError(reason)
    spec = ct.utils.load_spec(str(path))
    inputs = {}
    for i in spec.description.input:
        arr = i.type.multiArrayType
        ranges = [(r.lowerBound, r.upperBound) for r in arr.shapeRange.sizeRanges]
        inputs[i.name] = {"shape": tuple(arr.shape), "ranges": ranges,
                          "dtype": ct.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(arr.dataType)}
    return {"type": spec.WhichOneof("Type"), "inputs": inputs, "outputs": [o.name for o in spec.description.output],
            "spec_version": spec.specificationVersion}
