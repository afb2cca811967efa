"""A damaged template JPEG is found, not rendered (#13): libjpeg (through OpenCV) decodes a truncated file, one with
foreign scan bytes or bad Huffman codes with only a warning on stderr, so the avatar checks each file's byte structure
and decodes it strictly (FFmpeg's decoder, err_detect=explode) at load and again at decode when the file changed."""
from __future__ import annotations

import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest

import lipsync_trt
from lipsync_trt import avatar as avatar_mod
from lipsync_trt.errors import AvatarError, LipsyncError


def random_tail(data: bytes, seed: int, keep: int = 700) -> bytes:
    """The issue's damage: the first `keep` bytes (headers and the start of the scan) kept, the rest random."""
    rng = np.random.default_rng(seed)
    return data[:keep] + rng.integers(0, 256, len(data) - keep, dtype=np.uint8).tobytes()


@pytest.fixture()
def sanders_copy(sanders, tmp_path):
    """The first 6 sanders frames as an avatar of their own (a copy to damage)."""
    root = tmp_path / "avatar"
    for sub, ext in (("full_body_img", "jpg"), ("landmarks", "lms")):
        (root / sub).mkdir(parents=True)
        for n in range(6):
            shutil.copy(sanders / sub / f"{n}.{ext}", root / sub / f"{n}.{ext}")
    return root


def test_sound_frames_pass_and_decode_as_opencv_does(sanders):
    for n in (0, 261, 522):
        path = sanders / "full_body_img" / f"{n}.jpg"
        ref = cv2.imread(str(path), cv2.IMREAD_COLOR)
        assert avatar_mod.read_jpeg(path)[1] == ref.shape[:2]
        assert np.array_equal(avatar_mod.decode(path, *ref.shape[:2]), ref)


@pytest.mark.parametrize("seed", range(20))
def test_random_scan_data_is_found(sanders, seed):
    data = random_tail((sanders / "full_body_img" / "3.jpg").read_bytes(), seed)
    # OpenCV alone renders it (libjpeg only warns): this is what must not happen silently
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is not None
    with pytest.raises(AvatarError, match="corrupt JPEG|truncated JPEG"):
        avatar_mod.check_jpeg(data, "3.jpg")


def scrambled_scan(data: bytes, seed: int, count: int = 1000) -> bytes:
    """`count` bytes of the scan data replaced, never by or over a 0xFF: the byte structure stays intact."""
    rng = np.random.default_rng(seed)
    out = bytearray(data)
    for k in rng.choice(np.arange(1000, len(data) - 200), count, replace=False):
        v = int(rng.integers(0, 255))
        if out[k] != 0xFF and out[k - 1] != 0xFF:
            out[k] = v
    return bytes(out)


@pytest.mark.parametrize("seed", range(5))
def test_bad_huffman_data_with_a_sound_structure_is_found(sanders, seed):
    data = scrambled_scan((sanders / "full_body_img" / "3.jpg").read_bytes(), seed)
    assert avatar_mod.check_structure(data, "3.jpg") == (720, 1280)         # the bytes look like a JPEG
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is not None   # libjpeg only warns
    with pytest.raises(AvatarError, match="3.jpg: corrupt JPEG"):
        avatar_mod.check_jpeg(data, "3.jpg")


@pytest.mark.parametrize("cut", [0.99, 0.5, 0.01])
def test_truncated_file_is_found(sanders, cut):
    data = (sanders / "full_body_img" / "3.jpg").read_bytes()
    with pytest.raises(AvatarError, match="truncated|corrupt|not a JPEG"):
        avatar_mod.check_jpeg(data[:int(len(data) * cut)], "3.jpg")


@pytest.mark.parametrize("damage", ["random_tail", "truncated", "scrambled_scan"])
def test_cli_stops_before_rendering_with_one_line(sanders_copy, demo, tmp_path, damage):
    frame = sanders_copy / "full_body_img" / "4.jpg"
    data = frame.read_bytes()
    frame.write_bytes({"random_tail": random_tail(data, 1), "truncated": data[:len(data) // 2],
                       "scrambled_scan": scrambled_scan(data, 1)}[damage])
    out = tmp_path / "out.mp4"
    r = subprocess.run([sys.executable, "-m", "lipsync_trt", "generate", "--avatar", str(sanders_copy), "--audio",
                        str(demo["audio"]), "--generator", str(demo["generator"]), "--audio-encoder",
                        str(demo["audio_encoder"]), "--out", str(out), "--backend", "torch", "--quiet"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(frame) in lines[0], r.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.mp4*"))


def test_frame_damaged_after_load_fails_the_render(sanders_copy, demo, tmp_path):
    ls = lipsync_trt.load(sanders_copy, demo["generator"], demo["audio_encoder"], backend="torch", device="cpu")
    frame = sanders_copy / "full_body_img" / "2.jpg"
    frame.write_bytes(scrambled_scan(frame.read_bytes(), 2))   # changed after load: found at its decode
    out = tmp_path / "out.mp4"
    with pytest.raises(LipsyncError, match="2.jpg"):
        ls.generate(demo["audio"], out)
    assert not out.exists() and not list(tmp_path.glob(".out.mp4*"))
