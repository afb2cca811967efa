"""The one interface every runtime implements (after Polygraphy's loader/runner split).

A runner is handed what it runs (torch modules, an ONNX file, a serialized engine, an .mlpackage) and
never finds or builds it; `lipsync_trt.artifacts` does that. The public calls check their inputs and
state once; subclasses implement only `encode_audio_impl` and `generate_impl`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import BackendError
from ..models.io import AUDIO_ENCODER, GENERATOR


@dataclass
class Runner:
    """A loaded pair of networks on one device; a context manager that closes it on exit.

    `encode_audio`: (N, 1, 80, 16) float32 mel windows -> (N, 512) float32.
    `generate`: (B, 6, 320, 320) images in [0,1] BGR + (B, 32, 16, 16) audio -> (B, 3, 320, 320) in [0,1].
    Inputs may be on any device; outputs are on `self.device`. Results do not depend on batch size.
    """

    name: str
    device: torch.device
    precision: str = "fp32"
    info: dict = field(default_factory=dict)
    closed: bool = field(default=False, init=False)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype generator inputs are best given in (prepare writes this dtype)."""
        return torch.float16 if self.precision == "fp16" else torch.float32

    @property
    def own_cpu_pool(self) -> bool:
        """True when the networks run on this machine's CPU cores in a thread pool of the runtime's own (not
        torch's), so the pipeline keeps torch's helper ops single-threaded (`pipeline.helper_threads`)."""
        return False

    def _check_open(self) -> None:
        if self.closed:
            raise BackendError(f"{self.name} runner is closed")

    def encode_audio(self, mel_windows: torch.Tensor) -> torch.Tensor:
        """Audio features of a batch of mel windows (shapes checked against `models.io.AUDIO_ENCODER`)."""
        self._check_open()
        AUDIO_ENCODER.check(mel_windows)
        return self.encode_audio_impl(mel_windows)

    def generate(self, images: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """Mouth regions for prepared templates and feature windows (shapes checked against `models.io.GENERATOR`)."""
        self._check_open()
        GENERATOR.check(images, audio)
        return self.generate_impl(images, audio)

    def encode_audio_impl(self, mel_windows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def generate_impl(self, images: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        """Release runtime resources (sessions, engines); the runner is unusable afterwards."""
        self.closed = True
        self.close_impl()

    def close_impl(self) -> None:
        """Subclasses drop their sessions/engines here."""

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
