"""Compositing (RECIPE §6-7): crop -> 328 bicubic -> generator input, and generator output -> frame.

Three implementations of the same steps, picked by where the frames are (`impl="auto"`):
- "triton": the fused GPU kernels of `lipsync_trt.kernels`, for CUDA tensors;
- "opencv": cv2.resize(INTER_CUBIC) itself, the reference's own call, for CPU tensors (much faster than the
  PyTorch gathers on a CPU, and pixel-exact by construction);
- "torch": a PyTorch bicubic that reproduces OpenCV's INTER_CUBIC for uint8 images (half-pixel centres,
  a = -0.75, replicated edges, no antialiasing, float32 taps; equal to OpenCV 4.14 and 5.0 on >= 99.9% of
  pixels, the rest off by 1). It runs on any device and is the oracle for the GPU kernels.
Frames are uint8 (H, W, 3) BGR tensors; boxes are (x1, y1, x2, y2) with x2/y2 exclusive, as slices.
"""
from __future__ import annotations

import functools
import os

import numpy as np
import torch

from . import recipe as R
from .errors import UsageError
from .tables import feather_ramp, unit_lut

DEFAULT_FEATHER = 16   # `--blend feather`'s ramp width in pixels of the output frame
MAX_FEATHER = 1024     # widest ramp accepted (a typo such as feather:99999999999 must not allocate gigabytes)


def cubic_coeffs(fx: np.ndarray) -> np.ndarray:
    """OpenCV's interpolateCubic in float32: the 4 tap weights for fractional offsets fx (n,) -> (n, 4)."""
    a = np.float32(R.CUBIC_A)
    x = fx.astype(np.float32)
    one = np.float32(1)
    c0 = ((a * (x + one) - np.float32(5) * a) * (x + one) + np.float32(8) * a) * (x + one) - np.float32(4) * a
    c1 = ((a + np.float32(2)) * x - (a + np.float32(3))) * x * x + one
    c2 = ((a + np.float32(2)) * (one - x) - (a + np.float32(3))) * (one - x) * (one - x) + one
    c3 = one - c0 - c1 - c2
    return np.stack([c0, c1, c2, c3], axis=1).astype(np.float32)


