"""Core ML backend: `.mlpackage` ML programs converted with coremltools, run on macOS.

Conversion (`convert`, used by `python -m lipsync_trt.build --target coreml`) works on Linux too:
torch.export (batch axis dynamic) -> run_decompositions({}) -> ct.convert(convert_to="mlprogram") with a
flexible batch (ct.RangeDim over the build's MIN..MAX) and float32 inputs/outputs. The generator computes
in fp16 by default (--precision fp32 keeps fp32); the audio encoder always computes in fp32 so the features
match the reference. The same two packages are what an iOS/macOS app would bundle (Xcode compiles a
.mlpackage to .mlmodelc; inputs `images` (B,6,320,320) and `audio` (B,32,16,16) -> `output` (B,3,320,320),
`mel` (B,1,80,16) -> `features` (B,512)).

Running needs macOS (Core ML itself); `compute_units` defaults to ALL, which lets Core ML choose the
Neural Engine. NOT RUN: the development machine is Linux, so prediction through this backend has not been
executed; conversion, save and reload of the spec are tested.
"""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch

from ..errors import BackendError
from .base import Runner

DEPLOYMENT_TARGET = "iOS16"   # ML programs with fp16 compute and flexible shapes: iOS 16 / macOS 13


def _import():
    import logging

    ct_logger = logging.getLogger("coremltools")
    level = ct_logger.level
    if platform.system() != "Darwin" and "coremltools" not in sys.modules:
        # on Linux the import warns that the Core ML runtime proxies are absent (by design: conversion only)
        ct_logger.setLevel(logging.ERROR)
    try:
        import coremltools as ct
    except ImportError:
        return None, "coremltools is not installed (pip install 'lipsync_trt[coreml]')"
    except Exception as exc:   # coremltools' native parts can fail to import on unsupported platforms
        return None, f"coremltools is not usable: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}"
    finally:
        ct_logger.setLevel(level)
    return ct, None


def convert_probe() -> str | None:
    """None when .mlpackage conversion works here (coremltools importable; any OS), else why not."""
    return _import()[1]


def probe() -> str | None:
    """None when the backend can run here (macOS with coremltools), else the reason."""
    if platform.system() != "Darwin":
        return (f"Core ML runs only on macOS (this is {platform.system()}); "
                "`python -m lipsync_trt.build --target coreml` still converts the packages here")
    return convert_probe()


def _convert_one(ct, model: torch.nn.Module, example: tuple[torch.Tensor, ...], names: tuple[str, ...],
                 output: str, batch: tuple[int, int, int], fp16: bool, path: Path):
    import warnings

    lo, opt, hi = batch
    fixed = lo == hi   # a one-size profile: a fixed batch (torch.export cannot trace a dynamic axis of size 1)
    if fixed:
        example = tuple(e[:1].expand(lo, *e.shape[1:]).contiguous() for e in example)
        dynamic = None
    else:
        dim = torch.export.Dim("batch", min=lo, max=hi)
        dynamic = tuple({0: dim} for _ in example)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model.eval(), example, dynamic_shapes=dynamic)
        program = program.run_decompositions({})
        rd = lo if fixed else ct.RangeDim(lower_bound=lo, upper_bound=hi, default=opt)
        inputs = [ct.TensorType(name=n, shape=(rd, *e.shape[1:]), dtype=np.float32) for n, e in zip(names, example)]
        mlmodel = ct.convert(program, inputs=inputs, outputs=[ct.TensorType(name=output, dtype=np.float32)],
                             convert_to="mlprogram",
                             compute_precision=ct.precision.FLOAT16 if fp16 else ct.precision.FLOAT32,
                             minimum_deployment_target=getattr(ct.target, DEPLOYMENT_TARGET))
    mlmodel.short_description = f"lipsync_trt {path.stem} (SyncTalk_2D, mode 'ave')"
    mlmodel.save(str(path))
    return path


