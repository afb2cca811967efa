"""`--blend feather[:PX]` (issue #16): the ramp against an alpha computed here from the issue's definition, the
three compositing paths against each other, and the seam it removes on real sanders frames."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lipsync_trt import compose
from lipsync_trt.bench import reference
from lipsync_trt.errors import UsageError

try:
    import triton  # noqa: F401
    _NO_TRITON = None
except Exception as exc:  # pragma: no cover - depends on the environment
    _NO_TRITON = f"triton is not importable ({exc}); pip install triton"


def oracle_alpha(h: int, w: int, px: int) -> np.ndarray:
    """Raised cosine from 0 on the box's outermost pixels to 1 at px pixels inside, in float64."""
    y, x = np.indices((h, w))
    d = np.minimum.reduce([x, y, w - 1 - x, h - 1 - y])
    return 0.5 - 0.5 * np.cos(np.pi * np.minimum(d, px) / px), d


def hard_paste(frame: np.ndarray, crop: np.ndarray, pred: np.ndarray, box) -> np.ndarray:
    """The reference's paste with OpenCV (lipsync_trt.bench.reference) into copies: pred (3, 320, 320) in [0, 1]
    into the crop's inner 320, resized to the box."""
    return reference.paste(frame.copy(), crop.copy(), pred, box)


@pytest.fixture(scope="module")
def batch():
    """Frames, crop328s, predictions and boxes: a box wider than 2 PX, a small one (the ramp never reaches 1
    inside it), and one touching the frame's corner."""
    g = torch.Generator().manual_seed(16)
    frames = torch.randint(0, 256, (3, 96, 128, 3), dtype=torch.uint8, generator=g)
    frames[0] = torch.linspace(0, 255, 128).to(torch.uint8)[None, :, None]     # smooth template too
    crops = torch.randint(0, 256, (3, 328, 328, 3), dtype=torch.uint8, generator=g)
    pred = torch.rand((3, 3, 320, 320), generator=g)
    boxes = [(10, 6, 90, 80), (100, 60, 121, 77), (70, 40, 128, 96)]
    return frames, crops, pred, boxes


def test_parse_blend():
    assert compose.parse_blend(None) == 0
    assert compose.parse_blend("none") == 0
    assert compose.parse_blend("feather") == 16          # the default width
    assert compose.parse_blend("feather:8") == 8
    assert compose.parse_blend(" Feather:1 ") == 1
    for bad in ("", "soft", "feather:", "feather:0", "feather:-4", "feather:2.5", "feather:x", "none:3",
                "feather:1025", "feather:99999999999"):
        with pytest.raises(UsageError, match="--blend"):
            compose.parse_blend(bad)


@pytest.mark.parametrize("impl", ["torch", "opencv"])
@pytest.mark.parametrize("px", [1, 6, 16])
def test_feather_ramp(batch, impl, px):
    """Outside the box and deeper than PX: the pixels of `none` (the same path's hard paste); the outermost ring:
    the template's; in between: the alpha blend of template and hard paste (to the nearest level), strictly
    between them where rounding leaves room."""
    frames, crops, pred, boxes = batch
    none = [o.numpy() for o in compose.paste([f.clone() for f in frames], crops, pred, boxes, impl=impl)]
    got = compose.paste([f.clone() for f in frames], crops, pred, boxes, impl=impl, feather=px)
    ramp_pixels = 0
    for f, n, o, (x1, y1, x2, y2) in zip(frames, none, got, boxes):
        f, o = f.numpy(), o.numpy()
        outside = np.ones(f.shape[:2], bool)
        outside[y1:y2, x1:x2] = False
        assert np.array_equal(o[outside], f[outside])
        a, d = oracle_alpha(y2 - y1, x2 - x1, px)
        t = f[y1:y2, x1:x2].astype(np.int32)
        g = n[y1:y2, x1:x2].astype(np.int32)
        b = o[y1:y2, x1:x2].astype(np.int32)
        assert np.array_equal(b[d >= px], g[d >= px]), "deeper than PX must be the hard paste"
        assert np.array_equal(b[d == 0], t[d == 0]), "the box's outermost pixels must be the template's"
        want = t + a[:, :, None] * (g - t)
        assert np.abs(b - want).max() <= 0.5 + 1e-3     # round to nearest: float32 vs float64 alpha at worst 1 tie
        ramp = np.broadcast_to(((d > 0) & (d < px))[:, :, None], b.shape)
        lo, hi = np.minimum(t, g), np.maximum(t, g)
        assert ((b >= lo) & (b <= hi))[ramp].all()
        clear = ramp & (a[:, :, None] * np.abs(g - t) >= 1) & ((1 - a[:, :, None]) * np.abs(g - t) >= 1)
        assert ((b > lo) & (b < hi))[clear].all()
        ramp_pixels += int(clear.sum())
    assert ramp_pixels > 0 or px == 1


