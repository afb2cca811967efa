"""End to end: the CLI and the Python API on real sanders data and the synthetic demo avatar."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import av
import cv2
import numpy as np
import pytest
import soundfile as sf
import torch

import lipsync_trt
from lipsync_trt.__main__ import main
from lipsync_trt.models import load_generator
from oracle import agreement, reference_frames
from tolerances import reorder_atol


def expected_frames(samples_16k: int) -> int:
    t = 1 + samples_16k // 200
    return int((t - 16) / 80.0 * 25.0) + 2 + 2


def probe(path):
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        frames = sum(1 for _ in c.decode(video=0))
        audio = [(s.codec_context.name, float(s.duration * s.time_base)) for s in c.streams.audio]
        return frames, float(v.average_rate), audio


def run_cli(*args, cwd=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "lipsync_trt", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_sanders_first_4s_to_mp4(sanders, checkpoints, tmp_path):
    wav, rate = sf.read(sanders / "talk_hb.wav", dtype="int16")
    cut = tmp_path / "talk_4s.wav"
    sf.write(cut, wav[:4 * rate], rate, subtype="PCM_16")
    out = tmp_path / "out.mp4"
    t = time.time()
    r = run_cli("generate", "--avatar", sanders, "--audio", cut, "--generator", checkpoints[0],
                "--audio-encoder", checkpoints[1], "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    frames, fps, audio = probe(out)
    assert frames == expected_frames(4 * 16000) == 99
    assert fps == 25.0
    assert len(audio) == 1 and audio[0][0] == "aac" and abs(audio[0][1] - 4.0) <= 0.1
    assert "99 frames" in r.stdout
    print(f"sanders 4 s: {time.time() - t:.1f} s wall, {r.stdout.strip()}")


@pytest.fixture(scope="module")
def sanders_2s(sanders, tmp_path_factory):
    wav, rate = sf.read(sanders / "talk_hb.wav", dtype="int16")
    path = tmp_path_factory.mktemp("cut") / "talk_2s.wav"
    sf.write(path, wav[rate:3 * rate], rate, subtype="PCM_16")
    return path


@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_frames_dir_pngs_match_the_reference_structure(sanders, sanders_2s, checkpoints, tmp_path):
    """Selected frames as PNG vs the reference's per-frame cv2 loop with the same model: ±1, ≥99.9% equal."""
    fdir = tmp_path / "png"
    r = run_cli("generate", "--avatar", sanders, "--audio", sanders_2s, "--generator", checkpoints[0],
                "--audio-encoder", checkpoints[1], "--frames", "0,7-8,48", "--frames-dir", fdir,
                "--backend", "torch", "--batch-size", "3", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(fdir)) == ["000000.png", "000007.png", "000008.png", "000048.png"]
    assert not list(tmp_path.glob("*.mp4"))          # --frames-dir without --out makes no video
    ls = lipsync_trt.load(sanders, *checkpoints, backend="torch", device="cpu")
    feats = ls.features(sanders_2s)
    assert feats.num_frames == expected_frames(32000) == 49
    ref = reference_frames(sanders, feats.padded.numpy(), [0, 7, 8, 48], load_generator(checkpoints[0]))
    for i, frame in ref.items():
        png = cv2.imread(str(fdir / f"{i:06d}.png"), cv2.IMREAD_UNCHANGED)
        assert png.shape == (720, 1280, 3)
        frac, worst = agreement(png, frame)
        assert worst <= 1 and frac >= 0.999, (i, frac, worst)


@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_frames_subset_video_audio_span(demo, tmp_path):
    common = ["generate", "--avatar", demo["avatar"], "--audio", demo["audio"], "--generator", demo["generator"],
              "--audio-encoder", demo["audio_encoder"], "--backend", "torch", "--quiet"]
    common = [str(a) for a in common]
    assert main(common + ["--frames", "10-19", "--out", str(tmp_path / "span.mp4")]) == 0
    frames, _, audio = probe(tmp_path / "span.mp4")
    assert frames == 10 and len(audio) == 1 and abs(audio[0][1] - 0.4) <= 0.1
    assert main(common + ["--frames", "3,9", "--out", str(tmp_path / "scattered.mp4")]) == 0
    frames, _, audio = probe(tmp_path / "scattered.mp4")
    assert frames == 2 and audio == []


@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_python_api_frames_from_an_array(demo):
    ls = lipsync_trt.load(demo["avatar"], demo["generator"], demo["audio_encoder"], backend="torch", device="cpu",
                          batch_size=2)
    samples, rate = sf.read(demo["audio"], dtype="float32")
    got = list(ls.frames(samples, rate=rate, frames="0-2,40"))
    assert [i for i, _ in got] == [0, 1, 2, 40]
    feats = ls.features(samples, rate=rate)
    ref = reference_frames(demo["avatar"], feats.padded.numpy(), [0, 1, 2, 40], load_generator(demo["generator"]))
    for i, frame in got:
        assert frame.dtype == np.uint8 and frame.shape == (192, 256, 3)
        frac, worst = agreement(frame, ref[i])
        assert worst <= 1 and frac >= 0.999


@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_demo_runs_with_nothing_downloaded(tmp_path):
    r = run_cli("generate", "--demo", "--out", tmp_path / "demo.mp4", "--backend", "torch", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "untrained" in r.stderr
    frames, fps, audio = probe(tmp_path / "demo.mp4")
    assert frames == expected_frames(32000) and fps == 25.0 and audio[0][0] == "aac"


def test_features_command(demo, tmp_path):
    out = tmp_path / "f.npz"
    assert main(["features", "--audio", str(demo["audio"]), "--audio-encoder", str(demo["audio_encoder"]),
                 "--out", str(out)]) == 0
    data = np.load(out)
    n = expected_frames(32000) - 2
    assert data["mel"].shape == (80, 1 + 32000 // 200) and data["features"].shape == (n, 512)
    from lipsync_trt.audio import mel_windows
    from lipsync_trt.models import load_audio_encoder
    with torch.no_grad():
        ref = load_audio_encoder(demo["audio_encoder"])(mel_windows(torch.from_numpy(data["mel"])))
    assert np.abs(ref.numpy() - data["features"]).max() <= reorder_atol(np.abs(ref.numpy()).max())


@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_ctrl_c_leaves_nothing_behind(sanders, checkpoints, tmp_path):
    out = tmp_path / "out.mp4"
    proc = subprocess.Popen([sys.executable, "-m", "lipsync_trt", "generate", "--avatar", str(sanders), "--audio",
                             str(sanders / "talk_hb.wav"), "--generator", str(checkpoints[0]), "--audio-encoder",
                             str(checkpoints[1]), "--out", str(out), "--backend", "torch"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".out.mp4.*")):   # wait until writing started
        time.sleep(0.2)
    assert list(tmp_path.glob(".out.mp4.*")), "the temporary output never appeared"
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert list(tmp_path.iterdir()) == []
