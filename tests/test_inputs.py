"""Inputs that are not regular files (#20.1): a link to /dev/zero, a FIFO or an oversized file given as a template
JPEG, landmarks, checkpoint, WAV, batch jobs file, compare frame or serve's avatar frame ends in one line and exit 2,
without hanging and without an unbounded read. compare refuses frames too large from their headers, before decoding
(#20.4), and a checkpoint that is a plain pickle is one line, with no torch warning above it (#20.7)."""
from __future__ import annotations

import contextlib
import os
import pickle
import resource
import shutil
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import pytest

from lipsync_trt import avatar as avatar_mod
from lipsync_trt import inputs
from lipsync_trt.__main__ import main
from lipsync_trt.errors import AvatarError, CheckpointError, CompareError


def one_line_error(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


@contextlib.contextmanager
def fifo_release(*fifos: Path, after: float = 8.0):
    """If the code under test blocks on one of these FIFOs for `after` seconds, open and close their write ends (again
    and again until the block ends) so that it reads EOF and goes on: the test then fails on `hung` instead of
    hanging for ever."""
    done, hung = threading.Event(), []

    def release():
        if done.wait(after):
            return
        while not done.wait(0.2):
            for f in fifos:
                try:
                    os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))   # ENXIO while nobody has it open to read
                    hung.append(str(f))
                except OSError:
                    pass

    t = threading.Thread(target=release, daemon=True)
    t.start()
    try:
        yield hung
    finally:
        done.set()
        t.join()


def generate_argv(demo, **over) -> list[str]:
    args = {"--avatar": demo["avatar"], "--audio": demo["audio"], "--generator": demo["generator"],
            "--audio-encoder": demo["audio_encoder"], **over}
    return ["generate", "--backend", "torch", "--quiet"] + [str(x) for kv in args.items() for x in kv]


@pytest.fixture
def avatar_copy(demo, tmp_path) -> Path:
    return Path(shutil.copytree(demo["avatar"], tmp_path / "avatar"))


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))   # an unbounded read ends in MemoryError, not in OOM


@pytest.mark.parametrize("name", ["full_body_img/1.jpg", "landmarks/1.lms"])
def test_link_to_dev_zero_in_the_avatar_is_one_line(demo, avatar_copy, tmp_path, name):
    target = avatar_copy / name
    target.unlink()
    target.symlink_to("/dev/zero")
    r = subprocess.run([sys.executable, "-m", "lipsync_trt", *generate_argv(demo, **{"--avatar": avatar_copy,
                                                                                       "--out": tmp_path / "x.mp4"})],
                       capture_output=True, text=True, timeout=120, preexec_fn=_limit_memory)
    assert r.returncode == 2, r.stderr[-2000:]
    line = one_line_error(r.stderr)
    assert f"{target}: " in line and "character device" in line and "not a regular file" in line
    assert not (tmp_path / "x.mp4").exists()


def _fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    os.mkfifo(path)
    return path


def _frames(folder: Path, n: int = 2, fifo_at: int | None = None) -> Path:
    import cv2
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        if i == fifo_at:
            _fifo(folder / f"{i:06d}.png")
        else:
            assert cv2.imwrite(str(folder / f"{i:06d}.png"), np.full((32, 32, 3), 40 * i, np.uint8))
    return folder


def _case(name: str, demo, avatar: Path, tmp: Path) -> tuple[list[str], Path]:
    """(argv, the FIFO) of one command whose input is a FIFO."""
    if name in ("landmarks", "template"):
        fifo = _fifo(avatar / ("landmarks/1.lms" if name == "landmarks" else "full_body_img/1.jpg"))
        return generate_argv(demo, **{"--avatar": avatar, "--out": tmp / "x.mp4"}), fifo
    if name in ("audio", "generator", "audio_encoder"):
        fifo = _fifo(tmp / {"audio": "in.wav", "generator": "g.pth", "audio_encoder": "a.pth"}[name])
        return generate_argv(demo, **{f"--{name.replace('_', '-')}": fifo, "--out": tmp / "x.mp4"}), fifo
    if name == "jobs":
        fifo = _fifo(tmp / "jobs.jsonl")
        return ["batch", str(fifo), "--backend", "torch", "--quiet"], fifo
    if name == "compare_png":
        a, b = _frames(tmp / "a", fifo_at=1), _frames(tmp / "b")
        return ["compare", str(a), str(b)], a / "000001.png"
    if name == "compare_mp4":
        fifo = _fifo(tmp / "a.mp4")
        return ["compare", str(fifo), str(_frames(tmp / "b"))], fifo
    if name == "serve":
        fifo = _fifo(avatar / "full_body_img" / "1.jpg")
        return ["serve", "--avatar", f"me={avatar}", "--generator", str(demo["generator"]), "--audio-encoder",
                str(demo["audio_encoder"]), "--backend", "torch", "--device", "cpu", "--port", "0"], fifo
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["landmarks", "template", "audio", "generator", "audio_encoder", "jobs",
                                  "compare_png", "compare_mp4", "serve"])
