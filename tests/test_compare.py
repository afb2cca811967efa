"""`python -m lipsync_trt compare` (issue #16) against figures computed here from their definitions: PSNR from a
known error, SSIM of flat images from its closed form, face boxes from the recipe's own ping-pong loop."""
from __future__ import annotations

import json
import math
import sys

import cv2
import numpy as np
import pytest

from lipsync_trt import avatar as avatar_mod
from lipsync_trt.__main__ import main
from lipsync_trt.bench import reference
from lipsync_trt.compare import compare
from lipsync_trt.demo import make_avatar
from lipsync_trt.errors import CompareError

pytest.importorskip("skimage", reason="compare needs scikit-image (pip install 'lipsync_trt[compare]')")


def write_frames(folder, frames, first: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    for k, f in enumerate(frames):
        assert cv2.imwrite(str(folder / f"{first + k:06d}.png"), f)
    return folder


def random_frames(n: int, h: int = 48, w: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [rng.integers(10, 246, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def checker(h: int, w: int, amp: int) -> np.ndarray:
    """+amp / -amp in a checkerboard over pixels and channels: every value off by exactly amp."""
    y, x, c = np.indices((h, w, 3))
    return np.where((x + y + c) % 2 == 0, amp, -amp).astype(np.int32)


def test_identical_clips(tmp_path):
    frames = random_frames(3)
    a = write_frames(tmp_path / "a", frames)
    b = write_frames(tmp_path / "b", frames)
    r = compare(a, b)
    assert r["frames"] == 3 and len(r["per_frame"]) == 3
    t = r["whole"]
    assert math.isinf(t["psnr"]) and math.isinf(t["psnr_min"])
    assert t["ssim"] == 1.0 and t["max_abs"] == 0 and t["mean_abs"] == 0


def test_psnr_of_a_known_error(tmp_path):
    """Every value off by exactly 3: MSE 9, PSNR = 10 log10(255^2 / 9) by the formula; one frame off by 5 instead
    changes the pooled PSNR to that of the mean squared error over all frames."""
    frames = random_frames(4, seed=1)
    off = [np.clip(f.astype(np.int32) + checker(*f.shape[:2], 5 if k == 2 else 3), 0, 255).astype(np.uint8)
           for k, f in enumerate(frames)]
    r = compare(write_frames(tmp_path / "a", frames), write_frames(tmp_path / "b", off))
    per = [row["whole"] for row in r["per_frame"]]
    assert per[0]["psnr"] == pytest.approx(10 * math.log10(255 ** 2 / 9), abs=1e-9)
    assert per[2]["psnr"] == pytest.approx(10 * math.log10(255 ** 2 / 25), abs=1e-9)
    assert r["whole"]["psnr"] == pytest.approx(10 * math.log10(255 ** 2 / ((3 * 9 + 25) / 4)), abs=1e-9)
    assert r["whole"]["psnr_min"] == pytest.approx(per[2]["psnr"])
    assert r["whole"]["max_abs"] == 5 and per[0]["max_abs"] == 3
    assert r["whole"]["mean_abs"] == pytest.approx((3 * 3 + 5) / 4)
    assert all(0 < p["ssim"] < 1 for p in per)


def test_ssim_of_flat_images(tmp_path):
    """Flat images v and v + c: no variance, so SSIM is the luminance term (2 v (v+c) + C1) / (v^2 + (v+c)^2 + C1),
    C1 = (0.01 * 255)^2, everywhere."""
    v, c = 100.0, 30.0
    a = [np.full((32, 40, 3), v, np.uint8)]
    b = [np.full((32, 40, 3), v + c, np.uint8)]
    r = compare(write_frames(tmp_path / "a", a), write_frames(tmp_path / "b", b))
    c1 = (0.01 * 255) ** 2
    assert r["whole"]["ssim"] == pytest.approx((2 * v * (v + c) + c1) / (v ** 2 + (v + c) ** 2 + c1), abs=1e-9)


def test_face_box_of_each_frame(tmp_path):
    """Frame i differs from its twin only outside template order[i]'s box (the recipe's loop): the face figures
    are those of identical images, the whole frame's are not."""
    root = make_avatar(tmp_path / "avatar", count=5)
    av = avatar_mod.load(root)
    order = reference.frame_order(av.count, 12)
    a = random_frames(12, av.height, av.width, seed=2)
    b = []
    for i, f in enumerate(a):
        g = f.copy()
        x1, y1, x2, y2 = (int(v) for v in av.boxes[order[i]])
        g[:, :x1] ^= 1
        b.append(g)
    r = compare(write_frames(tmp_path / "a", a), write_frames(tmp_path / "b", b), avatar=root)
    assert math.isinf(r["face"]["psnr"]) and r["face"]["ssim"] == 1.0
    assert r["whole"]["max_abs"] == 1 and not math.isinf(r["whole"]["psnr"])
    assert [row["box"] for row in r["per_frame"]] == [[int(v) for v in av.boxes[t]] for t in order]
    # and a difference inside the box shows in the face figures
    b[5][int(av.boxes[order[5]][1]) + 2, int(av.boxes[order[5]][0]) + 2] ^= 8
    r = compare(tmp_path / "a", write_frames(tmp_path / "b", b), avatar=root)
    assert r["per_frame"][5]["face"]["max_abs"] == 8 and r["face"]["max_abs"] == 8


def test_cli_mismatches_exit_2(tmp_path, capsys):
    a = write_frames(tmp_path / "a", random_frames(4))
    b = write_frames(tmp_path / "b", random_frames(3))
    assert main(["compare", str(a), str(b)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "4 frames" in err and "3" in err
    c = write_frames(tmp_path / "c", random_frames(4, w=66))
    assert main(["compare", str(a), str(c)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "64x48" in err and "66x48" in err
    assert main(["compare", str(a), str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
    shifted = write_frames(tmp_path / "shifted", random_frames(4), first=1)     # frames 1..4 against 0..3
    assert main(["compare", str(a), str(shifted)]) == 2
    assert "0..3" in capsys.readouterr().err
    avatar = make_avatar(tmp_path / "avatar", count=3)                          # 256x192 templates
    assert main(["compare", str(a), str(a), "--avatar", str(avatar)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "256x192" in err and "64x48" in err


def test_videos_and_json(tmp_path, capsys):
    """Two MP4s (PyAV): the same file twice is identical; clips of different lengths exit 2; --json writes every
    figure, with an infinite PSNR as "inf"."""
    from lipsync_trt.video import VideoWriter

    frames = random_frames(5, 48, 64, seed=4)
    for name, n in (("a.mp4", 5), ("short.mp4", 4)):
        with VideoWriter(tmp_path / name, 64, 48, crf=0) as w:
            for f in frames[:n]:
                w.write(f)
    out = tmp_path / "r.json"
    assert main(["compare", str(tmp_path / "a.mp4"), str(tmp_path / "a.mp4"), "--json", str(out)]) == 0
    assert "5 frames" in capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["frames"] == 5 and r["whole"]["psnr"] == "inf" and len(r["per_frame"]) == 5
    assert main(["compare", str(tmp_path / "a.mp4"), str(tmp_path / "short.mp4")]) == 2
    err = capsys.readouterr().err
    assert "short.mp4 ends after 4 frames" in err


def test_missing_scikit_image(tmp_path, monkeypatch):
    a = write_frames(tmp_path / "a", random_frames(1))
    monkeypatch.setitem(sys.modules, "skimage.metrics", None)
    with pytest.raises(CompareError, match=r"scikit-image.*lipsync_trt\[compare\]"):
        compare(a, a)
