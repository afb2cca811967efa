"""Core ML backend: runs the two `.mlpackage` ML programs it is given, through Core ML on macOS.

Converting them is `lipsync_trt.build.coreml` (works on Linux too), finding them `lipsync_trt.artifacts`.
`compute_units` defaults to ALL, which lets Core ML choose the Neural Engine. NOT RUN: the development
machine is Linux, so prediction through this backend has not been executed.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import torch

from ..errors import BackendError
from ..models.io import AUDIO_ENCODER, GENERATOR, NetworkIO
from ..runtimes import coremltools as ct
from .base import Runner


def probe() -> str | None:
    """None when the backend can run here (macOS with coremltools), else the reason."""
    if platform.system() != "Darwin":
        return (f"Core ML runs only on macOS (this is {platform.system()}); "
                "`python -m lipsync_trt.build --target coreml` still converts the packages here")
    return ct.reason()


class CoreMLRunner(Runner):
    """Predicts with the two packages through Core ML (macOS only). Inputs/outputs float32 torch tensors on the CPU."""

    def __init__(self, generator_pkg: Path, encoder_pkg: Path, precision: str, batch: tuple[int, int, int],
                 compute_units: str = "ALL"):
        super().__init__(name="coreml", device=torch.device("cpu"), precision=precision)
        for path in (generator_pkg, encoder_pkg):
            if not Path(path).is_dir():
                raise BackendError(f"{path}: .mlpackage not found")
        units = getattr(ct.ComputeUnit, compute_units)
        self.gen = ct.models.MLModel(str(generator_pkg), compute_units=units)
        self.enc = ct.models.MLModel(str(encoder_pkg), compute_units=units)
        self.max_batch = batch[2]
        self.info = {"packages": [str(generator_pkg), str(encoder_pkg)], "compute_units": compute_units}

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32   # packages take float32; fp16 is the compute precision inside

    def _predict(self, model, net: NetworkIO, *inputs: torch.Tensor) -> torch.Tensor:
        parts = []
        for feeds in net.slices(inputs, self.max_batch):
            arrays = {k: v.detach().cpu().float().contiguous().numpy() for k, v in feeds.items()}
            parts.append(torch.from_numpy(np.asarray(model.predict(arrays)[net.output.name], dtype=np.float32)))
        return torch.cat(parts)

    def encode_audio_impl(self, mel_windows: torch.Tensor) -> torch.Tensor:
        return self._predict(self.enc, AUDIO_ENCODER, mel_windows)

    def generate_impl(self, images: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        return self._predict(self.gen, GENERATOR, images, audio)

    def close_impl(self) -> None:
        self.gen = self.enc = None


def load(generator_pkg: str | os.PathLike, encoder_pkg: str | os.PathLike, device: torch.device,
         precision: str = "fp16", batch: tuple[int, int, int] = (1, 4, 16), compute_units: str = "ALL",
         **_: object) -> CoreMLRunner:
    """A CoreMLRunner for two .mlpackage files; `batch` is the (min, opt, max) profile they were converted for."""
    reason = probe()
    if reason:
        raise BackendError(f"backend 'coreml' is not usable here: {reason}")
    return CoreMLRunner(Path(generator_pkg), Path(encoder_pkg), precision, batch, compute_units)
