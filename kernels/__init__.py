"""Fused compositing kernels in Triton (RECIPE §6-7): `prepare` and `paste` for a batch of frames.

    from lipsync_trt import kernels
    if kernels.available() is None:
        inputs, crops328 = kernels.prepare(frames, boxes, torch.float16)   # frames (B, H, W, 3) uint8 BGR
        ...
        kernels.paste(frames, crops328, pred, boxes)                        # in place

Same results as `lipsync_trt.compose.prepare` / `.paste` (the PyTorch oracle): the bicubic resizes are
reproduced operation for operation in float32, so they are bit-identical wherever the hardware rounds
like IEEE (the spec allows +-1 on at most 0.1 % of pixels). Kernels launch on torch's current CUDA stream.

Triton is optional (`pip install lipsync_trt[gpu]`): it is imported on first use, so importing this package
never fails; `available()` says why the kernels cannot run. With TRITON_INTERPRET=1 in the environment
(or `interpret=True`) the kernels run on CPU tensors through Triton's interpreter (slow; for tests/CI).
Interpreted and compiled kernels are separate module objects, so both can be used in one process.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
import threading
import types
from typing import Optional

import torch

from .. import recipe as R
from ..tables import feather_ramp, unit_lut

CROP, ROI, OFF, MASK_RECT = R.CROP_SIZE, R.ROI_SIZE, R.ROI_OFFSET, R.MASK_RECT   # the recipe's, imported (§6)

# Tiles (BY, BX, num_warps); each program covers BY x BX pixels x 4 channel lanes (the 4th masked).
# GPU values are NOT tuned by measurement yet: chosen so that ptxas (sm_90a) reports no register spills
# (prepare 4x32: 80 registers, paste 8x32: 96 registers; 16x32 with 4 warps spills).
GPU_PREPARE_TILE = (4, 32, 4)
GPU_PASTE_TILE = (8, 32, 4)
INTERP_TILE = (128, 512, 1)  # the interpreter is fastest with few big tiles

_lock = threading.Lock()
_modules: dict[bool, types.SimpleNamespace] = {}


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _triton_reason() -> Optional[str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton is not importable ({type(exc).__name__}: {exc}); install it with pip install 'lipsync_trt[gpu]'"
    return None


def available(interpret: Optional[bool] = None) -> Optional[str]:
    """None when the kernels can run here (Triton + CUDA, or interpreter mode), else the reason why not."""
    reason = _triton_reason()
    if reason:
        return reason
    if _interpret_env() if interpret is None else interpret:
        return None
    if not torch.cuda.is_available():
        return ("no CUDA device for the Triton kernels (set TRITON_INTERPRET=1 to run them on CPU tensors "
                "through Triton's interpreter, slowly)")
    return None


def _load(interpret: bool) -> types.SimpleNamespace:
    """Import prepare.py / paste.py with @triton.jit in the requested mode (cached per mode).

    triton.jit decides between compiled and interpreted functions when the decorator runs (from
    triton.knobs.runtime.interpret, i.e. TRITON_INTERPRET), so each mode gets its own module objects,
    imported from this folder into a synthetic package per mode (lipsync_trt.kernels._compiled /
    ._interpreted), where paste's `from .prepare import` resolves to the same mode. (Importing them as
    lipsync_trt.kernels.prepare would also replace the `prepare` launcher attribute of this package.)
    """
    with _lock:
        if interpret in _modules:
            return _modules[interpret]
        reason = _triton_reason()
        if reason:
            raise RuntimeError(reason)
        import triton

        name = f"{__name__}._{'interpreted' if interpret else 'compiled'}"
        pkg = sys.modules.get(name)
        if pkg is None:
            pkg = types.ModuleType(name, f"Triton kernels of {__name__}, {'interpreted' if interpret else 'compiled'}")
            pkg.__path__ = list(__path__)
            pkg.__package__ = name
            sys.modules[name] = pkg
        with _jit_mode(triton, interpret):
            prep = importlib.import_module(name + ".prepare")
            paste_mod = importlib.import_module(name + ".paste")
        ns = types.SimpleNamespace(prepare=prep, paste=paste_mod, interpret=interpret)
        _modules[interpret] = ns
        return ns


@contextlib.contextmanager
def _jit_mode(triton, interpret: bool):
    """Make @triton.jit produce interpreted (True) or compiled (False) functions, then restore the setting."""
    knobs = getattr(getattr(triton, "knobs", None), "runtime", None)
    if knobs is not None and hasattr(knobs, "scope"):           # triton >= 3.4
        with knobs.scope():
            knobs.interpret = interpret
            yield
        return
    old = os.environ.get("TRITON_INTERPRET")                      # older triton reads the environment
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def _mode(tensors, interpret: Optional[bool]) -> types.SimpleNamespace:
    interp = _interpret_env() if interpret is None else bool(interpret)
    reason = available(interp)
    if reason:
        raise RuntimeError(f"lipsync_trt.kernels cannot run: {reason}")
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"lipsync_trt.kernels: tensors must be on one device, got {sorted(map(str, devices))}")
    if not interp and tensors[0].device.type != "cuda":
        raise RuntimeError(f"lipsync_trt.kernels: tensors must be on a CUDA device, got {tensors[0].device} "
                           "(or run under TRITON_INTERPRET=1 / interpret=True)")
    return _load(interp)


def _on_device(mods: types.SimpleNamespace, t: torch.Tensor):
    """Launch on the tensors' GPU (Triton launches on torch's current device and stream)."""
    return contextlib.nullcontext() if mods.interpret else torch.cuda.device(t.device)


def _launch_opts(interp: bool, num_warps: int = 4) -> dict:
    # no FMA contraction: the float32 taps and sums must round exactly like the PyTorch oracle
    return {} if interp else {"num_warps": num_warps, "enable_fp_fusion": False}


def _check_frames(frames: torch.Tensor) -> None:
    if not isinstance(frames, torch.Tensor) or frames.dim() != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        got = f"{tuple(frames.shape)} {frames.dtype}" if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise ValueError(f"frames must be a uint8 tensor (B, H, W, 3), got {got}")


def _boxes(boxes, frames: torch.Tensor) -> tuple[torch.Tensor, Optional[tuple[int, int]]]:
    """int32 (B, 4) boxes on the frames' device, and (max h, max w) when they were on the host (no sync)."""
    b = boxes if isinstance(boxes, torch.Tensor) else torch.as_tensor(boxes)
    if b.dim() != 2 or b.shape != (frames.shape[0], 4):
        raise ValueError(f"boxes must be (B, 4) = ({frames.shape[0]}, 4) as (x1, y1, x2, y2), got {tuple(b.shape)}")
    if b.dtype.is_floating_point or b.dtype == torch.bool:
        raise ValueError(f"boxes must be integers, got {b.dtype}")
    extent = None
    if b.device.type == "cpu":
        H, W = frames.shape[1], frames.shape[2]
        x1, y1, x2, y2 = (b[:, k] for k in range(4))
        ok = (x1 >= 0) & (y1 >= 0) & (x2 <= W) & (y2 <= H) & (x2 > x1) & (y2 > y1)
        if not bool(ok.all()):
            i = int((~ok).nonzero()[0, 0])
            raise ValueError(f"box {i} {tuple(int(v) for v in b[i])} must satisfy 0 <= x1 < x2 <= {W}, "
                             f"0 <= y1 < y2 <= {H} (x1, y1, x2, y2 exclusive ends)")
        extent = (int((y2 - y1).max()), int((x2 - x1).max())) if b.shape[0] else (0, 0)
    return b.to(device=frames.device, dtype=torch.int32).contiguous(), extent


