"""The MP4 writer: the x264 preset reaches the encoder (x264 writes its settings into the stream), bad presets
are refused before anything is written."""
from __future__ import annotations

import re

import numpy as np
import pytest

from lipsync_trt.errors import OutputError
from lipsync_trt.video import VideoWriter


def x264_settings(path) -> dict[str, str]:
    """The 'options:' string x264 embeds in its SEI user data, as a dict."""
    text = path.read_bytes().decode("latin-1")
    m = re.search(r"x264 - core \d+.*? options: ([^\x00]*)", text)
    assert m, "no x264 settings SEI in the file"
    return dict(kv.split("=", 1) for kv in m.group(1).split() if "=" in kv)


@pytest.mark.parametrize("preset, subme", [("medium", "7"), ("veryfast", "2")])   # x264's preset table
def test_preset_reaches_the_encoder(tmp_path, preset, subme):
    out = tmp_path / f"{preset}.mp4"
    rng = np.random.default_rng(0)
    with VideoWriter(out, 64, 48, preset=preset) as w:
        for _ in range(5):
            w.write(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    opts = x264_settings(out)
    assert opts["subme"] == subme and opts["crf"].startswith("20.")   # the reference's -crf 20


def test_unknown_preset_is_refused_and_nothing_written(tmp_path):
    with pytest.raises(OutputError, match="unknown x264 preset 'quick'"):
        VideoWriter(tmp_path / "x.mp4", 64, 48, preset="quick")
    assert list(tmp_path.iterdir()) == []


def _roundtrip(path, frames, **kw) -> list[np.ndarray]:
    """Write `frames` losslessly (crf 0) with VideoWriter and decode them back with FFmpeg's own converter."""
    import av

    h, w = frames[0].shape[:2]
    with VideoWriter(path, w, h, crf=0, **kw) as wr:
        for f in frames:
            wr.write(f)
    with av.open(str(path)) as c:
        cc = c.streams.video[0].codec_context
        assert (cc.colorspace, cc.color_range) == (6, 1), "stream not tagged BT.601 limited range"
        return [fr.to_ndarray(format="bgr24") for fr in c.decode(video=0)]


def test_flat_colours_survive_the_yuv_conversion(tmp_path):
    # 8x8-pixel flat blocks: chroma subsampling cannot blur them, so only the matrix and range are tested;
    # a full-range/limited-range or BT.601/BT.709 mismatch between writer and decoder shifts them by >5
    rng = np.random.default_rng(1)
    colours = rng.integers(0, 256, (6 * 8, 3), dtype=np.uint8)
    colours[:8] = [[0, 0, 0], [255, 255, 255], [0, 0, 255], [0, 255, 0], [255, 0, 0], [128, 128, 128],
                   [255, 255, 0], [16, 235, 128]]
    frame = np.kron(colours.reshape(6, 8, 3), np.ones((8, 8, 1), dtype=np.uint8)).astype(np.uint8)
    (got,) = _roundtrip(tmp_path / "flat.mp4", [frame])
    centres = got[4::8, 4::8].astype(int)
    assert np.abs(centres - colours.reshape(6, 8, 3)).max() <= 3, "flat"


def test_natural_frames_no_worse_than_ffmpegs_own_conversion(tmp_path, sanders):
    """OpenCV's I420 conversion (what write uses) against PyAV/swscale's bgr24 input, both lossless H.264."""
    import av
    import cv2

    frames = [cv2.imread(str(p)) for p in sorted(sanders.glob("full_body_img/*.jpg"))[:3]]
    h, w = frames[0].shape[:2]
    ours = _roundtrip(tmp_path / "ours.mp4", frames)
    ref_path = tmp_path / "swscale.mp4"
    with av.open(str(ref_path), "w", format="mp4") as c:
        vs = c.add_stream("libx264", rate=25)
        vs.width, vs.height, vs.pix_fmt, vs.options = w, h, "yuv420p", {"crf": "0"}
        for i, f in enumerate(frames):
            fr = av.VideoFrame.from_ndarray(f, format="bgr24")
            fr.pts = i
            c.mux(vs.encode(fr))
        c.mux(vs.encode(None))
    with av.open(str(ref_path)) as c:
        ref = [fr.to_ndarray(format="bgr24") for fr in c.decode(video=0)]
    for f, a, b in zip(frames, ours, ref):
        err_ours = np.abs(a.astype(int) - f).mean()
        err_ref = np.abs(b.astype(int) - f).mean()
        assert err_ours <= err_ref + 0.05 and err_ours < 2.0, (err_ours, err_ref)


def test_wrong_frame_shape_is_refused_and_nothing_written(tmp_path):
    out = tmp_path / "x.mp4"
    with pytest.raises(OutputError, match=r"frame 0 is uint8 \(48, 64, 3\), expected uint8 \(48, 66, 3\)"):
        with VideoWriter(out, 66, 48) as w:
            w.write(np.zeros((48, 64, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []
