"""Triton kernel: full frames + per-frame boxes -> generator input (B, 6, 320, 320) and crop328 (B, 328, 328, 3).

One program computes a BY x BX tile of the 328 x 328 crop for one frame, all three channels at once (a
BY x BX x 4 block, the 4th lane masked). Every output pixel gathers its 4 x 4 source taps straight from
the frame and reproduces `lipsync_trt.compose.resize_cubic` operation for operation: the horizontal pass
for each of the 4 source rows (taps summed in order, float32), then the vertical pass over those 4 partial
sums, round half to even, clamp to 0..255. The same program writes the uint8 crop328 and, for pixels of
the inner 320 x 320, the roi plane (channels 0-2) and the masked plane (channels 3-5, zero inside the
mask rectangle) through a 256-entry value/255 table in the output dtype, so inputs are bit-identical to
the PyTorch path's `lut[uint8]`.

The shared device helpers (`cubic_taps`, `round_half_even`) live here; `paste.py` imports them.
This module imports triton at the top: load it through `lipsync_trt.kernels`, which imports it lazily.
"""
import triton
import triton.language as tl


@triton.jit
def cubic_taps(d, in_size, out_size):
    """OpenCV INTER_CUBIC taps for output coordinates d (int32 vector) of a resize in_size -> out_size.

    Returns (first source index before clamping, w0, w1, w2, w3). Bit-exact with compose.cubic_taps:
    scale = 1 / (out / in) and f = (d + 0.5) * scale - 0.5 in float64, f rounded to float32, the weights
    in float32 with OpenCV's operation order (launch with enable_fp_fusion=False so no FMA changes them).
    """
    scale = 1.0 / (tl.cast(out_size, tl.float64) / tl.cast(in_size, tl.float64))
    f = ((d.to(tl.float64) + 0.5) * scale - 0.5).to(tl.float32)
    s = tl.floor(f)
    x = f - s
    x1 = x + 1.0
    # a = -0.75: 5a = -3.75, 8a = -6, 4a = -3, a + 2 = 1.25, a + 3 = 2.25 (all exact in float32)
    c0 = ((-0.75 * x1 - -3.75) * x1 + -6.0) * x1 - -3.0
    c1 = ((1.25 * x - 2.25) * x) * x + 1.0
    y = 1.0 - x
    c2 = ((1.25 * y - 2.25) * y) * y + 1.0
    c3 = ((1.0 - c0) - c1) - c2
    return s.to(tl.int32), c0, c1, c2, c3


@triton.jit
def round_half_even(v):
    """float32 -> float32 rounded to the nearest integer, ties to even (torch.round / cv::saturate_cast)."""
    r = tl.floor(v)
    d = v - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, r + 1.0, r)


@triton.jit
def _row_pass(row_ptr, o0, o1, o2, o3, w0, w1, w2, w3, mask):
    """One horizontal pass: sum_k src[row, col_k] * w_k in order, float32 (row_ptr + o_k are the 4 taps)."""
    t = tl.load(row_ptr + o0, mask=mask, other=0).to(tl.float32) * w0
    t = t + tl.load(row_ptr + o1, mask=mask, other=0).to(tl.float32) * w1
    t = t + tl.load(row_ptr + o2, mask=mask, other=0).to(tl.float32) * w2
    t = t + tl.load(row_ptr + o3, mask=mask, other=0).to(tl.float32) * w3
    return t