@pytest.mark.parametrize("impl", ["torch", "opencv"])
def test_feather_zero_is_hard_paste(batch, impl):
    frames, crops, pred, boxes = batch
    """feather=0 is the reference's paste: OpenCV's pixels exactly on the OpenCV path, within its +-1 on the
    PyTorch path (compose's documented agreement with cv2.resize)."""
    got = compose.paste([f.clone() for f in frames], crops, pred, boxes, impl=impl, feather=0)
    for f, c, p, b, o in zip(frames, crops, pred, boxes, got):
        want = hard_paste(f.numpy(), c.numpy(), p.numpy(), b)
        d = np.abs(o.numpy().astype(np.int32) - want)
        if impl == "opencv":
            assert not d.any()
        else:
            assert d.max() <= 1 and (d > 0).mean() <= 0.001


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> float:
    d = (a.int() - b.int()).abs()
    assert int(d.max()) <= 1, f"{what}: max difference {int(d.max())}"
    return float((d == 0).double().mean())


@pytest.mark.parametrize("px", [5, 16])
def test_paths_agree(batch, px):
    """PyTorch, OpenCV and the Triton kernel (interpreter) within 1 level of each other."""
    frames, crops, pred, boxes = batch
    ref = torch.stack(compose.paste([f.clone() for f in frames], crops, pred, boxes, impl="torch", feather=px))
    cv = torch.stack(compose.paste([f.clone() for f in frames], crops, pred, boxes, impl="opencv", feather=px))
    print(f"opencv vs torch px={px}: {_close(cv, ref, 'opencv'):.4%} identical")
    assert not torch.equal(ref, torch.stack(compose.paste([f.clone() for f in frames], crops, pred, boxes,
                                                          impl="torch")))
    if _NO_TRITON:
        pytest.skip(_NO_TRITON)
    from lipsync_trt import kernels

    got = frames.clone()
    kernels.paste(got, crops, pred, torch.tensor(boxes), interpret=True, feather=px)
    print(f"triton vs torch px={px}: {_close(got, ref, 'triton'):.4%} identical")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or _NO_TRITON is not None, reason="needs CUDA and triton")
@pytest.mark.parametrize("px", [5, 16])
def test_gpu_paths_agree(batch, px):
    """The compiled Triton kernel and the PyTorch path on CUDA, feathered, within 1 level of the CPU PyTorch path."""
    frames, crops, pred, boxes = batch
    ref = torch.stack(compose.paste([f.clone() for f in frames], crops, pred, boxes, impl="torch", feather=px))
    got = compose.paste(frames.cuda(), crops.cuda(), pred.cuda(), boxes, impl="triton", feather=px)
    print(f"cuda triton vs torch px={px}: {_close(got.cpu(), ref, 'cuda triton'):.4%} identical")
    got = compose.paste(list(frames.cuda()), crops.cuda(), pred.cuda(), boxes, impl="torch", feather=px)
    print(f"cuda torch vs torch px={px}: {_close(torch.stack(got).cpu(), ref, 'cuda torch'):.4%} identical")


