"""Triton kernel: generator output -> composited frames, in place.

One program computes a BY x BX tile (x 3 channels) of one frame's box. Each output pixel gathers the
4 x 4 taps of the 328 -> (h, w) bicubic resize from a virtual 328 x 328 source that is never
materialised: inside [4, 324) the tap reads the generator output and truncates it to uint8 exactly like
`compose.to_uint8` (float32 x 255, clamp 0..255, truncate), outside it reads the saved crop328 border.
The resize itself reproduces `compose.resize_cubic` operation for operation (horizontal pass per source
row, then vertical pass, float32, taps summed in order, round half to even, clamp), and the result is
stored straight into frames[b, y1:y2, x1:x2]. With FEATHER > 0 the stored value is blended with what the
frame holds there first, as `compose.feather_alpha` defines (alpha looked up in the same float32 table).
"""
import triton
import triton.language as tl

from .prepare import cubic_taps, round_half_even


@triton.jit
def _src(pred_ptr, crop_ptr, r_pred, r_crop, r_in, c_pred, c_crop, c_in, mask):
    """One tap of the virtual crop328: truncated uint8 prediction inside the 320 ROI, saved crop outside."""
    inner = r_in & c_in
    p = tl.load(pred_ptr + r_pred + c_pred, mask=mask & inner, other=0).to(tl.float32) * 255.0
    p = tl.floor(tl.minimum(tl.maximum(p, 0.0), 255.0))   # >= 0, so floor == truncation
    c = tl.load(crop_ptr + r_crop + c_crop, mask=mask & (inner == 0), other=0).to(tl.float32)
    return tl.where(inner, p, c)


@triton.jit
def _row_pass(pred_ptr, crop_ptr, r_pred, r_crop, r_in,
              cp0, cp1, cp2, cp3, cc0, cc1, cc2, cc3, ci0, ci1, ci2, ci3, w0, w1, w2, w3, mask):
    t = _src(pred_ptr, crop_ptr, r_pred, r_crop, r_in, cp0, cc0, ci0, mask) * w0
    t = t + _src(pred_ptr, crop_ptr, r_pred, r_crop, r_in, cp1, cc1, ci1, mask) * w1
    t = t + _src(pred_ptr, crop_ptr, r_pred, r_crop, r_in, cp2, cc2, ci2, mask) * w2
    t = t + _src(pred_ptr, crop_ptr, r_pred, r_crop, r_in, cp3, cc3, ci3, mask) * w3
    return t


@triton.jit
def _row(s, k: tl.constexpr, CROP: tl.constexpr, OFF: tl.constexpr, ROI: tl.constexpr):
    """Clamped source index k of each tap vector and whether it falls inside the ROI."""
    i = tl.minimum(tl.maximum(s + (k - 1), 0), CROP - 1)
    return i, (i >= OFF) & (i < OFF + ROI)


