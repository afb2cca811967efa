"""The lookup tables every compositing path reads (PyTorch, OpenCV and the Triton kernels alike), defined once, below
both `compose` and `kernels`: uint8 value -> value / 255, and the feather blend's alpha ramp."""
from __future__ import annotations

import functools

import numpy as np
import torch


@functools.lru_cache(maxsize=32)
def unit_lut(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(256,) value / 255 for each uint8 value, computed in float64 then cast to dtype (what the reference's
    img / 255.0 then astype gives), on the device. Cached and shared: read it, never write into it."""
    return (torch.arange(256, dtype=torch.float64) / 255.0).to(dtype).to(torch.device(device))


@functools.lru_cache(maxsize=64)
def feather_ramp(px: int) -> np.ndarray:
    """The blend's alpha for edge distances d = 0..px: 0.5 - 0.5 cos(pi d / px), computed in float64 and
    stored as float32 (0 at d = 0, 1 at d = px). Every compositing path looks alpha up in this one table."""
    d = np.arange(px + 1, dtype=np.float64)
    ramp = (0.5 - 0.5 * np.cos(np.pi * d / px)).astype(np.float32)
    ramp[0], ramp[-1] = 0.0, 1.0
    ramp.setflags(write=False)
    return ramp


__all__ = ["feather_ramp", "unit_lut"]
