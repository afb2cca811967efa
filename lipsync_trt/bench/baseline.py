"""The benchmark's baseline: the SyncTalk_2D reference (bench.reference) run the way inference_328.py runs it,
per frame at batch 1 in fp32 eager torch, writing cv2.VideoWriter + the reference's ffmpeg re-encode/mux."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from . import reference as ref


def _audio_tools():
    """(load 16 kHz WAV, (80, T) mel): librosa as the reference; soundfile + soxr and lipsync_trt's torch mel
    (the same numbers, tests/test_audio.py) where librosa is not installed."""
    if importlib.util.find_spec("librosa") is not None:
        return ref.load_wav, ref.melspectrogram
    from .. import audio as A

    return A.load_16k, lambda wav: A.mel(wav).numpy()


class Baseline:
    """inference_328.py's structure: per-frame Python loop, batch 1, fp32 eager torch, OpenCV everything."""

    name = "baseline"
    precision = "fp32"

    def __init__(self, generator: Path, audio_encoder: Path, device: torch.device):
        from ..models import load_audio_encoder, load_generator

        self.device = device
        self.net = load_generator(generator).to(device).eval()
        self.encoder = load_audio_encoder(audio_encoder).to(device).eval()
        self.info = {"structure": "SyncTalk_2D inference_328.py (per-frame loop, batch 1, fp32 eager torch, "
                                  "cv2.imread/resize INTER_CUBIC/VideoWriter, ffmpeg-style libx264 crf 20 + AAC mux)",
                     "mux": "ffmpeg" if shutil.which("ffmpeg") else "pyav (no ffmpeg binary here)"}

    def features(self, wav_path: Path) -> np.ndarray:
        """Load, mel, windows and encoder: the padded (N + 2, 512) features."""
        load, mel = _audio_tools()
        return ref.features(self.encoder, load(wav_path), self.device, mel=mel)

    def run(self, avatar_dir: Path, wav_path: Path, n_frames: int, mp4: Path | None = None,
            stages: dict | None = None) -> np.ndarray:
        """Render the first n_frames (into `mp4` when given); returns the last frame. `stages` accumulates seconds
        per stage (audio, decode, prepare, model, paste, write)."""
        import cv2

        st = stages if stages is not None else {}
        for k in ("audio", *ref.STAGES, "write"):
            st.setdefault(k, 0.0)
        t = time.perf_counter()
        feats = self.features(wav_path)
        st["audio"] += time.perf_counter() - t
        writer = tmp_video = None
        if mp4 is not None:
            h0, w0 = cv2.imread(str(avatar_dir / "full_body_img" / "0.jpg")).shape[:2]
            tmp_video = mp4.with_name(mp4.stem + "_noaudio.mp4")
            writer = cv2.VideoWriter(str(tmp_video), cv2.VideoWriter_fourcc(*"mp4v"), ref.FPS, (w0, h0))
        img = None
        for _, img in ref.frames(avatar_dir, feats, range(min(n_frames, feats.shape[0])), self.net, self.device, st):
            if writer is not None:
                t = time.perf_counter()
                writer.write(img)
                st["write"] += time.perf_counter() - t
        if writer is not None:
            t = time.perf_counter()
            writer.release()
            mux(tmp_video, wav_path, mp4)
            tmp_video.unlink(missing_ok=True)
            st["write"] += time.perf_counter() - t
        return img


def mux(video: Path, wav: Path, out: Path) -> None:
    """The reference's `ffmpeg -i video -i wav -c:v libx264 -c:a aac -crf 20 out -y` (PyAV without ffmpeg)."""
    ff = shutil.which("ffmpeg")
    if ff:
        subprocess.run([ff, "-loglevel", "error", "-i", str(video), "-i", str(wav), "-c:v", "libx264",
                        "-c:a", "aac", "-crf", "20", str(out), "-y"], check=True)
        return
    import av

    from .. import audio as A
    from ..video import VideoWriter

    data, rate = A.load(wav)
    with av.open(str(video)) as src:
        vs = src.streams.video[0]
        with VideoWriter(out, vs.width, vs.height, audio=data, audio_rate=rate, crf=20) as w:
            for frame in src.decode(vs):
                w.write(frame.to_ndarray(format="bgr24"))
