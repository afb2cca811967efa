"""Compositing (RECIPE §6-7): crop -> 328 bicubic -> generator input, and generator output -> frame.

Three implementations of the same steps, picked by where the frames are (`impl="auto"`):
- "triton": the fused GPU kernels of `lipsync_trt.kernels`, for CUDA tensors;
- "opencv": cv2.resize(INTER_CUBIC) itself, the reference's own call, for CPU tensors (much faster than the
  PyTorch gathers on a CPU, and pixel-exact by construction);
- "torch": a PyTorch bicubic that reproduces OpenCV's INTER_CUBIC for uint8 images (half-pixel centres,
  a = -0.75, replicated edges, no antialiasing, float32 taps; equal to OpenCV 4.14 and 5.0 on >= 99.9% of
  pixels, the rest off by 1). It runs on any device and is the oracle for the GPU kernels.
Frames are uint8 (H, W, 3) BGR tensors; boxes are (x1, y1, x2, y2) with x2/y2 exclusive, as slices. Every path cuts
the generator's window and masks through `roi` / `fill_inputs` and reads values / 255 from `tables.unit_lut`.
`TemplateCrops` is the prepared-template cache (328 crops, box regions, optionally frames) built with `prepare`.
"""
from __future__ import annotations

import functools
import os
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import recipe as R
from .errors import UsageError
from .tables import feather_ramp, unit_lut

if TYPE_CHECKING:
    from .avatar import Avatar

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


# The generator's window of the 328 crop and the recipe's mask rectangle (RECIPE §6), as slices: every CPU and
# PyTorch path cuts and masks through `roi` and `fill_inputs`; the Triton kernels take the same recipe constants.
_ROI = slice(R.ROI_OFFSET, R.ROI_OFFSET + R.ROI_SIZE)          # rows and columns 4..323 of the 328 crop
_MX, _MY, _MW, _MH = R.MASK_RECT                                 # cv2.rectangle (x, y, w, h)
_MASK_ROWS, _MASK_COLS = slice(_MY, _MY + _MH), slice(_MX, _MX + _MW)   # rows 5..309, columns 5..314 of the window


def roi(crop328):
    """The generator's 320x320 window of (..., 328, 328, C) crops: [..., 4:324, 4:324, :], a view (numpy or torch)."""
    return crop328[..., _ROI, _ROI, :]


def fill_inputs(out):
    """Complete generator inputs (..., 6, 320, 320) whose channels 0-2 hold roi / 255, in place: channels 3-5 become
    the same with the mask rectangle zeroed (the reference's cv2.rectangle(..., -1) on a copy). numpy or torch."""
    out[..., 3:, :, :] = out[..., :3, :, :]
    out[..., 3:, _MASK_ROWS, _MASK_COLS] = 0
    return out


def crop_box(frame: torch.Tensor, box) -> torch.Tensor:
    x1, y1, x2, y2 = (int(v) for v in box)
    return frame[y1:y2, x1:x2]


