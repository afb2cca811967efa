"""Outputs (#13): never replace what is not a regular file, the umask's mode, one line on an I/O failure with no
partial file, and nothing left behind by Ctrl-C or SIGTERM, for the MP4 and for --frames-dir."""
from __future__ import annotations

import os
import resource
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lipsync_trt.demo import make_speech, write_wav


def run_cli(*args, cwd=None, preexec_fn=None, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "lipsync_trt", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, preexec_fn=preexec_fn, env=env, timeout=timeout)


def generate_args(demo, *extra):
    return ("generate", "--avatar", demo["avatar"], "--audio", demo["audio"], "--generator", demo["generator"],
            "--audio-encoder", demo["audio_encoder"], "--backend", "torch", "--quiet", *extra)


def one_line_error(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_out_that_is_a_pipe_or_a_link_to_a_device_is_refused(demo, tmp_path):
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)
    link = tmp_path / "null.npz"
    link.symlink_to("/dev/null")
    r = run_cli(*generate_args(demo, "--out", fifo))
    assert r.returncode == 2
    assert "not a regular file" in one_line_error(r.stderr) and str(fifo) in r.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    r = run_cli("features", "--audio", demo["audio"], "--out", link)
    assert r.returncode == 2 and "not a regular file" in one_line_error(r.stderr)
    assert link.is_symlink() and os.readlink(link) == "/dev/null"
    not_dir = tmp_path / "file"
    not_dir.write_bytes(b"x")
    r = run_cli(*generate_args(demo, "--frames-dir", not_dir))
    assert r.returncode == 2 and "not a folder" in one_line_error(r.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "null.npz", "pipe.mp4"]


def _umask_022():
    os.umask(0o022)


@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_outputs_get_the_umask_mode(demo, tmp_path):
    out, frames = tmp_path / "out.mp4", tmp_path / "frames"
    r = run_cli(*generate_args(demo, "--out", out, "--frames", "0-2", "--frames-dir", frames), preexec_fn=_umask_022)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert stat.S_IMODE(frames.stat().st_mode) == 0o755
    assert sorted(p.name for p in frames.iterdir()) == ["000000.png", "000001.png", "000002.png"]
    assert {stat.S_IMODE(p.stat().st_mode) for p in frames.iterdir()} == {0o644}


def _small_files():
    """Every file this process writes is cut at 4 KiB: the write fails with EFBIG (SIGXFSZ ignored), as a full
    disk fails it with ENOSPC."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 12, 1 << 12))


@pytest.mark.parametrize("what", ["mp4", "frames", "features"])
@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_write_failure_is_one_line_and_leaves_nothing(demo, tmp_path, what):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = out_dir / {"mp4": "out.mp4", "frames": "frames", "features": "f.npz"}[what]
    if what == "features":
        args = ("features", "--audio", demo["audio"], "--audio-encoder", demo["audio_encoder"], "--out", target)
    else:
        args = generate_args(demo, "--out" if what == "mp4" else "--frames-dir", target)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    r = run_cli(*args, preexec_fn=_small_files, env=env)
    assert r.returncode == 2, r.stderr
    line = one_line_error(r.stderr)
    assert str(target) in line and "File too large" in line
    assert list(out_dir.iterdir()) == []


@pytest.fixture(scope="module")
def long_audio(tmp_path_factory) -> Path:
    """40 s of speech-like audio: long enough that a run is still rendering when it is interrupted."""
    return write_wav(tmp_path_factory.mktemp("long") / "long.wav", make_speech(40.0, 16000, seed=7))


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.parametrize("what", ["mp4", "frames"])
@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_interrupt_leaves_nothing_behind(demo, long_audio, tmp_path, sig, code, what):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = out_dir / ("out.mp4" if what == "mp4" else "frames")
    args = ["generate", "--avatar", demo["avatar"], "--audio", long_audio, "--generator", demo["generator"],
            "--audio-encoder", demo["audio_encoder"], "--backend", "torch", "--quiet",
            "--out" if what == "mp4" else "--frames-dir", target]
    proc = subprocess.Popen([sys.executable, "-m", "lipsync_trt", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600   # a loaded machine can take minutes to start rendering
    started = False
    while time.time() < deadline and proc.poll() is None and not started:
        temps = list(out_dir.glob(".*"))
        started = any(p.is_file() and p.stat().st_size > 0 or p.is_dir() and any(p.iterdir()) for p in temps)
        time.sleep(0.1)
    assert started, f"the run never started writing: {proc.poll()} {proc.stderr.read() if proc.poll() is not None else ''}"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert list(out_dir.iterdir()) == []


def test_frames_dir_creates_missing_parents_and_removes_them_on_failure(tmp_path):
    import numpy as np

    from lipsync_trt.video import FramesDir

    frame = np.zeros((4, 6, 3), np.uint8)
    with FramesDir(tmp_path / "a" / "b" / "frames") as fd:
        fd.write(0, frame)
    assert [p.name for p in (tmp_path / "a" / "b" / "frames").iterdir()] == ["000000.png"]
    with pytest.raises(KeyboardInterrupt):
        with FramesDir(tmp_path / "x" / "y" / "frames") as fd:
            fd.write(0, frame)
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