def prepare(frames: torch.Tensor, boxes, dtype: torch.dtype = torch.float32, *,
            out: Optional[tuple[torch.Tensor, torch.Tensor]] = None, interpret: Optional[bool] = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames (B, H, W, 3) uint8 BGR + boxes (B, 4) int (x1, y1, x2, y2) -> (inputs (B, 6, 320, 320) in
    dtype, [roi, masked] / 255, BGR NCHW; crops328 (B, 328, 328, 3) uint8).

    One kernel launch computes both outputs (bicubic to 328, inner 320 crop, mask, /255, NCHW, dtype).
    `out` may give preallocated contiguous (inputs, crops328) tensors (e.g. for CUDA graphs). Boxes on the
    host are validated; boxes already on the GPU are trusted (no synchronisation).
    """
    _check_frames(frames)
    mods = _mode([frames] + list(out or ()), interpret)
    B = frames.shape[0]
    bx, _ = _boxes(boxes, frames)
    if out is None:
        inputs = torch.empty((B, 6, ROI, ROI), dtype=dtype, device=frames.device)
        crops = torch.empty((B, CROP, CROP, 3), dtype=torch.uint8, device=frames.device)
    else:
        inputs, crops = out
        if (inputs.shape != (B, 6, ROI, ROI) or not inputs.is_contiguous() or inputs.dtype != dtype
                or crops.shape != (B, CROP, CROP, 3) or crops.dtype != torch.uint8 or not crops.is_contiguous()):
            raise ValueError("out must be contiguous (inputs (B, 6, 320, 320) in dtype, crops (B, 328, 328, 3) uint8)")
    if B == 0:
        return inputs, crops
    lut = unit_lut(frames.device, dtype)   # the one value/255 table (lipsync_trt.tables)
    by, bx_, nw = INTERP_TILE if mods.interpret else GPU_PREPARE_TILE
    mx, my, mw, mh = MASK_RECT
    grid = (_cdiv(CROP, bx_), _cdiv(CROP, by), B)
    with _on_device(mods, frames):
        mods.prepare.prepare_kernel[grid](
            frames, bx, lut, inputs, crops,
            frames.stride(0), frames.stride(1), frames.stride(2), frames.stride(3),
            bx.stride(0), bx.stride(1),
            CROP=CROP, OFF=OFF, ROI=ROI,
            MASK_X0=mx, MASK_X1=mx + mw - 1, MASK_Y0=my, MASK_Y1=my + mh - 1,
            BY=by, BX=bx_, **_launch_opts(mods.interpret, nw))
    return inputs, crops


def paste(frames: torch.Tensor, crops328: torch.Tensor, pred: torch.Tensor, boxes, *,
          max_box: Optional[tuple[int, int]] = None, interpret: Optional[bool] = None,
          feather: int = 0) -> torch.Tensor:
    """Composite generator outputs pred (B, 3, 320, 320) float in [0, 1] into frames (B, H, W, 3) uint8, in place.

    One kernel launch: truncate pred * 255 to uint8, place it in crops328[4:324, 4:324] (virtually; crops328
    is not modified), bicubic 328 -> each box's (h, w), write into frames[b, y1:y2, x1:x2]. The launch grid
    covers the largest box: taken from host boxes, from `max_box` = (h, w) when given, else the frame size
    (boxes on the GPU are not read back). feather > 0 blends into what the frames hold under each box with
    the ramp of `lipsync_trt.tables.feather_ramp` (the float32 alpha table every path reads) instead of overwriting.
    """
    _check_frames(frames)
    B = frames.shape[0]
    if crops328.shape != (B, CROP, CROP, 3) or crops328.dtype != torch.uint8:
        raise ValueError(f"crops328 must be uint8 ({B}, 328, 328, 3), got {tuple(crops328.shape)} {crops328.dtype}")
    if pred.shape != (B, 3, ROI, ROI) or not pred.dtype.is_floating_point:
        raise ValueError(f"pred must be float ({B}, 3, 320, 320), got {tuple(pred.shape)} {pred.dtype}")
    mods = _mode([frames, crops328, pred], interpret)
    bx, extent = _boxes(boxes, frames)
    if B == 0:
        return frames
    crops328 = crops328.contiguous()
    alpha = _feather_table(feather, frames.device)
    ext_h, ext_w = max_box or extent or (frames.shape[1], frames.shape[2])
    by, bx_, nw = INTERP_TILE if mods.interpret else GPU_PASTE_TILE
    grid = (_cdiv(max(ext_w, 1), bx_), _cdiv(max(ext_h, 1), by), B)
    with _on_device(mods, frames):
        mods.paste.paste_kernel[grid](
            frames, bx, pred, crops328, alpha,
            frames.stride(0), frames.stride(1), frames.stride(2), frames.stride(3),
            bx.stride(0), bx.stride(1),
            pred.stride(0), pred.stride(1), pred.stride(2), pred.stride(3),
            CROP=CROP, OFF=OFF, ROI=ROI, BY=by, BX=bx_, FEATHER=int(feather),
            **_launch_opts(mods.interpret, nw))
    return frames


_feather_tables: dict = {}


def _feather_table(feather: int, device: torch.device) -> torch.Tensor:
    """tables.feather_ramp(feather) on the device (one float32 placeholder when feather is 0)."""
    if isinstance(feather, bool) or not isinstance(feather, int) or feather < 0:
        raise ValueError(f"feather must be a whole number of pixels >= 0 (0 = no blending), got {feather!r}")
    key = (feather, device)
    table = _feather_tables.get(key)
    if table is None:
        ramp = feather_ramp(feather) if feather else [0.0]
        table = torch.tensor(ramp, dtype=torch.float32, device=device)
        _feather_tables[key] = table
    return table


def cubic_taps(pairs, *, interpret: Optional[bool] = None, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' own tap computation for (in, out) size pairs -> indices (P, max_out, 4) int32 and weights
    (P, max_out, 4) float32 (rows past each `out` are unspecified). For tests against compose.cubic_taps."""
    mods = _mode([torch.empty(0, device=device)], interpret)
    sizes = torch.as_tensor(pairs, dtype=torch.int32, device=device).reshape(-1, 2).contiguous()
    maxn = 1 << max(int(sizes[:, 1].max()) - 1, 1).bit_length()
    P = sizes.shape[0]
    idx = torch.zeros((P, maxn, 4), dtype=torch.int32, device=device)
    w = torch.zeros((P, maxn, 4), dtype=torch.float32, device=device)
    pb = 64 if mods.interpret else 1
    with _on_device(mods, idx):
        mods.prepare.taps_kernel[(_cdiv(P, pb),)](sizes, idx, w, P, MAXN=maxn, PB=pb,
                                                        **_launch_opts(mods.interpret))
    return idx, w


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


__all__ = ["available", "prepare", "paste", "cubic_taps", "CROP", "ROI", "OFF", "MASK_RECT"]