@pytest.mark.parametrize("impl", ["torch", "opencv"])
def test_mouths_match_paste(batch, impl):
    """mouths(templates=...) is what paste writes into the box; without templates feathering is refused."""
    frames, crops, pred, boxes = batch
    pasted = compose.paste([f.clone() for f in frames], crops, pred, boxes, impl=impl, feather=7)
    templates = [f[y1:y2, x1:x2].numpy() for f, (x1, y1, x2, y2) in zip(frames, boxes)]
    ms = compose.mouths(crops, pred, boxes, impl=impl, feather=7, templates=templates)
    for m, o, (x1, y1, x2, y2) in zip(ms, pasted, boxes):
        assert torch.equal(m, o[y1:y2, x1:x2])
    with pytest.raises(ValueError, match="templates"):
        compose.mouths(crops, pred, boxes, impl=impl, feather=7)
    with pytest.raises(ValueError, match="feather"):
        compose.paste([f.clone() for f in frames], crops, pred, boxes, impl=impl, feather=-1)


def seam_profile(frame: np.ndarray, box, depth: int) -> np.ndarray:
    """Mean absolute step between neighbouring pixels across each side of the box, for k = 0..depth: step k is
    between the pixels k-1 and k counted from the side (k = 0 is across the edge itself), over the middle part
    of each side (corners left out), all channels."""
    x1, y1, x2, y2 = box
    f = frame.astype(np.int32)
    m = depth + 1
    steps = []
    for k in range(depth + 1):
        s = [np.abs(f[y1 + m:y2 - m, x1 + k] - f[y1 + m:y2 - m, x1 + k - 1]),
             np.abs(f[y1 + m:y2 - m, x2 - 1 - k] - f[y1 + m:y2 - m, x2 - k]),
             np.abs(f[y1 + k, x1 + m:x2 - m] - f[y1 + k - 1, x1 + m:x2 - m]),
             np.abs(f[y2 - 1 - k, x1 + m:x2 - m] - f[y2 - k, x1 + m:x2 - m])]
        steps.append(np.concatenate([v.ravel() for v in s]).mean())
    return np.array(steps)


def test_seam_on_sanders(sanders, torch_runner):
    """Seam measure on real frames with the (seeded demo) generator's output: the largest mean |step| between
    neighbouring rings of pixels within PX of the box edge. With the hard paste it sits where the generator's
    320 x 320 starts (4 of the crop's 328 pixels inside the box edge); feathered, it is far lower."""
    from lipsync_trt import audio as A
    from lipsync_trt import avatar as avatar_mod
    from lipsync_trt import pipeline
    from lipsync_trt.demo import make_speech

    av = avatar_mod.load(sanders)
    ids = [0, 40, 80, 120]
    frames = [torch.from_numpy(av.frame(i).copy()) for i in ids]
    boxes = [tuple(int(v) for v in av.boxes[i]) for i in ids]
    inputs, crops = compose.prepare(frames, boxes)
    feats = pipeline.encode_features(torch_runner, make_speech(1.0, seed=3))
    with torch.no_grad():
        pred = torch_runner.generate(inputs, A.feature_windows(feats.padded, [3, 8, 13, 18]))
    px = compose.DEFAULT_FEATHER
    none = compose.paste([f.clone() for f in frames], crops, pred, boxes)
    fea = compose.paste([f.clone() for f in frames], crops, pred, boxes, feather=px)
    p_t, p_none, p_fea = (np.mean([seam_profile(f.numpy(), b, px) for f, b in zip(fs, boxes)], axis=0)
                          for fs in (frames, none, fea))
    print(f"sanders seam (largest mean |step| within {px} px of the box edge, levels): template {p_t.max():.2f}, "
          f"none {p_none.max():.2f} (at {p_none.argmax()} px), feather:{px} {p_fea.max():.2f}")
    assert p_fea[0] == pytest.approx(p_t[0])          # across the edge itself: the template's own step
    assert p_fea.max() < p_none.max()


