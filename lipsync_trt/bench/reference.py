"""SyncTalk_2D's inference_328.py, step by step: the benchmark's baseline and the tests' oracle.

Written with the reference's own tools (librosa, OpenCV, numpy, the torch models called per frame) and its own
numbers, independently of lipsync_trt's pipeline: nothing here calls lipsync_trt.audio, .avatar, .compose or
.pipeline, so comparing them against this is a real check (RECIPE.md says where each step comes from).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import torch

# hparams of the reference's utils.py (RECIPE §1)
SAMPLE_RATE, N_FFT, HOP, WIN, N_MELS, FMIN, FMAX = 16000, 800, 200, 800, 80, 55, 7600
PREEMPHASIS, REF_LEVEL_DB, MIN_LEVEL_DB, MAX_ABS = 0.97, 20, -100, 4.0
FPS = 25
STAGES = ("decode", "prepare", "model", "paste")


# ---------------------------------------------------------------------------------------------- audio

def load_wav(path: str | Path) -> np.ndarray:
    """librosa.load at 16 kHz, mono float32 (librosa's default resampler), as the reference loads its WAV."""
    import librosa

    return librosa.load(str(path), sr=SAMPLE_RATE)[0]


def melspectrogram(wav: np.ndarray) -> np.ndarray:
    """utils.melspectrogram: preemphasis, centred STFT, Slaney mel, dB, symmetric clip -> (80, T) in wav's dtype."""
    import librosa

    y = np.append(wav[0], wav[1:] - PREEMPHASIS * wav[:-1]).astype(wav.dtype)
    spec = np.abs(librosa.stft(y=y, n_fft=N_FFT, hop_length=HOP, win_length=WIN, center=True, pad_mode="constant"))
    mel = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=FMIN, fmax=FMAX) @ spec
    s = 20 * np.log10(np.maximum(1e-5, mel)) - REF_LEVEL_DB
    return np.clip(2 * MAX_ABS * ((s - MIN_LEVEL_DB) / -MIN_LEVEL_DB) - MAX_ABS, -MAX_ABS, MAX_ABS)


def mel_windows(mel_tn: np.ndarray) -> list[np.ndarray]:
    """AudioDataset: crop_audio_window for idx in range(N) on the (T, 80) mel, each (1, 80, 16)."""
    n = int((mel_tn.shape[0] - 16) / 80.0 * float(FPS)) + 2
    out = []
    for idx in range(n):
        start = int(80.0 * (idx / float(FPS)))
        end = start + 16
        if end > mel_tn.shape[0]:
            end = mel_tn.shape[0]
            start = end - 16
        out.append(mel_tn[start:end, :].T[None])
    return out


def features(encoder: torch.nn.Module, wav: np.ndarray, device: torch.device | str = "cpu",
             mel: Callable[[np.ndarray], np.ndarray] = melspectrogram) -> np.ndarray:
    """The audio encoder over every window in batches of 64 (the reference's DataLoader), first and last row
    repeated -> (N + 2, 512) float32. (`mel`: another (80, T) mel where librosa is missing.)"""
    windows = [torch.FloatTensor(w.copy()) for w in mel_windows(mel(wav).T)]
    outs = []
    for i in range(0, len(windows), 64):
        with torch.no_grad():
            outs.append(encoder(torch.stack(windows[i:i + 64]).to(device)))
    out = torch.cat(outs, dim=0).cpu()
    return torch.cat([out[:1], out, out[-1:]], dim=0).numpy()


def feature_window(padded: np.ndarray, index: int) -> np.ndarray:
    """get_audio_features: rows [index-8, index+8) of the padded features, zeros outside, as (32, 16, 16)."""
    left, right, pad_left, pad_right = index - 8, index + 8, 0, 0
    if left < 0:
        pad_left, left = -left, 0
    if right > padded.shape[0]:
        pad_right, right = right - padded.shape[0], padded.shape[0]
    rows = padded[left:right]
    dim = padded.shape[1]
    rows = np.concatenate([np.zeros((pad_left, dim), np.float32), rows, np.zeros((pad_right, dim), np.float32)])
    return rows.reshape(32, 16, 16)


# ---------------------------------------------------------------------------------------------- frames

def frame_order(count: int, n: int) -> list[int]:
    """The img_idx/step loop over `count` templates for n video frames: 1, 2, ..., count-1, count-2, ..., 0, 1, ..."""
    len_img, img_idx, step, out = count - 1, 0, 0, []
    for _ in range(n):
        if img_idx > len_img - 1:
            step = -1
        if img_idx < 1:
            step = 1
        img_idx += step
        out.append(img_idx)
    return out


