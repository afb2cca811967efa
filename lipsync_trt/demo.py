"""Synthetic inputs for `--demo`, tests and benchmarks: a procedurally drawn avatar in SyncTalk_2D layout
(real JPEG frames and .lms files), seeded random weights, and a synthesized speech-like clip.

The weights are untrained: the demo shows the machinery, not lip sync.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from . import recipe as R
from .avatar import FRAMES_DIR, LANDMARKS_DIR

UNTRAINED_NOTE = "demo: seeded random weights (untrained) and a synthetic avatar; the output shows the pipeline, not lip sync"


def landmarks_for(cx: float, cy: float, side: float) -> np.ndarray:
    """110 plausible points on a face outline whose recipe box (lm1.x, lm52.y, lm31.x) is a `side`-pixel square."""
    pts = np.zeros((R.LANDMARK_COUNT, 2), np.float64)
    t = np.linspace(0, 2 * np.pi, R.LANDMARK_COUNT, endpoint=False)
    pts[:, 0] = cx + 0.45 * side * np.cos(t)
    pts[:, 1] = cy + 0.55 * side * np.sin(t)
    x1, y1 = cx - side / 2, cy - side / 2
    pts[R.LM_XMIN] = (x1, cy)
    pts[R.LM_XMAX] = (x1 + side, cy)
    pts[R.LM_YMIN] = (cx, y1)
    return pts


def make_avatar(root: str | os.PathLike, count: int = 8, width: int = 256, height: int = 192, side: int = 96,
                seed: int = 0) -> Path:
    """Write a small synthetic avatar (count frames, a head that sways a little) under `root`; return root."""
    import cv2

    root = Path(root)
    (root / FRAMES_DIR).mkdir(parents=True, exist_ok=True)
    (root / LANDMARKS_DIR).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    background = rng.integers(40, 90, (height, width, 3), dtype=np.uint8)
    for n in range(count):
        img = cv2.GaussianBlur(background, (7, 7), 0)
        cx = width / 2 + 6 * np.sin(n / max(count, 1) * 2 * np.pi)
        cy = height / 2 + 3 * np.cos(n / max(count, 1) * 2 * np.pi)
        c = (int(cx), int(cy))
        cv2.ellipse(img, c, (int(side * 0.45), int(side * 0.6)), 0, 0, 360, (120, 160, 210), -1)
        for dx in (-0.18, 0.18):
            cv2.circle(img, (int(cx + dx * side), int(cy - 0.12 * side)), max(side // 16, 2), (40, 30, 20), -1)
        cv2.ellipse(img, (int(cx), int(cy + 0.25 * side)), (int(side * 0.16), int(side * (0.03 + 0.02 * (n % 3)))),
                    0, 0, 360, (60, 50, 150), -1)
        cv2.imwrite(str(root / FRAMES_DIR / f"{n}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 92])
        lms = landmarks_for(cx, cy, side)
        (root / LANDMARKS_DIR / f"{n}.lms").write_text("".join(f"{x:.1f} {y:.1f}\n" for x, y in lms))
    return root


def make_speech(seconds: float = 2.0, rate: int = R.SAMPLE_RATE, seed: int = 0) -> np.ndarray:
    """A speech-like test signal: voiced harmonics with syllable envelopes and a little noise, float32 in [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 120 + 20 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = np.clip(np.sin(2 * np.pi * 3.1 * t), 0, None) ** 0.7
    signal = 0.25 * voiced * envelope + 0.01 * rng.standard_normal(t.size)
    return (signal / max(1.0, np.abs(signal).max())).astype(np.float32)


CALIBRATION_VAR_FLOOR = 0.05   # BatchNorm variance floor: near-dead channels would amplify rounding noise
OUTPUT_GAIN = 0.02             # soft generator logits: ONNX Runtime and torch then agree within 1e-4 on real frames


def calibrate(model: torch.nn.Module, inputs: tuple, seed: int) -> torch.nn.Module:
    """Seeded He-normal convolutions, then BatchNorm statistics measured on `inputs` (one pass in train mode),
    rounded to fp16 values so that the saved bytes (the ONNX cache key) do not depend on summation order.

    Plain random BatchNorm statistics make an untrained network collapse (the encoder gives nearly the same
    512 floats for any window, the generator a flat grey whatever the audio), so tests built on them could not
    see audio going to the wrong frame; calibrated ones keep the output dependent on the audio and the image."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None   # cumulative average over the calibration pass
                m.weight.uniform_(0.8, 1.2, generator=g)
                m.bias.uniform_(-0.1, 0.1, generator=g)
        model.train()
        model(*inputs)
        model.eval()
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = 0.1
                m.running_var.clamp_(min=CALIBRATION_VAR_FLOOR)
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half().float())
    return model


def demo_checkpoints(root: str | os.PathLike, seed: int = 0, output_gain: float = OUTPUT_GAIN) -> tuple[Path, Path]:
    """Seeded, untrained generator and audio-encoder state_dicts saved as SyncTalk_2D .pth files under `root`
    (reused when present). BatchNorm is calibrated on speech-like mel windows and random images (`calibrate`), so
    the output depends on the audio: a frame's mouth changes by tens of levels with its audio window. A larger
    `output_gain` makes the mouth more sensitive to the audio, and ONNX Runtime / fp16 agree less closely."""
    from . import audio as A
    from .models import AudioEncoder, Generator

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    gen_path, enc_path = root / "demo_generator.pth", root / "demo_audio_encoder.pth"
    if gen_path.is_file() and enc_path.is_file():
        return gen_path, enc_path
    wins = torch.cat([A.mel_windows(A.mel(torch.from_numpy(make_speech(2.0, seed=seed + s)))) for s in range(3)])
    enc = calibrate(AudioEncoder(), (wins,), seed=seed + 1)
    with torch.no_grad():
        feats = enc(wins)
    images = torch.rand(2, 6, R.ROI_SIZE, R.ROI_SIZE, generator=torch.Generator().manual_seed(seed + 2))
    gen = calibrate(Generator(), (images, A.feature_windows(A.pad_features(feats[:60]), [7, 41])), seed=seed + 3)
    with torch.no_grad():
        gen.outc.conv.weight.mul_(output_gain)
    enc_state = {k.removeprefix("audio_encoder."): v for k, v in enc.state_dict().items()}  # as SyncTalk ships it
    for state, path in ((gen.state_dict(), gen_path), (enc_state, enc_path)):
        tmp = path.with_name(path.name + ".part")
        torch.save(state, tmp)
        os.replace(tmp, path)
    return gen_path, enc_path


def write_wav(path: str | os.PathLike, samples: np.ndarray, rate: int = R.SAMPLE_RATE, subtype: str = "PCM_16") -> Path:
    import soundfile as sf

    sf.write(str(path), samples, rate, subtype=subtype)
    return Path(path)


def make_demo(root: str | os.PathLike, seconds: float = 2.0) -> dict[str, Path]:
    """Everything `generate --demo` needs under `root`: avatar/, two checkpoints, speech.wav."""
    root = Path(root)
    gen, enc = demo_checkpoints(root)
    return {"avatar": make_avatar(root / "avatar"), "generator": gen, "audio_encoder": enc,
            "audio": write_wav(root / "speech.wav", make_speech(seconds))}