def test_fifo_input_is_one_line_and_does_not_hang(demo, avatar_copy, tmp_path, capsys, name):
    if name.startswith("compare"):
        pytest.importorskip("skimage")
    if name == "serve":
        pytest.importorskip("aiohttp")
    argv, fifo = _case(name, demo, avatar_copy, tmp_path)
    with fifo_release(fifo) as hung:
        code = main(argv)
    err = capsys.readouterr().err
    assert not hung, f"blocked on {fifo}"
    assert code == 2, err
    line = one_line_error(err)
    assert f"{fifo}: " in line and "a FIFO" in line and "not a regular file" in line
    assert not (tmp_path / "x.mp4").exists()


@pytest.mark.parametrize("what", ["jpeg", "lms"])
def test_oversized_avatar_file_is_refused_before_reading(avatar_copy, what):
    """A sparse file one byte over the bound: refused from its size, naming the bound (never read)."""
    path = avatar_copy / ("full_body_img/1.jpg" if what == "jpeg" else "landmarks/1.lms")
    bound = inputs.MAX_JPEG_BYTES if what == "jpeg" else inputs.MAX_LANDMARKS_BYTES
    os.truncate(path, bound + 1)
    with pytest.raises(AvatarError) as info:
        avatar_mod.load(avatar_copy)
    assert str(info.value).startswith(f"{path}: ") and f"{bound + 1} bytes" in str(info.value)
    assert f"at most {bound}" in str(info.value)


def test_oversized_checkpoint_is_refused_before_reading(tmp_path):
    from lipsync_trt.models.checkpoints import read_state_dict, sha256

    path = tmp_path / "g.pth"
    path.touch()
    os.truncate(path, inputs.MAX_CHECKPOINT_BYTES + 1)
    for fn in (read_state_dict, sha256):
        with pytest.raises(CheckpointError, match=rf"g\.pth: .*{inputs.MAX_CHECKPOINT_BYTES + 1} bytes.*at most"):
            fn(path)


def test_the_bounds_fit_the_real_data_with_a_wide_margin(sanders):
    """The bounds are at least 100x what sanders' largest template and landmarks file need."""
    jpeg = max(p.stat().st_size for p in (sanders / "full_body_img").iterdir())
    lms = max(p.stat().st_size for p in (sanders / "landmarks").iterdir())
    assert inputs.MAX_JPEG_BYTES >= 100 * jpeg and inputs.MAX_LANDMARKS_BYTES >= 50 * lms


# ------------------------------------------------------------------------------------- compare: sizes from headers

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR states width x height (8-bit RGB), with only the first rows' data: a decoder would have to
    allocate the whole image before finding out it is short."""
    rows = zlib.compress(b"\0" * (1 + 3 * width) * 4)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + _chunk(b"IDAT", rows) + _chunk(b"IEND", b""))
    return path


def test_compare_refuses_huge_pngs_from_their_headers(tmp_path, capsys):
    pytest.importorskip("skimage")
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        png_header_only(tmp_path / name / "000000.png", 20000, 20000)
    code = main(["compare", str(tmp_path / "a"), str(tmp_path / "b")])
    line = one_line_error(capsys.readouterr().err)
    assert code == 2
    assert f"{tmp_path / 'a' / '000000.png'}: " in line and "20000x20000" in line
    assert f"{inputs.MAX_FRAME_SIDE}" in line


def test_compare_refuses_a_video_larger_than_the_bound_from_its_header(tmp_path, monkeypatch):
    """The MP4's stream size is read before any frame is decoded (the bound lowered to below a 64x48 clip)."""
    pytest.importorskip("skimage")
    import numpy as np

    from lipsync_trt import compare as compare_mod
    from lipsync_trt.video import VideoWriter

    for name in ("a.mp4", "b.mp4"):
        with VideoWriter(tmp_path / name, 64, 48) as w:
            for _ in range(2):
                w.write(np.zeros((48, 64, 3), np.uint8))
    monkeypatch.setattr(inputs, "MAX_FRAME_PIXELS", 64 * 48 - 1)
    with pytest.raises(CompareError, match=r"a\.mp4: video frames are 64x48; .*at most 3071 pixels"):
        compare_mod.compare(tmp_path / "a.mp4", tmp_path / "b.mp4")


# ------------------------------------------------------------------------------------- a plain pickle checkpoint

@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_plain_pickle_checkpoint_is_exactly_one_line(demo, tmp_path):
    path = tmp_path / "plain.pth"
    with open(path, "wb") as f:
        pickle.dump({"inc.inconv.0.conv.0.weight": [1, 2, 3]}, f, protocol=4)
    r = subprocess.run([sys.executable, "-m", "lipsync_trt", *generate_argv(demo, **{"--generator": path,
                                                                                       "--out": tmp_path / "x.mp4"})],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1, r.stderr
    assert one_line_error(r.stderr).startswith(f"error: {path}: not a readable PyTorch state_dict")
