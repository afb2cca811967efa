"""The Triton compositing kernels (lipsync_trt.kernels) against the PyTorch path (lipsync_trt.compose, the oracle).

On a CPU the kernels run through Triton's interpreter on small inputs: the tests pass interpret=True to
each launch instead of setting TRITON_INTERPRET for the whole process, so compiled kernels used by other
tests in the same process are not affected (the kernels package keeps interpreted and compiled modules
apart). Tests marked `gpu` run the compiled kernels on CUDA. Tolerance everywhere is the issue's: values
identical except +-1 on at most 0.1 % of them; on the interpreter the results are in fact bit-identical.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lipsync_trt import compose
import lipsync_trt.kernels as K

try:
    import triton  # noqa: F401
    _NO_TRITON = None
except Exception as exc:  # pragma: no cover - depends on the environment
    _NO_TRITON = f"triton is not importable ({exc}); pip install triton"

needs_triton = pytest.mark.skipif(_NO_TRITON is not None, reason=_NO_TRITON or "")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or _NO_TRITON is not None,
                                reason="needs CUDA and triton")



def assert_u8_close(got: torch.Tensor, want: torch.Tensor, what: str) -> float:
    """Issue #3's tolerance; returns the fraction of identical values."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    d = (got.cpu().int() - want.cpu().int()).abs()
    off = (d > 0).double().mean().item()
    assert int(d.max()) <= 1 and off <= 0.001, f"{what}: max diff {int(d.max())}, {off:.4%} of values differ"
    return 1.0 - off