@triton.jit
def prepare_kernel(frames_ptr, boxes_ptr, lut_ptr, inp_ptr, crop_ptr,
                   stride_fb, stride_fy, stride_fx, stride_fc,
                   stride_bb, stride_bk,
                   CROP: tl.constexpr, OFF: tl.constexpr, ROI: tl.constexpr,
                   MASK_X0: tl.constexpr, MASK_X1: tl.constexpr, MASK_Y0: tl.constexpr, MASK_Y1: tl.constexpr,
                   BY: tl.constexpr, BX: tl.constexpr):
    pid_x = tl.program_id(0)
    pid_y = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)

    x1 = tl.load(boxes_ptr + b * stride_bb + 0 * stride_bk)
    y1 = tl.load(boxes_ptr + b * stride_bb + 1 * stride_bk)
    x2 = tl.load(boxes_ptr + b * stride_bb + 2 * stride_bk)
    y2 = tl.load(boxes_ptr + b * stride_bb + 3 * stride_bk)
    w = x2 - x1
    h = y2 - y1

    ox = pid_x * BX + tl.arange(0, BX)
    oy = pid_y * BY + tl.arange(0, BY)
    ch = tl.arange(0, 4)

    # taps of the two 1-D resizes (box -> CROP), computed once per tile row / column
    sx, wx0, wx1, wx2, wx3 = cubic_taps(ox, w, CROP)
    sy, wy0, wy1, wy2, wy3 = cubic_taps(oy, h, CROP)
    wx0 = wx0[None, :, None]
    wx1 = wx1[None, :, None]
    wx2 = wx2[None, :, None]
    wx3 = wx3[None, :, None]
    cx = ch[None, None, :] * stride_fc
    # clamped source columns inside the frame, as element offsets (+ channel)
    ox0 = ((x1 + tl.minimum(tl.maximum(sx - 1, 0), w - 1)) * stride_fx)[None, :, None] + cx
    ox1 = ((x1 + tl.minimum(tl.maximum(sx + 0, 0), w - 1)) * stride_fx)[None, :, None] + cx
    ox2 = ((x1 + tl.minimum(tl.maximum(sx + 1, 0), w - 1)) * stride_fx)[None, :, None] + cx
    ox3 = ((x1 + tl.minimum(tl.maximum(sx + 2, 0), w - 1)) * stride_fx)[None, :, None] + cx
    ry0 = ((y1 + tl.minimum(tl.maximum(sy - 1, 0), h - 1)) * stride_fy)[:, None, None]
    ry1 = ((y1 + tl.minimum(tl.maximum(sy + 0, 0), h - 1)) * stride_fy)[:, None, None]
    ry2 = ((y1 + tl.minimum(tl.maximum(sy + 1, 0), h - 1)) * stride_fy)[:, None, None]
    ry3 = ((y1 + tl.minimum(tl.maximum(sy + 2, 0), h - 1)) * stride_fy)[:, None, None]

    cmask = (ch < 3)[None, None, :]
    lmask = cmask & (oy < CROP)[:, None, None] & (ox < CROP)[None, :, None]
    base = frames_ptr + b * stride_fb
    t0 = _row_pass(base + ry0, ox0, ox1, ox2, ox3, wx0, wx1, wx2, wx3, lmask)
    t1 = _row_pass(base + ry1, ox0, ox1, ox2, ox3, wx0, wx1, wx2, wx3, lmask)
    t2 = _row_pass(base + ry2, ox0, ox1, ox2, ox3, wx0, wx1, wx2, wx3, lmask)
    t3 = _row_pass(base + ry3, ox0, ox1, ox2, ox3, wx0, wx1, wx2, wx3, lmask)
    acc = t0 * wy0[:, None, None]
    acc = acc + t1 * wy1[:, None, None]
    acc = acc + t2 * wy2[:, None, None]
    acc = acc + t3 * wy3[:, None, None]
    v = tl.minimum(tl.maximum(round_half_even(acc), 0.0), 255.0).to(tl.int32)

    # crop328 (B, CROP, CROP, 3) uint8, contiguous
    oy3 = oy[:, None, None]
    ox3 = ox[None, :, None]
    ch3 = ch[None, None, :]
    crop_off = b * (CROP * CROP * 3) + oy3 * (CROP * 3) + ox3 * 3 + ch3
    tl.store(crop_ptr + crop_off, v.to(tl.uint8), mask=lmask)

    # inner ROI x ROI: roi planes 0-2, masked planes 3-5 (B, 6, ROI, ROI), contiguous
    ry = oy3 - OFF
    rx = ox3 - OFF
    inner = lmask & (ry >= 0) & (ry < ROI) & (rx >= 0) & (rx < ROI)
    hole = (ry >= MASK_Y0) & (ry <= MASK_Y1) & (rx >= MASK_X0) & (rx <= MASK_X1)
    val = tl.load(lut_ptr + v, mask=inner, other=0)
    val_m = tl.load(lut_ptr + tl.where(hole, 0, v), mask=inner, other=0)
    inp_off = b * (6 * ROI * ROI) + ch3 * (ROI * ROI) + ry * ROI + rx
    tl.store(inp_ptr + inp_off, val, mask=inner)
    tl.store(inp_ptr + inp_off + 3 * ROI * ROI, val_m, mask=inner)


@triton.jit
def taps_kernel(sizes_ptr, idx_ptr, w_ptr, P, MAXN: tl.constexpr, PB: tl.constexpr):
    """Test helper: for pairs p = (in, out) write the clamped indices and weights that `cubic_taps` gives
    into (P, MAXN, 4) outputs, so tests can compare them with compose.cubic_taps. PB pairs per program."""
    pp = tl.program_id(0) * PB + tl.arange(0, PB)
    pm = pp < P
    n_in = tl.load(sizes_ptr + 2 * pp, mask=pm, other=1)[:, None]
    n_out = tl.load(sizes_ptr + 2 * pp + 1, mask=pm, other=1)[:, None]
    d = tl.arange(0, MAXN)[None, :]
    m = pm[:, None] & (d < n_out)
    s, c0, c1, c2, c3 = cubic_taps(d + 0 * n_in, n_in, n_out)
    base = pp[:, None].to(tl.int64) * (MAXN * 4) + d * 4
    tl.store(idx_ptr + base + 0, tl.minimum(tl.maximum(s - 1, 0), n_in - 1), mask=m)
    tl.store(idx_ptr + base + 1, tl.minimum(tl.maximum(s + 0, 0), n_in - 1), mask=m)
    tl.store(idx_ptr + base + 2, tl.minimum(tl.maximum(s + 1, 0), n_in - 1), mask=m)
    tl.store(idx_ptr + base + 3, tl.minimum(tl.maximum(s + 2, 0), n_in - 1), mask=m)
    tl.store(w_ptr + base + 0, c0, mask=m)
    tl.store(w_ptr + base + 1, c1, mask=m)
    tl.store(w_ptr + base + 2, c2, mask=m)
    tl.store(w_ptr + base + 3, c3, mask=m)