def test_api_blend_and_override(demo, torch_runner):
    """LipSync(blend=...) feathers every frame, a per-call blend= overrides it; outside the boxes nothing changes,
    the boxes' outermost pixels are the template's."""
    from lipsync_trt import avatar as avatar_mod
    from lipsync_trt.api import LipSync

    av = avatar_mod.load(demo["avatar"])
    ls = LipSync(av, torch_runner, blend="feather:6")
    fea = dict(ls.frames(demo["audio"], frames=[0, 1]))
    none = dict(ls.frames(demo["audio"], frames=[0, 1], blend="none"))
    order = av.order(2)
    for i in (0, 1):
        x1, y1, x2, y2 = (int(v) for v in av.boxes[order[i]])
        template = av.frame(int(order[i]))
        outside = np.ones(template.shape[:2], bool)
        outside[y1:y2, x1:x2] = False
        assert np.array_equal(fea[i][outside], none[i][outside])
        assert np.array_equal(fea[i][y1, x1:x2], template[y1, x1:x2])
        assert np.array_equal(fea[i][y1 + 6:y2 - 6, x1 + 6:x2 - 6], none[i][y1 + 6:y2 - 6, x1 + 6:x2 - 6])
        assert not np.array_equal(fea[i], none[i])
    with pytest.raises(UsageError, match="--blend"):
        LipSync(av, torch_runner, blend="soft")


def test_cli_bad_blend_exits_2(tmp_path, capsys):
    from lipsync_trt.__main__ import main

    rc = main(["generate", "--avatar", str(tmp_path), "--audio", str(tmp_path / "a.wav"), "--generator", "g.pth",
               "--audio-encoder", "a.pth", "--blend", "feather:0"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--blend" in err and "feather:0" in err


@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_serve_blend(demo, torch_runner):
    """serve --blend feather:PX: the mouths the server sends (JPEG) are the feathered offline frames' boxes, not the
    hard-pasted ones; a bad --blend is a UsageError naming the option."""
    pytest.importorskip("aiohttp")
    import asyncio

    import cv2

    from lipsync_trt import avatar as avatar_mod
    from lipsync_trt.api import LipSync
    from lipsync_trt.demo import make_speech
    from lipsync_trt.serve import client as C
    from lipsync_trt.serve import protocol as P
    from lipsync_trt.serve.scheduler import ModelEntry
    from lipsync_trt.serve.server import ServeConfig, ServerThread

    def config(blend: str) -> ServeConfig:
        return ServeConfig(avatars={"demo": str(demo["avatar"])}, generators={None: str(demo["generator"])},
                           audio_encoder=str(demo["audio_encoder"]), backend="torch", device="cpu", port=0,
                           max_queue=10_000, max_delay_ms=0, blend=blend)

    with pytest.raises(UsageError, match="--blend"):
        config("feather:-1").check()
    av = avatar_mod.load(demo["avatar"])
    x24 = make_speech(0.6, P.STREAM_RATE, seed=5)
    srv = ServerThread(config("feather:8"), {"demo": ModelEntry("demo", av, torch_runner)}, torch_runner)
    try:
        res = asyncio.run(C.stream(srv.ws_url, "demo", x24))
    finally:
        srv.stop()
    audio = np.concatenate(C.chunks(x24))
    ls = LipSync(av, torch_runner)
    fea = dict(ls.frames(audio, rate=P.STREAM_RATE, blend="feather:8"))
    none = dict(ls.frames(audio, rate=P.STREAM_RATE))
    assert len(res.frames) == len(fea)
    to_fea, to_none = [], []
    for r in res.frames:
        img = cv2.imdecode(np.frombuffer(r.jpeg, np.uint8), cv2.IMREAD_COLOR).astype(np.int16)
        x1, y1, x2, y2 = (int(v) for v in r.box)
        band = oracle_alpha(y2 - y1, x2 - x1, 8)[1] < 8
        for ref, out in ((fea, to_fea), (none, to_none)):
            ok, buf = cv2.imencode(".jpg", ref[r.frame_id][y1:y2, x1:x2], [cv2.IMWRITE_JPEG_QUALITY, 95])
            d = np.abs(img - cv2.imdecode(buf, cv2.IMREAD_COLOR).astype(np.int16))
            out.append((d.mean(), d[band].mean()))
    assert max(m for m, _ in to_fea) <= 2.0                       # test_serve's tolerance through JPEG q95
    assert np.mean([b for _, b in to_fea]) < np.mean([b for _, b in to_none]) / 2
