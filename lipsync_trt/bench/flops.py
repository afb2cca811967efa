"""FLOPs per frame of the two networks (counted on meta tensors) and the peak GFLOP/s of a large matmul,
for the "% of peak" column."""
from __future__ import annotations

import torch

from .. import recipe as R
from .measure import Stopwatch


def count_flops() -> dict:
    """FLOPs (2 x multiply-adds) per frame for the generator and per window for the audio encoder."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..models import AudioEncoder, Generator

    out = {}
    with torch.device("meta"):   # shapes only: counting costs no arithmetic
        gen, enc = Generator().eval(), AudioEncoder().eval()
        x, a = torch.zeros(1, 6, R.ROI_SIZE, R.ROI_SIZE), torch.zeros(1, *R.FEATURE_SHAPE)
        mel = torch.zeros(1, 1, R.N_MELS, R.MEL_WINDOW)
    with torch.no_grad():
        with FlopCounterMode(display=False) as fc:
            gen(x, a)
        out["generator_per_frame"] = int(fc.get_total_flops())
        with FlopCounterMode(display=False) as fc:
            enc(mel)
        out["audio_encoder_per_window"] = int(fc.get_total_flops())
    out["params_generator"] = sum(p.numel() for p in gen.parameters())
    out["params_audio_encoder"] = sum(p.numel() for p in enc.parameters())
    out["counter"] = "torch.utils.flop_counter.FlopCounterMode (conv/matmul only; 2 FLOPs per multiply-add)"
    return out


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def matmul_peak(device: torch.device, precision: str, quick: bool = False) -> float:
    """Best GFLOP/s of a large square matmul on `device` (TF32 off for fp32)."""
    n = (1024 if quick else 2048) if device.type == "cpu" else 8192
    dtype = _DTYPES[precision] if device.type == "cuda" else torch.float32
    reps = 2 if quick else 3
    old = torch.backends.cuda.matmul.allow_tf32 if device.type == "cuda" else None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    try:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        torch.matmul(a, b)
        best = 0.0
        inner = 1 if device.type == "cpu" else 10
        for _ in range(reps):
            with Stopwatch(device, events=True) as sw:
                for _ in range(inner):
                    torch.matmul(a, b)
            best = max(best, 2 * n ** 3 * inner / sw.best / 1e9)
        return best
    finally:
        if old is not None:
            torch.backends.cuda.matmul.allow_tf32 = old
