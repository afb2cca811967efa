"""The one interface every runtime implements (after Polygraphy's loader/runner split)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Runner:
    """A loaded pair of networks on one device. Subclasses implement the two calls.

    `encode_audio`: (N, 1, 80, 16) float32 mel windows -> (N, 512) float32.
    `generate`: (B, 6, 320, 320) images in [0,1] BGR + (B, 32, 16, 16) audio -> (B, 3, 320, 320) in [0,1].
    Inputs may be on any device; outputs are on `self.device`. Results do not depend on batch size.
    """

    name: str
    device: torch.device
    precision: str = "fp32"
    info: dict = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype generator inputs are best given in (prepare writes this dtype)."""
        return torch.float16 if self.precision == "fp16" else torch.float32

    @property
    def own_cpu_pool(self) -> bool:
        """True when the networks run on this machine's CPU cores in a thread pool of the runtime's own (not
        torch's), so the pipeline keeps torch's helper ops single-threaded (`pipeline.helper_threads`)."""
        return False

    def encode_audio(self, mel_windows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def generate(self, images: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        """Release runtime resources (sessions, engines); the runner is unusable afterwards."""