def expected_inputs(crops: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The generator input that compose builds from these crop328s (roi, masked roi, / 255, NCHW)."""
    lut = (torch.arange(256, dtype=torch.float64) / 255.0).to(dtype)
    roi = crops.cpu()[:, 4:324, 4:324]
    masked = roi.clone()
    masked[:, 5:310, 5:315] = 0
    return lut[torch.cat([roi, masked], dim=3).permute(0, 3, 1, 2).long()]


def check_prepare(frames, boxes, dtype, interpret):
    inputs, crops = K.prepare(frames, boxes, dtype, interpret=interpret)
    want_in, want_crops = compose.prepare(list(frames.cpu()), [tuple(map(int, b)) for b in boxes], dtype, impl="torch")
    same = assert_u8_close(crops, want_crops, f"crop328 {dtype}")
    assert inputs.dtype == dtype and inputs.shape == (frames.shape[0], 6, 320, 320)
    # inputs are a pure function of the crop: exact, given the crop
    assert torch.equal(inputs.cpu(), expected_inputs(crops, dtype))
    if same == 1.0:
        assert torch.equal(inputs.cpu(), want_in)
    return same


def check_paste(frames, crops, pred, boxes, interpret):
    got = frames.clone()
    K.paste(got, crops, pred, boxes, interpret=interpret)
    want = frames.cpu().clone()
    compose.paste(list(want), crops.cpu(), pred.cpu(), [tuple(map(int, b)) for b in boxes], impl="torch")
    return assert_u8_close(got, want, f"pasted frames {pred.dtype}")


def random_pred(b, generator, dtype=torch.float32):
    p = torch.rand((b, 3, 320, 320), generator=generator) * 1.2 - 0.1   # also outside [0, 1]: clamped
    p[:, :, 0, :8] = torch.tensor([0.0, 1.0, 0.5, 1 / 255, 2 / 255, 254 / 255, -0.0, 1.5])
    return p.to(dtype)


# --------------------------------------------------------------------------- no GPU needed

def test_import_without_triton(monkeypatch):
    # a fresh interpreter where `import triton` fails: the package still imports and says why
    code = ("import sys; sys.modules['triton'] = None\n"
            "import lipsync_trt.kernels as K\n"
            "r = K.available(); assert r and 'triton' in r, r\n"
            "import torch\n"
            "try:\n"
            "    K.paste(torch.zeros((1, 8, 8, 3), dtype=torch.uint8), torch.zeros((1, 328, 328, 3), dtype=torch.uint8),\n"
            "            torch.zeros((1, 3, 320, 320)), [[0, 0, 8, 8]], interpret=True)\n"
            "except RuntimeError as e:\n"
            "    assert 'triton' in str(e)\n"
            "else:\n"
            "    raise AssertionError('no error')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    # and in this process, with triton (maybe) already loaded
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    reason = K.available()
    assert reason is not None and "triton" in reason
    frames = torch.zeros((1, 8, 8, 3), dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="triton"):
        K.prepare(frames, [[0, 0, 8, 8]], interpret=True)


@needs_triton
def test_available_and_modes(monkeypatch):
    assert K.available(interpret=True) is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert K.available() is None
    idx, w = K.cubic_taps([(7, 3)])          # interpreter chosen by the environment
    ref_i, ref_w = compose.cubic_taps(7, 3)
    assert np.array_equal(idx[0, :3].numpy(), ref_i) and np.array_equal(w[0, :3].numpy(), ref_w)
    monkeypatch.delenv("TRITON_INTERPRET")
    if not torch.cuda.is_available():
        assert "CUDA" in K.available()
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            K.prepare(torch.zeros((1, 8, 8, 3), dtype=torch.uint8), [[0, 0, 8, 8]])


@needs_triton
def test_bad_arguments():
    frames = torch.zeros((2, 16, 24, 3), dtype=torch.uint8)
    for boxes in ([[0, 0, 8, 8], [0, 0, 25, 8]], [[0, 0, 8, 8], [4, 4, 4, 8]], [[-1, 0, 8, 8], [0, 0, 8, 8]]):
        with pytest.raises(ValueError, match="box 1|box 0"):
            K.prepare(frames, boxes, interpret=True)
    with pytest.raises(ValueError, match="frames"):
        K.prepare(frames.float(), [[0, 0, 8, 8]] * 2, interpret=True)
    with pytest.raises(ValueError, match="pred"):
        K.paste(frames, torch.zeros((2, 328, 328, 3), dtype=torch.uint8), torch.zeros((2, 3, 320, 321)),
                [[0, 0, 8, 8]] * 2, interpret=True)


@needs_triton
def test_taps_bit_exact():
    """In-kernel tap indices/weights (float64 scale, float32 weights) equal compose.cubic_taps bit for bit."""
    sizes = list(range(1, 1301))
    for pairs in ([(n, 328) for n in sizes], [(328, n) for n in sizes]):
        idx, w = K.cubic_taps(pairs, interpret=True)
        for p, (n_in, n_out) in enumerate(pairs):
            ref_i, ref_w = compose.cubic_taps(n_in, n_out)
            assert np.array_equal(idx[p, :n_out].numpy(), ref_i), (n_in, n_out)
            assert np.array_equal(w[p, :n_out].numpy().view(np.int32), ref_w.view(np.int32)), (n_in, n_out)


@pytest.fixture(scope="module")
def small():
    g = torch.Generator().manual_seed(3)
    frames = torch.randint(0, 256, (3, 64, 96, 3), dtype=torch.uint8, generator=g)
    frames[0, :32] = torch.linspace(0, 255, 96).to(torch.uint8)[None, :, None]   # smooth part too
    # different sizes: inside, the whole frame (touches every edge), a cut-short box at the right/bottom edge
    boxes = torch.tensor([[10, 5, 50, 45], [0, 0, 96, 64], [70, 30, 96, 64]])
    return frames, boxes, g


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_prepare_small(small, dtype):
    frames, boxes, _ = small
    same = check_prepare(frames, boxes, dtype, interpret=True)
    print(f"prepare {dtype}: {same:.4%} of crop328 values identical")


@needs_triton
def test_prepare_downscale_and_out():
    """Boxes larger than 328 (downscale), a non-contiguous frame batch, and preallocated outputs."""
    g = torch.Generator().manual_seed(5)
    big = torch.randint(0, 256, (2, 360, 420, 3), dtype=torch.uint8, generator=g)
    frames = big[:, :, 10:]                                   # (2, 360, 410, 3), strided
    boxes = torch.tensor([[0, 0, 410, 360], [21, 3, 400, 350]])
    out = (torch.empty((2, 6, 320, 320)), torch.empty((2, 328, 328, 3), dtype=torch.uint8))
    inputs, crops = K.prepare(frames, boxes, out=out, interpret=True)
    assert inputs is out[0] and crops is out[1]
    want_in, want_crops = compose.prepare(list(frames), boxes.tolist(), impl="torch")
    assert_u8_close(crops, want_crops, "crop328 downscale")
    assert torch.equal(inputs, expected_inputs(crops, torch.float32))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_paste_small(small, dtype):
    frames, boxes, g = small
    crops = torch.randint(0, 256, (3, 328, 328, 3), dtype=torch.uint8, generator=g)
    same = check_paste(frames, crops, random_pred(3, g, dtype), boxes, interpret=True)
    print(f"paste {dtype}: {same:.4%} of frame values identical")


@needs_triton
def test_paste_upscale_strided_pred():
    """328 -> boxes larger than 328, and a pred that is a non-contiguous view (channels_last)."""
    g = torch.Generator().manual_seed(9)
    frames = torch.randint(0, 256, (2, 352, 400, 3), dtype=torch.uint8, generator=g)
    boxes = torch.tensor([[0, 0, 400, 352], [30, 2, 371, 343]])
    crops = torch.randint(0, 256, (2, 328, 328, 3), dtype=torch.uint8, generator=g)
    pred = random_pred(2, g).contiguous(memory_format=torch.channels_last)
    check_paste(frames, crops, pred, boxes, interpret=True)


def _sanders_frame(root: Path, i: int):
    """Frame i (BGR, as cv2 decodes it) and its face box from landmarks (RECIPE §5)."""
    from lipsync_trt import avatar
    jpg = root / "full_body_img" / f"{i}.jpg"
    img = avatar.decode(jpg, *avatar.read_jpeg(jpg)[1])
    box = avatar.face_box(avatar.read_landmarks(root / "landmarks" / f"{i}.lms"), *img.shape[:2])
    return torch.from_numpy(img), box


@needs_triton
def test_real_frame_roundtrip(sanders):
    """sanders frame 0 with its landmark box (RECIPE §5): prepare, then paste a prediction back."""
    frame, box = _sanders_frame(sanders, 0)
    frames, boxes = frame[None], torch.tensor([box])
    same = check_prepare(frames, boxes, torch.float16, interpret=True)
    _, crops = compose.prepare([frame], [box], torch.float16, impl="torch")
    pred = compose.prepare([frame], [box])[0][:, :3] * 0.9 + 0.05     # a plausible, face-like output
    same_paste = check_paste(frames, crops, pred, boxes, interpret=True)
    print(f"sanders 0 box {box}: prepare {same:.4%}, paste {same_paste:.4%} identical")


# --------------------------------------------------------------------------- compiled kernels on CUDA

@pytest.mark.gpu
@needs_cuda
def test_gpu_taps_bit_exact():
    pairs = [(n, 328) for n in range(1, 2049)] + [(328, n) for n in range(1, 2049)]
    idx, w = K.cubic_taps(pairs, interpret=False, device="cuda")
    idx, w = idx.cpu(), w.cpu()
    for p, (n_in, n_out) in enumerate(pairs):
        ref_i, ref_w = compose.cubic_taps(n_in, n_out)
        assert np.array_equal(idx[p, :n_out].numpy(), ref_i), (n_in, n_out)
        assert np.array_equal(w[p, :n_out].numpy().view(np.int32), ref_w.view(np.int32)), (n_in, n_out)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_random_boxes(dtype):
    g = torch.Generator().manual_seed(11)
    B, H, W = 24, 720, 1280
    frames = torch.randint(0, 256, (B, H, W, 3), dtype=torch.uint8, generator=g)
    sizes = torch.randint(8, 700, (B, 2), generator=g)
    x1 = (torch.rand(B, generator=g) * (W - sizes[:, 0])).long()
    y1 = (torch.rand(B, generator=g) * (H - sizes[:, 1])).long()
    boxes = torch.stack([x1, y1, x1 + sizes[:, 0], y1 + sizes[:, 1]], 1)
    boxes[0] = torch.tensor([W - 150, H - 90, W, H])        # cut short at the bottom-right corner
    check_prepare(frames.cuda(), boxes, dtype, interpret=False)
    crops = torch.randint(0, 256, (B, 328, 328, 3), dtype=torch.uint8, generator=g)
    pred = random_pred(B, g, dtype if dtype != torch.bfloat16 else torch.float32)
    check_paste(frames.cuda(), crops.cuda(), pred.cuda(), boxes, interpret=False)
    # boxes already on the GPU (no host read-back; the grid covers the whole frame)
    got = frames.cuda()
    K.paste(got, crops.cuda(), pred.cuda(), boxes.cuda())
    want = frames.clone()
    compose.paste(list(want), crops, pred, boxes.tolist(), impl="torch")
    assert_u8_close(got, want, "paste with GPU boxes")


@pytest.mark.gpu
@needs_cuda
def test_gpu_real_frames(sanders):
    pairs = [_sanders_frame(sanders, i) for i in range(8)]
    frames = torch.stack([f for f, _ in pairs]).cuda()
    boxes = torch.tensor([b for _, b in pairs])
    check_prepare(frames, boxes, torch.float16, interpret=False)
    _, crops = compose.prepare(list(frames.cpu()), boxes.tolist(), impl="torch")
    pred = compose.prepare(list(frames.cpu()), boxes.tolist(), impl="torch")[0][:, :3].flip(2)
    check_paste(frames, crops.cuda(), pred.cuda().half(), boxes, interpret=False)