def read_landmarks(path: str | Path) -> np.ndarray:
    """A .lms file parsed line by line as the reference does: "x y" floats, truncated to int32."""
    with open(path) as f:
        rows = [np.array(line.split(" "), dtype=np.float32) for line in f.read().splitlines()]
    return np.array(rows, dtype=np.int32)


def face_box(lms: np.ndarray) -> tuple[int, int, int, int]:
    """(xmin, ymin, xmax, ymax): xmin = lm[1].x, ymin = lm[52].y, xmax = lm[31].x, a square as wide as it is."""
    xmin, ymin, xmax = int(lms[1][0]), int(lms[52][1]), int(lms[31][0])
    return xmin, ymin, xmax, ymin + (xmax - xmin)


def prepare(img: np.ndarray, box) -> tuple[np.ndarray, np.ndarray]:
    """Crop, cv2.resize to 328 (INTER_CUBIC), inner 320, masked copy (cv2.rectangle), /255, CHW, concatenated:
    (the (6, 320, 320) float32 generator input, the 328x328 uint8 crop kept for the paste)."""
    xmin, ymin, xmax, ymax = box
    crop = cv2.resize(img[ymin:ymax, xmin:xmax], (328, 328), interpolation=cv2.INTER_CUBIC)
    crop_ori = crop.copy()
    real = crop[4:324, 4:324].copy()
    masked = cv2.rectangle(real.copy(), (5, 5, 310, 305), (0, 0, 0), -1)
    real = real.transpose(2, 0, 1).astype(np.float32)
    masked = masked.transpose(2, 0, 1).astype(np.float32)
    return np.concatenate([real / 255.0, masked / 255.0], axis=0), crop_ori


def generate(generator: torch.nn.Module, inp: np.ndarray, audio: np.ndarray,
             device: torch.device | str = "cpu") -> np.ndarray:
    """The generator at batch 1 under no_grad -> (3, 320, 320) float32 in [0, 1] on the host."""
    with torch.no_grad():
        pred = generator(torch.from_numpy(inp)[None].to(device).float(),
                         torch.from_numpy(audio)[None].to(device).float())[0]
    return pred.cpu().numpy()   # .cpu() synchronizes on CUDA


def paste(img: np.ndarray, crop_ori: np.ndarray, pred: np.ndarray, box) -> np.ndarray:
    """uint8(pred * 255) (truncating) into crop_ori[4:324, 4:324], cv2.resize back (INTER_CUBIC) into img.

    Writes into img and crop_ori, as the reference does, and returns img."""
    xmin, ymin, xmax, ymax = box
    h, w = img[ymin:ymax, xmin:xmax].shape[:2]
    crop_ori[4:324, 4:324] = np.array(pred.transpose(1, 2, 0) * 255, dtype=np.uint8)
    img[ymin:ymax, xmin:xmax] = cv2.resize(crop_ori, (w, h), interpolation=cv2.INTER_CUBIC)
    return img


def frames(avatar_dir: str | Path, padded: np.ndarray, indices: list[int] | range, generator: torch.nn.Module,
           device: torch.device | str = "cpu", stages: dict | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(i, composited BGR frame) for each video frame index, one at a time: imread + .lms, prepare, model, paste.

    `stages`, when given, accumulates the seconds spent in each of STAGES."""
    avatar_dir = Path(avatar_dir)
    count = len(list((avatar_dir / "full_body_img").glob("*.jpg")))
    order = frame_order(count, max(indices) + 1) if len(indices) else []
    st = stages if stages is not None else {}
    for k in STAGES:
        st.setdefault(k, 0.0)
    for i in indices:
        t0 = time.perf_counter()
        img = cv2.imread(str(avatar_dir / "full_body_img" / f"{order[i]}.jpg"))
        box = face_box(read_landmarks(avatar_dir / "landmarks" / f"{order[i]}.lms"))
        t1 = time.perf_counter()
        inp, crop_ori = prepare(img, box)
        audio = feature_window(padded, i)
        t2 = time.perf_counter()
        pred = generate(generator, inp, audio, device)
        t3 = time.perf_counter()
        out = paste(img, crop_ori, pred, box)
        t4 = time.perf_counter()
        st["decode"] += t1 - t0
        st["prepare"] += t2 - t1
        st["model"] += t3 - t2
        st["paste"] += t4 - t3
        yield i, out