def convert(generator: torch.nn.Module, audio_encoder: torch.nn.Module, out_dir: str | os.PathLike,
            precision: str = "fp16", batch: tuple[int, int, int] = (1, 4, 16)) -> tuple[Path, Path]:
    """Write out_dir/generator.mlpackage and out_dir/audio_encoder.mlpackage; return their paths."""
    from .. import build as B

    ct, reason = _import()
    if reason:
        raise BackendError(reason)
    out_dir = Path(out_dir)
    b = min(max(2, batch[0]), batch[2])   # an example batch inside the profile (and not 1, which torch.export specializes)
    gen_example = (torch.rand(b, *B.GEN_SHAPES["images"]), torch.rand(b, *B.GEN_SHAPES["audio"]))
    enc_example = (torch.rand(b, *B.ENC_SHAPE),)
    try:
        gen = _convert_one(ct, generator, gen_example, B.GEN_INPUTS, B.GEN_OUTPUT, batch, precision == "fp16",
                           out_dir / "generator.mlpackage")
        enc = _convert_one(ct, audio_encoder, enc_example, (B.ENC_INPUT,), B.ENC_OUTPUT, batch, False,
                           out_dir / "audio_encoder.mlpackage")
    except BackendError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise BackendError(f"Core ML conversion failed (coremltools {ct.__version__}, torch {torch.__version__}): "
                           f"{first}") from exc
    return gen, enc


def describe(path: str | os.PathLike) -> dict:
    """Reload a saved package's spec: {'inputs': {name: (shape, batch range)}, 'outputs': [names], 'type': ...}."""
    ct, reason = _import()
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


class CoreMLRunner(Runner):
    """Predicts with the two packages through Core ML (macOS only). Inputs/outputs float32 torch tensors on the CPU."""

    def __init__(self, generator_pkg: Path, encoder_pkg: Path, precision: str, batch: tuple[int, int, int],
                 compute_units: str = "ALL"):
        super().__init__(name="coreml", device=torch.device("cpu"), precision=precision)
        ct, reason = _import()
        if reason:
            raise BackendError(reason)
        units = getattr(ct.ComputeUnit, compute_units)
        self.gen = ct.models.MLModel(str(generator_pkg), compute_units=units)
        self.enc = ct.models.MLModel(str(encoder_pkg), compute_units=units)
        self.max_batch = batch[2]
        self.info = {"packages": [str(generator_pkg), str(encoder_pkg)], "compute_units": compute_units}

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32   # packages take float32; fp16 is the compute precision inside

    def _predict(self, model, output: str, **feeds: torch.Tensor) -> torch.Tensor:
        n = self.max_batch
        total = next(iter(feeds.values())).shape[0]
        parts = []
        for i in range(0, total, n):
            arrays = {k: v[i:i + n].detach().cpu().float().contiguous().numpy() for k, v in feeds.items()}
            parts.append(torch.from_numpy(np.asarray(model.predict(arrays)[output], dtype=np.float32)))
        return torch.cat(parts)

    def encode_audio(self, mel_windows: torch.Tensor) -> torch.Tensor:
        return self._predict(self.enc, "features", mel=mel_windows)

    def generate(self, images: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        return self._predict(self.gen, "output", images=images, audio=audio)

    def close(self) -> None:
        self.gen = self.enc = None


def load(generator: str | os.PathLike, audio_encoder: str | os.PathLike, device: torch.device,
         precision: str = "fp16", engines: str | os.PathLike | None = None, batch: str | tuple | None = None,
         compute_units: str = "ALL", **_: object) -> CoreMLRunner:
    """Packages for this checkpoint pair from `engines` (default engines/), converted there first when missing."""
    from .. import build as B

    reason = probe()
    if reason:
        raise BackendError(f"backend 'coreml' is not usable here: {reason}")
    out = engines or B.DEFAULT_OUT
    m = B.find_build(out, generator, audio_encoder, "coreml", precision)
    if m is None:
        m = B.build(generator, audio_encoder, target="coreml", precision=precision, batch=batch, out=out,
                    log=lambda s: print(s, file=sys.stderr, flush=True))
    folder, files = Path(m["dir"]), m["artifacts"]["coreml"]
    b = m["key"]["batch"]
    return CoreMLRunner(folder / files["generator"], folder / files["audio_encoder"], precision,
                        (b["min"], b["opt"], b["max"]), compute_units)