def prepare_one(frame: torch.Tensor, box, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """One frame -> (generator input (6, 320, 320) [roi, masked] BGR in [0,1], crop328 uint8 (328, 328, 3))."""
    crop328 = resize_cubic(crop_box(frame, box), R.CROP_SIZE, R.CROP_SIZE)
    out = torch.empty((6, R.ROI_SIZE, R.ROI_SIZE), dtype=dtype, device=frame.device)
    out[:3] = unit_lut(frame.device, dtype)[roi(crop328).permute(2, 0, 1).long()]
    return fill_inputs(out), crop328


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
    v / 255 in float32, then cast, equals `tables.unit_lut` (float64, then cast) for all 256 values in float32,
    float16 and bfloat16 (tests/test_stream.py checks it), and needs no int64 index of the whole batch."""
    n = R.ROI_SIZE
    out = torch.empty(len(crops328), 6, n, n, dtype=torch.float32, device=crops328.device)
    out[:, :3].copy_(roi(crops328).permute(0, 3, 1, 2)).div_(255)
    fill_inputs(out)
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


def _prepare_cv2(frame: torch.Tensor, box, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`prepare_one` with OpenCV's resize on a CPU frame."""
    crop328 = _cv2_resize(crop_box(frame, box).numpy(), R.CROP_SIZE, R.CROP_SIZE)
    both = np.empty((6, R.ROI_SIZE, R.ROI_SIZE), np.float32)
    np.take(unit_lut().numpy(), roi(crop328).transpose(2, 0, 1), out=both[:3])
    return torch.from_numpy(fill_inputs(both)).to(dtype), torch.from_numpy(crop328)


def _mouth_cv2(crop328: torch.Tensor, pred_u8: torch.Tensor, box) -> torch.Tensor:
    """`mouth_one` with OpenCV's resize (CPU tensors)."""
    x1, y1, x2, y2 = (int(v) for v in box)
    c = crop328.numpy().copy()
    roi(c)[...] = pred_u8.numpy()
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
    roi(c)[...] = pred_u8
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


class TemplateCrops:
    """The prepared-template cache each LipSync (and each avatar of the server) owns: the 328x328 uint8 crop of each
    template (RECIPE §6) with its box region and, when asked, the decoded template frame, on one device, in an LRU of
    `size` templates (None: all). Generator inputs (`generator_inputs`) and the paste both derive from the crop, so
    a cached template costs no JPEG decode and no resize. Used by the offline pipeline, the live streams and the
    server; thread-safe. `avatar` is a loaded `avatar.Avatar` (its frames, boxes, height and width are read)."""

    def __init__(self, avatar: "Avatar", device, size: int | None = None, frames: bool = False):
        self.avatar, self.device, self.size, self.keep_frames = avatar, torch.device(device), size, frames
        self._items: OrderedDict = OrderedDict()     # template -> [crop, frame or None, box region]
        self._lock = threading.Lock()
        self.misses = 0

    @staticmethod
    def nbytes(avatar: "Avatar", templates: int, frames: bool = False) -> int:
        """Memory of `templates` cached templates (at most): the 328 crop, the box region (the avatar's largest box),
        and the frame with frames=True."""
        b = avatar.boxes
        region = int(((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).max()) * 3
        return templates * (R.CROP_SIZE ** 2 * 3 + region + (avatar.height * avatar.width * 3 if frames else 0))

    def get(self, ids: list[int]) -> tuple[torch.Tensor, list[tuple[int, int, int, int]]]:
        """(crops (B, 328, 328, 3) uint8 on the device, boxes [(x1, y1, x2, y2)]) for template ids."""
        return torch.stack([self._item(t)[0] for t in ids]), [tuple(int(v) for v in self.avatar.boxes[t]) for t in ids]

    def region(self, t: int) -> torch.Tensor:
        """Template t's box region (h, w, 3) uint8 on the device, as the frame holds it before pasting (what a
        feathered mouth blends into); cached with the crop, read-only."""
        return self._item(t)[2]

    def frame(self, t: int, keep: bool | None = None) -> torch.Tensor:
        """Template frame t (H, W, 3) uint8 on the device; read-only (clone it to paste into). Kept in the cache with
        the crop when `keep` (default: frames=True at construction), else decoded (through the avatar's small LRU)."""
        if not (self.keep_frames if keep is None else keep):
            return torch.from_numpy(self.avatar.frame(t).copy()).to(self.device)
        item = self._item(t)
        if item[1] is None:
            img = torch.from_numpy(self.avatar.frame(t).copy()).to(self.device)
            with self._lock:
                item[1] = img if item[1] is None else item[1]
        return item[1]

    def _item(self, t: int) -> list:
        with self._lock:
            item = self._items.get(t)
            if item is not None:
                self._items.move_to_end(t)
                return item
        img = self.avatar.frame(t)
        x1, y1, x2, y2 = (int(v) for v in self.avatar.boxes[t])
        region = torch.from_numpy(img[y1:y2, x1:x2].copy()).to(self.device)
        crop = prepare([region], [(0, 0, x2 - x1, y2 - y1)])[1][0]
        item = [crop, torch.from_numpy(img.copy()).to(self.device) if self.keep_frames else None, region]
        with self._lock:
            self.misses += 1
            self._items[t] = item
            while self.size is not None and len(self._items) > self.size:
                self._items.popitem(last=False)
        return item


__all__ = ["TemplateCrops", "fill_inputs", "roi", "generator_inputs", "parse_blend", "feather_alpha", "feather_ramp", "DEFAULT_FEATHER", "resize_cubic", "prepare", "prepare_one", "paste", "to_uint8", "cubic_taps", "mouths", "mouth_one", "IMPLS"]