@functools.lru_cache(maxsize=1024)
def cubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices (out, 4), edge-clamped, and float32 weights (out, 4), computed as OpenCV does."""
    scale = 1.0 / (out_size / in_size)
    d = np.arange(out_size, dtype=np.float64)
    f = ((d + 0.5) * scale - 0.5).astype(np.float32)
    s = np.floor(f)
    w = cubic_coeffs((f - s).astype(np.float32))
    idx = np.clip(s.astype(np.int64)[:, None] + np.arange(-1, 3)[None, :], 0, in_size - 1)
    return idx, w


def _taps(in_size: int, out_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    idx, w = cubic_taps(in_size, out_size)
    return torch.from_numpy(idx).to(device), torch.from_numpy(w).to(device)


def resize_cubic(img: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """cv2.resize(img, (out_w, out_h), interpolation=cv2.INTER_CUBIC) for a uint8 (H, W, C) tensor.

    Horizontal pass then vertical pass in float32, taps summed in order, rounded half to even.
    """
    h, w = img.shape[:2]
    xi, xw = _taps(w, out_w, img.device)
    yi, yw = _taps(h, out_h, img.device)
    src = img.to(torch.float32)
    tmp = src[:, xi[:, 0], :] * xw[None, :, 0, None]
    for k in range(1, 4):
        tmp += src[:, xi[:, k], :] * xw[None, :, k, None]
    acc = tmp[yi[:, 0]] * yw[:, 0, None, None]
    for k in range(1, 4):
        acc += tmp[yi[:, k]] * yw[:, k, None, None]
    return acc.round_().clamp_(0, 255).to(torch.uint8)


@functools.lru_cache(maxsize=16)
def _unit_lut(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """uint8 -> value / 255 computed in float64 then cast (what numpy's img / 255.0 then astype gives)."""
    return (torch.arange(256, dtype=torch.float64) / 255.0).to(dtype).to(device)


def crop_box(frame: torch.Tensor, box) -> torch.Tensor:
    x1, y1, x2, y2 = (int(v) for v in box)
    return frame[y1:y2, x1:x2]


def prepare_one(frame: torch.Tensor, box, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """One frame -> (generator input (6, 320, 320) [roi, masked] BGR in [0,1], crop328 uint8 (328, 328, 3))."""
    crop328 = resize_cubic(crop_box(frame, box), R.CROP_SIZE, R.CROP_SIZE)
    o, n = R.ROI_OFFSET, R.ROI_SIZE
    roi = crop328[o:o + n, o:o + n]
    masked = roi.clone()
    mx, my, mw, mh = R.MASK_RECT
    masked[my:my + mh, mx:mx + mw] = 0
    lut = _unit_lut(frame.device, dtype)
    both = torch.cat([roi, masked], dim=2).permute(2, 0, 1).long()
    return lut[both], crop328


def parse_blend(spec: str | None) -> int:
    """`--blend` value -> feather width in pixels: "none"/None -> 0 (the reference's hard paste), "feather" ->
    DEFAULT_FEATHER, "feather:PX" -> PX (a whole number >= 1)."""
    if spec is None:
        return 0
    s = str(spec).strip().lower()
    if s == "none":
        return 0
    if s == "feather":
        return DEFAULT_FEATHER
    if s.startswith("feather:") and s[8:].strip().isdigit() and 1 <= int(s[8:]) <= MAX_FEATHER:
        return int(s[8:])
    raise UsageError(f"--blend: expected none, feather or feather:PX with PX a whole number of pixels in "
                     f"1..{MAX_FEATHER} (e.g. feather:{DEFAULT_FEATHER}), got {spec!r}")


def _check_feather(feather: int) -> int:
    if isinstance(feather, bool) or not isinstance(feather, (int, np.integer)) or not 0 <= feather <= MAX_FEATHER:
        raise ValueError(f"feather must be a whole number of pixels in 0..{MAX_FEATHER} (0 = no blending), "
                         f"got {feather!r}")
    return int(feather)


def feather_alpha(h: int, w: int, px: int) -> np.ndarray:
    """Alpha (h, w) float32 of a box: pixel (y, x) of the box has edge distance d = min(x, y, w-1-x, h-1-y),
    the distance between its centre and the centre of the nearest outermost row or column of the box (so the
    box's outermost pixels have d = 0); alpha = feather_ramp(px)[min(d, px)]. The blended value is
    round_half_even(t + alpha * (g - t)) in float32, t the template's and g the generator's uint8 value."""
    dy = np.minimum(np.arange(h), np.arange(h)[::-1])
    dx = np.minimum(np.arange(w), np.arange(w)[::-1])
    return feather_ramp(px)[np.minimum(np.minimum(dy[:, None], dx[None, :]), px)]


def _blend_np(template: np.ndarray, mouth: np.ndarray, px: int) -> np.ndarray:
    """The feather blend (see `feather_alpha`) of two uint8 (h, w, 3) arrays, in numpy."""
    a = feather_alpha(mouth.shape[0], mouth.shape[1], px)[:, :, None]
    t = template.astype(np.float32)
    v = np.rint(t + a * (mouth.astype(np.float32) - t))
    return np.clip(v, 0, 255).astype(np.uint8)


def _blend_torch(template: torch.Tensor, mouth: torch.Tensor, px: int) -> torch.Tensor:
    """The feather blend (see `feather_alpha`) of two uint8 (h, w, 3) tensors, on their device."""
    a = torch.from_numpy(feather_alpha(mouth.shape[0], mouth.shape[1], px)).to(mouth.device)[:, :, None]
    t = template.to(mouth.device, torch.float32)
    return (t + a * (mouth.to(torch.float32) - t)).round_().clamp_(0, 255).to(torch.uint8)


def generator_inputs(crops328: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, 328, 328, 3) uint8 crops -> (B, 6, 320, 320) generator input [roi, masked roi] / 255 (RECIPE §6), on the
    crops' device: what `prepare` returns with them, from the crops alone (a template cache keeps only those).
    v / 255 in float32, then cast, equals `_unit_lut` (float64, then cast) for all 256 values in float32, float16
    and bfloat16 (tests/test_stream.py checks it)."""
    o, n = R.ROI_OFFSET, R.ROI_SIZE
    out = torch.empty(len(crops328), 6, n, n, dtype=torch.float32, device=crops328.device)
    roi = out[:, :3]
    roi.copy_(crops328[:, o:o + n, o:o + n].permute(0, 3, 1, 2))
    roi.div_(255)
    out[:, 3:] = roi
    mx, my, mw, mh = R.MASK_RECT
    out[:, 3:, my:my + mh, mx:mx + mw] = 0
    return out if dtype == torch.float32 else out.to(dtype)


IMPLS = ("auto", "triton", "opencv", "torch")


def _impl(frames, impl: str) -> str:
    """Resolve "auto": Triton kernels for CUDA frames (unless LIPSYNC_KERNELS=0 or Triton is unusable),
    OpenCV for CPU frames, the PyTorch path elsewhere."""
    if impl not in IMPLS:
        raise ValueError(f"compose: unknown impl {impl!r}; expected one of {IMPLS}")
    if impl != "auto" or not len(frames):
        return "torch" if impl == "auto" else impl
    device = frames[0].device.type
    if device == "cpu":
        return "opencv"
    if device == "cuda" and os.environ.get("LIPSYNC_KERNELS", "1") != "0":
        from . import kernels
        if kernels.available() is None:
            return "triton"
    return "torch"


def _cv2_resize(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    import cv2

    return cv2.resize(img, (out_w, out_h), interpolation=cv2.INTER_CUBIC)


@functools.lru_cache(maxsize=1)
def _unit_lut_np() -> np.ndarray:
    return (np.arange(256, dtype=np.float64) / 255.0).astype(np.float32)


def _prepare_cv2(frame: torch.Tensor, box, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`prepare_one` with OpenCV's resize on a CPU frame."""
    crop328 = _cv2_resize(crop_box(frame, box).numpy(), R.CROP_SIZE, R.CROP_SIZE)
    o, n = R.ROI_OFFSET, R.ROI_SIZE
    both = np.empty((6, n, n), np.float32)
    np.take(_unit_lut_np(), crop328[o:o + n, o:o + n].transpose(2, 0, 1), out=both[:3])
    both[3:] = both[:3]
    mx, my, mw, mh = R.MASK_RECT
    both[3:, my:my + mh, mx:mx + mw] = 0
    return torch.from_numpy(both).to(dtype), torch.from_numpy(crop328)


def _mouth_cv2(crop328: torch.Tensor, pred_u8: torch.Tensor, box) -> torch.Tensor:
    """`mouth_one` with OpenCV's resize (CPU tensors)."""
    x1, y1, x2, y2 = (int(v) for v in box)
    c = crop328.numpy().copy()
    o, n = R.ROI_OFFSET, R.ROI_SIZE
    c[o:o + n, o:o + n] = pred_u8.numpy()
    return torch.from_numpy(_cv2_resize(c, y2 - y1, x2 - x1))


def _box_tensor(boxes, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.asarray([[int(v) for v in b] for b in boxes], dtype=np.int32), device=device)


def prepare(frames: list[torch.Tensor] | torch.Tensor, boxes, dtype: torch.dtype = torch.float32,
            impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Batch of frames + boxes -> (B, 6, 320, 320) generator input and (B, 328, 328, 3) uint8 crops, on the
    frames' device. On CUDA the fused Triton kernel does it in one pass; on a CPU OpenCV (see `_impl`)."""
    impl = _impl(frames, impl)
    if impl == "triton":
        from . import kernels
        batch = frames if isinstance(frames, torch.Tensor) else torch.stack(list(frames))
        return kernels.prepare(batch, _box_tensor(boxes, "cpu"), dtype)
    one = _prepare_cv2 if impl == "opencv" else prepare_one
    pairs = [one(f, b, dtype) for f, b in zip(frames, boxes)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def to_uint8(pred: torch.Tensor) -> torch.Tensor:
    """Generator output in [0,1] (…, 3, 320, 320) -> uint8 (…, 320, 320, 3), truncating like numpy's astype."""
    return (pred.float() * 255).clamp_(0, 255).to(torch.uint8).movedim(-3, -1)


def mouth_one(crop328: torch.Tensor, pred_u8: torch.Tensor, box) -> torch.Tensor:
    """The box-sized region paste writes: pred in the crop's inner 320, the crop resized back to the box."""
    x1, y1, x2, y2 = (int(v) for v in box)
    c = crop328.clone()
    o, n = R.ROI_OFFSET, R.ROI_SIZE
    c[o:o + n, o:o + n] = pred_u8
    return resize_cubic(c, y2 - y1, x2 - x1)


def mouths(crops328: torch.Tensor, pred: torch.Tensor, boxes, impl: str = "auto", feather: int = 0,
           templates=None) -> list[torch.Tensor]:
    """For a batch of generator outputs, the box-sized regions `paste` would write (uint8 (h, w, 3) each, on the
    crops' device): what the streaming server sends. OpenCV for CPU crops, the PyTorch path elsewhere.
    With feather > 0 each region is blended into `templates[i]`, the template frame's (h, w, 3) uint8 region
    under box i (what the frame holds there before pasting)."""
    impl = _impl(crops328, impl)
    feather = _check_feather(feather)
    if feather and (templates is None or len(templates) != len(boxes)):
        raise ValueError(f"mouths: feather={feather} needs templates, one box-sized template region per box")
    one = _mouth_cv2 if impl == "opencv" else mouth_one
    pred_u8 = to_uint8(pred).to(crops328.device)
    out = [one(crops328[i], pred_u8[i], b) for i, b in enumerate(boxes)]
    if not feather:
        return out
    if impl == "opencv":
        return [torch.from_numpy(_blend_np(_np(t), m.numpy(), feather)) for t, m in zip(templates, out)]
    return [_blend_torch(torch.as_tensor(t), m, feather) for t, m in zip(templates, out)]


def _np(img) -> np.ndarray:
    return img.cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)


def paste(frames: list[torch.Tensor] | torch.Tensor, crops328: torch.Tensor, pred: torch.Tensor, boxes,
          impl: str = "auto", feather: int = 0) -> list[torch.Tensor] | torch.Tensor:
    """Composite a batch of generator outputs (B, 3, 320, 320) into the frames, in place (a stacked
    (B, H, W, 3) tensor, or a list of frames; on CUDA through the fused Triton kernel, on a CPU OpenCV).
    feather > 0 blends each box into the frame with the ramp of `feather_alpha` instead of a hard paste."""
    impl = _impl(frames, impl)
    feather = _check_feather(feather)
    if impl == "triton":
        from . import kernels
        batch = frames if isinstance(frames, torch.Tensor) else torch.stack(list(frames))
        kernels.paste(batch, crops328, pred, _box_tensor(boxes, "cpu"), feather=feather)
        return batch if isinstance(frames, torch.Tensor) else list(batch.unbind(0))
    templates = None
    if feather:
        templates = [crop_box(f, b) for f, b in zip(frames, boxes)]
        if impl == "opencv":
            templates = [t.cpu() for t in templates]
    for f, b, m in zip(frames, boxes, mouths(crops328, pred, boxes, impl, feather, templates)):
        x1, y1, x2, y2 = (int(v) for v in b)
        f[y1:y2, x1:x2] = m.to(f.device)
    return frames


__all__ = ["parse_blend", "feather_alpha", "feather_ramp", "DEFAULT_FEATHER", "resize_cubic", "prepare", "prepare_one", "paste", "to_uint8", "cubic_taps", "mouths", "mouth_one", "IMPLS"]
