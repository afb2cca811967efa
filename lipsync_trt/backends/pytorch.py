"""PyTorch backend: eager modules on CPU or CUDA, channels_last, inference_mode, optional fp16/bf16.

It runs what it is given: the two torch modules, or the two checkpoint files (loaded with the strict loaders).
"""
from __future__ import annotations

import os

import torch

from ..errors import BackendError
from ..models import load_audio_encoder, load_generator
from .base import Runner

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def probe() -> str | None:
    """None when usable (always: torch is a core dependency)."""
    return None


class TorchRunner(Runner):
    def __init__(self, generator: torch.nn.Module, audio_encoder: torch.nn.Module, device: torch.device,
                 precision: str = "fp32", compile: str | None = None):
        super().__init__(name="torch", device=device, precision=precision)
        if precision not in PRECISIONS:
            raise BackendError(f"torch backend: unknown precision {precision!r}; expected one of {sorted(PRECISIONS)}")
        self.model_dtype = PRECISIONS[precision]
        self.generator = generator.eval().to(device=device, dtype=self.model_dtype, memory_format=torch.channels_last)
        self.audio_encoder = audio_encoder.eval().to(device)   # tiny; kept fp32 so features match the reference
        if compile:   # torch.compile mode, e.g. "max-autotune" or "reduce-overhead" (CUDA graphs per batch size)
            try:
                self.generator = torch.compile(self.generator, mode=None if compile == "default" else compile)
            except RuntimeError as exc:   # an unknown mode: torch names the valid ones
                raise BackendError(f"torch backend: cannot compile with mode {compile!r}: {exc}") from None
            self.info["compile"] = compile

    @property
    def dtype(self) -> torch.dtype:
        return self.model_dtype

    def encode_audio_impl(self, mel_windows: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.audio_encoder(mel_windows.to(self.device, torch.float32))

    def generate_impl(self, images: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            x = images.to(self.device, self.model_dtype).contiguous(memory_format=torch.channels_last)
            a = audio.to(self.device, self.model_dtype)
            return self.generator(x, a).float()


def load(generator: str | os.PathLike | torch.nn.Module, audio_encoder: str | os.PathLike | torch.nn.Module,
         device: torch.device, precision: str = "fp32", compile: str | None = None, **_: object) -> TorchRunner:
    """A TorchRunner on `device` for two modules or two checkpoint files (optionally torch.compile'd generator)."""
    gen = generator if isinstance(generator, torch.nn.Module) else load_generator(generator)
    enc = audio_encoder if isinstance(audio_encoder, torch.nn.Module) else load_audio_encoder(audio_encoder)
    return TorchRunner(gen, enc, device, precision, compile)