@triton.jit
def paste_kernel(frames_ptr, boxes_ptr, pred_ptr, crop_ptr, alpha_ptr,
                 stride_fb, stride_fy, stride_fx, stride_fc,
                 stride_bb, stride_bk,
                 stride_pb, stride_pc, stride_py, stride_px,
                 CROP: tl.constexpr, OFF: tl.constexpr, ROI: tl.constexpr,
                 BY: tl.constexpr, BX: tl.constexpr, FEATHER: tl.constexpr):
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
    ch3 = ch[None, None, :]
    mask = (ch3 < 3) & (oy < h)[:, None, None] & (ox < w)[None, :, None]

    # taps of the two 1-D resizes (CROP -> box)
    sx, wx0, wx1, wx2, wx3 = cubic_taps(ox, CROP, w)
    sy, wy0, wy1, wy2, wy3 = cubic_taps(oy, CROP, h)
    wx0 = wx0[None, :, None]
    wx1 = wx1[None, :, None]
    wx2 = wx2[None, :, None]
    wx3 = wx3[None, :, None]

    # columns: offsets into pred (channel plane + column) and crop (column * 3 + channel), ROI flags
    xi0, xin0 = _row(sx, 0, CROP, OFF, ROI)
    xi1, xin1 = _row(sx, 1, CROP, OFF, ROI)
    xi2, xin2 = _row(sx, 2, CROP, OFF, ROI)
    xi3, xin3 = _row(sx, 3, CROP, OFF, ROI)
    pc = ch3 * stride_pc
    cp0 = ((xi0 - OFF) * stride_px)[None, :, None] + pc
    cp1 = ((xi1 - OFF) * stride_px)[None, :, None] + pc
    cp2 = ((xi2 - OFF) * stride_px)[None, :, None] + pc
    cp3 = ((xi3 - OFF) * stride_px)[None, :, None] + pc
    cc0 = (xi0 * 3)[None, :, None] + ch3
    cc1 = (xi1 * 3)[None, :, None] + ch3
    cc2 = (xi2 * 3)[None, :, None] + ch3
    cc3 = (xi3 * 3)[None, :, None] + ch3
    ci0 = xin0[None, :, None]
    ci1 = xin1[None, :, None]
    ci2 = xin2[None, :, None]
    ci3 = xin3[None, :, None]

    pred_b = pred_ptr + b * stride_pb
    crop_b = crop_ptr + b * (CROP * CROP * 3)
    yi0, yin0 = _row(sy, 0, CROP, OFF, ROI)
    yi1, yin1 = _row(sy, 1, CROP, OFF, ROI)
    yi2, yin2 = _row(sy, 2, CROP, OFF, ROI)
    yi3, yin3 = _row(sy, 3, CROP, OFF, ROI)
    t0 = _row_pass(pred_b, crop_b, ((yi0 - OFF) * stride_py)[:, None, None], (yi0 * (CROP * 3))[:, None, None],
                   yin0[:, None, None], cp0, cp1, cp2, cp3, cc0, cc1, cc2, cc3, ci0, ci1, ci2, ci3,
                   wx0, wx1, wx2, wx3, mask)
    t1 = _row_pass(pred_b, crop_b, ((yi1 - OFF) * stride_py)[:, None, None], (yi1 * (CROP * 3))[:, None, None],
                   yin1[:, None, None], cp0, cp1, cp2, cp3, cc0, cc1, cc2, cc3, ci0, ci1, ci2, ci3,
                   wx0, wx1, wx2, wx3, mask)
    t2 = _row_pass(pred_b, crop_b, ((yi2 - OFF) * stride_py)[:, None, None], (yi2 * (CROP * 3))[:, None, None],
                   yin2[:, None, None], cp0, cp1, cp2, cp3, cc0, cc1, cc2, cc3, ci0, ci1, ci2, ci3,
                   wx0, wx1, wx2, wx3, mask)
    t3 = _row_pass(pred_b, crop_b, ((yi3 - OFF) * stride_py)[:, None, None], (yi3 * (CROP * 3))[:, None, None],
                   yin3[:, None, None], cp0, cp1, cp2, cp3, cc0, cc1, cc2, cc3, ci0, ci1, ci2, ci3,
                   wx0, wx1, wx2, wx3, mask)
    acc = t0 * wy0[:, None, None]
    acc = acc + t1 * wy1[:, None, None]
    acc = acc + t2 * wy2[:, None, None]
    acc = acc + t3 * wy3[:, None, None]
    v = tl.minimum(tl.maximum(round_half_even(acc), 0.0), 255.0)

    out = (frames_ptr + b * stride_fb + ((y1 + oy) * stride_fy)[:, None, None]
           + ((x1 + ox) * stride_fx)[None, :, None] + ch3 * stride_fc)
    if FEATHER > 0:
        # edge distance d = min(x, y, w-1-x, h-1-y) in the box; alpha = table[min(d, FEATHER)]
        dx = tl.minimum(ox, w - 1 - ox)
        dy = tl.minimum(oy, h - 1 - oy)
        d = tl.minimum(tl.minimum(dy[:, None], dx[None, :]), FEATHER)
        inside = (oy < h)[:, None] & (ox < w)[None, :]
        a = tl.load(alpha_ptr + tl.maximum(d, 0), mask=inside, other=0.0)[:, :, None]
        t = tl.load(out, mask=mask, other=0).to(tl.float32)
        v = tl.minimum(tl.maximum(round_half_even(t + a * (v - t)), 0.0), 255.0)
    tl.store(out, v.to(tl.int32).to(tl.uint8), mask=mask)
