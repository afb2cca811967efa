"""python -m lipsync_trt.bench: backends, batch sizes and stages side by side, against the naive baseline.

Every configuration (backend x device x precision x batch size) and the baseline are loaded once, then
measured in rounds: each round takes one sample of every metric for every configuration, metric by
metric, in a rotating order, so a noisy machine (other processes, thermal drift) hits all of them alike.

Metrics (median and min..max over `--repeat` rounds):
  generator_fps      generator-only frames/s (one runner.generate per batch, inputs already prepared)
  e2e_memory_fps     load WAV + mel + encoder + decode/prepare + generator + paste -> numpy frames
                     (pipeline.encode_features + pipeline.iter_frames), frames/s
  e2e_mp4_fps        the same into an H.264 + AAC MP4 (pipeline.generate), frames/s
  audio_ms_per_s     audio path (load + mel + encoder) milliseconds per second of audio
  prepare_ms/paste_ms compose.prepare / compose.paste per frame (frames already decoded)
  peak RSS (host, per sample: /proc/self/clear_refs + VmHWM) and peak CUDA memory (torch allocator),
  first-call latency (runner load, first generate at each batch size).

Baseline: SyncTalk_2D's inference_328.py structure on the same inputs and device: librosa mel, encoder
in batches of 64, then per frame cv2.imread + .lms parse, cv2.resize INTER_CUBIC, rectangle, /255,
the fp32 torch model at batch 1, paste, cv2.VideoWriter, then the ffmpeg re-encode/mux (libx264 crf 20
+ AAC; done with PyAV when there is no ffmpeg binary). Every figure is also printed as a ratio to it.

FLOPs per frame come from torch.utils.flop_counter.FlopCounterMode; the peak is a large matmul
measured in the same run, so "% peak" is generator FLOP/s over what this device does on a GEMM.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import audio as A
from . import recipe as R

SCHEMA = 1
METRICS = {   # name -> (unit, higher is better)
    "e2e_memory_fps": ("frames/s", True),
    "e2e_mp4_fps": ("frames/s", True),
    "generator_fps": ("frames/s", True),
    "audio_ms_per_s": ("ms per s of audio", False),
    "prepare_ms": ("ms/frame", False),
    "paste_ms": ("ms/frame", False),
}
SANDERS_HINT = "/work/shared/datasets/sanders"
QUICK = {"frames": 1, "repeat": 2, "warmup": 0, "batch_sizes": [1], "audio_seconds": 1.0}
DEFAULTS = {"frames": 32, "repeat": 3, "warmup": 1, "audio_seconds": 5.0}
DEFAULT_BATCHES = {"cpu": [1, 4], "cuda": [1, 8, 32, 128]}
DEFAULT_PRECISIONS = {"cpu": ["fp32"], "cuda": ["fp32", "fp16"]}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- measuring

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Wall time of a block; on CUDA bracketed by synchronize, and `gpu_s` from CUDA events on the current stream."""

    def __init__(self, device: torch.device, events: bool = False):
        self.device, self.events = device, events and device.type == "cuda"
        self.seconds = self.gpu_s = None

    def __enter__(self):
        sync(self.device)
        if self.events:
            self._e0 = torch.cuda.Event(enable_timing=True)
            self._e1 = torch.cuda.Event(enable_timing=True)
            self._e0.record()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.events:
            self._e1.record()
            self._e1.synchronize()
        sync(self.device)
        self.seconds = time.perf_counter() - self._t0
        if self.events:
            self.gpu_s = self._e0.elapsed_time(self._e1) / 1000.0
        return False

    @property
    def best(self) -> float:
        return self.gpu_s if self.gpu_s is not None else self.seconds


class Memory:
    """Peak host RSS of a block (Linux: reset with /proc/self/clear_refs '5', read VmHWM) and, on CUDA,
    peak torch-allocated device memory. Elsewhere getrusage's ru_maxrss (process lifetime, not resettable)."""

    def __init__(self):
        self.method = "VmHWM after clear_refs"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._status("VmHWM")
        except OSError:
            self.method = "ru_maxrss (process lifetime)"

    @staticmethod
    def _status(key: str) -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
        raise OSError(key)

    def rss_mb(self) -> float:
        try:
            return self._status("VmRSS")
        except OSError:
            import resource
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    @contextlib.contextmanager
    def track(self, device: torch.device, out: dict):
        start = self.rss_mb()
        if self.method.startswith("VmHWM"):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            yield
        finally:
            if self.method.startswith("VmHWM"):
                peak = self._status("VmHWM")
            else:
                import resource
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
            out["peak_rss_mb"] = peak
            out["rss_growth_mb"] = max(0.0, peak - start)
            if device.type == "cuda":
                out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20


def in_worker(fn):
    """Run fn() in a fresh thread and return its result (or raise its exception).

    The pipeline calls the generator from a worker thread, and on this machine class that matters: PyTorch's
    OpenMP team in the main thread (2 threads on 2 cores) ran the generator 4x slower under CPU contention than
    the same call from a worker thread, which behaves like one thread. Generator-only figures are therefore
    taken in a worker thread too, so that overhead = end-to-end vs generator-only compares like with like.
    """
    import threading

    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:   # re-raised in the caller
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def summarize(values: list[float]) -> dict:
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"n": 0}
    med = statistics.median(vals)
    return {"n": len(vals), "median": med, "min": min(vals), "max": max(vals), "mean": statistics.fmean(vals),
            "rel_spread": (max(vals) - min(vals)) / med if med else None}


# ---------------------------------------------------------------------------------------------- machine

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _physical_cores() -> int:
    from .backends.onnxruntime import physical_cores   # (imports no onnxruntime)

    return physical_cores()


def _version(dist: str) -> str | None:
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict:
    """CPU model, cores, memory, GPUs, library versions, threads, git revision."""
    mem = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/meminfo") as f:
            mem = round(int(f.readline().split()[1]) / 2**20, 1)
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": p.name, "memory_gb": round(p.total_memory / 2**30, 1),
                         "capability": f"{p.major}.{p.minor}", "sm_count": p.multi_processor_count})
    libs = {}
    for dist in ("torch", "numpy", "opencv-python-headless", "opencv-python", "onnxruntime", "onnxruntime-gpu",
                 "onnx", "av", "tensorrt", "coremltools", "triton", "librosa", "soxr", "matplotlib", "lipsync_trt"):
        v = _version(dist)
        if v:
            libs[dist] = v
    with contextlib.suppress(Exception):
        import cv2
        libs["cv2 (runtime)"] = cv2.__version__
    rev = None
    with contextlib.suppress(Exception):
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent).stdout.strip() or None
    return {
        "hostname": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
        "cpu_model": _cpu_model(), "arch": platform.machine(), "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "physical_cores": _physical_cores(), "memory_gb": mem, "gpus": gpus,
        "cuda": torch.version.cuda, "torch_threads": torch.get_num_threads(), "libraries": libs,
        "git_revision": rev, "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


# ---------------------------------------------------------------------------------------------- FLOPs, peak

def count_flops() -> dict:
    """FLOPs (2 x multiply-adds) per frame for the generator and per window for the audio encoder."""
    from torch.utils.flop_counter import FlopCounterMode

    from .models import AudioEncoder, Generator

    out = {}
    with torch.device("meta"):   # shapes only: counting costs no arithmetic
        gen, enc = Generator().eval(), AudioEncoder().eval()
        x, a = torch.zeros(1, 6, R.ROI_SIZE, R.ROI_SIZE), torch.zeros(1, *R.FEATURE_SHAPE)
        mel = torch.zeros(1, 1, R.N_MELS, R.MEL_WINDOW)
    with torch.no_grad():
        with FlopCounterMode(display=False) as fc:
            gen(x, a)
        out["generator_per_frame"] = int(fc.get_total_flops())
        with FlopCounterMode(display=False) as fc:
            enc(mel)
        out["audio_encoder_per_window"] = int(fc.get_total_flops())
    out["params_generator"] = sum(p.numel() for p in gen.parameters())
    out["params_audio_encoder"] = sum(p.numel() for p in enc.parameters())
    out["counter"] = "torch.utils.flop_counter.FlopCounterMode (conv/matmul only; 2 FLOPs per multiply-add)"
    return out


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def matmul_peak(device: torch.device, precision: str, quick: bool = False) -> float:
    """Best GFLOP/s of a large square matmul on `device` (TF32 off for fp32)."""
    n = (1024 if quick else 2048) if device.type == "cpu" else 8192
    dtype = _DTYPES[precision] if device.type == "cuda" else torch.float32
    reps = 2 if quick else 3
    old = torch.backends.cuda.matmul.allow_tf32 if device.type == "cuda" else None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    try:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        torch.matmul(a, b)
        best = 0.0
        inner = 1 if device.type == "cpu" else 10
        for _ in range(reps):
            with Stopwatch(device, events=True) as sw:
                for _ in range(inner):
                    torch.matmul(a, b)
            best = max(best, 2 * n ** 3 * inner / sw.best / 1e9)
        return best
    finally:
        if old is not None:
            torch.backends.cuda.matmul.allow_tf32 = old


# ---------------------------------------------------------------------------------------------- inputs

def frames_for_samples(n16k: int) -> int:
    """Video frames that `n16k` samples at 16 kHz make (N + 2, RECIPE §2)."""
    t = 1 + n16k // R.HOP_LENGTH
    return A.num_windows(t) + 2 if t >= R.MEL_WINDOW else 0


@dataclass
class Inputs:
    avatar_dir: Path
    audio_src: Path
    generator: Path
    audio_encoder: Path
    e2e_wav: Path            # the audio under the first `frames` video frames
    audio_wav: Path          # `audio_seconds` of audio for the audio-path metric
    frames: int
    indices: list[int] | None   # None: the trimmed clip makes exactly `frames` frames
    audio_seconds: float
    demo: bool
    seeded_weights: bool
    notes: list[str] = field(default_factory=list)


def make_inputs(args, tmp: Path) -> Inputs:
    from . import demo as D

    notes = []
    if args.demo:
        d = D.make_demo(tmp / "demo", seconds=max(2.0, args.frames / R.FPS + 1.0, args.audio_seconds + 0.5))
        avatar_dir, audio_src, gen, enc = d["avatar"], d["audio"], d["generator"], d["audio_encoder"]
        notes.append(D.UNTRAINED_NOTE)
        seeded = True
    else:
        if not args.avatar or not args.audio:
            raise SystemExit("bench: give --avatar DIR and --audio WAV (e.g. --avatar "
                             f"{SANDERS_HINT} --audio {SANDERS_HINT}/talk_hb.wav), or --demo")
        avatar_dir, audio_src = Path(args.avatar), Path(args.audio)
        seeded = not (args.generator and args.audio_encoder)
        if seeded:
            if args.generator or args.audio_encoder:
                raise SystemExit("bench: give both --generator and --audio-encoder, or neither (seeded weights)")
            gen, enc = D.demo_checkpoints(tmp / "weights")
            notes.append("no --generator/--audio-encoder given: using seeded random weights from "
                         "lipsync_trt.demo.demo_checkpoints (same architecture; speed does not depend on weight values)")
        else:
            gen, enc = Path(args.generator), Path(args.audio_encoder)
    data, rate = A.load(audio_src)
    # the first `frames` video frames: trim the audio to the shortest span that makes them
    n16 = R.MIN_SAMPLES
    while frames_for_samples(n16) < args.frames:
        n16 += R.HOP_LENGTH
    exact = frames_for_samples(n16) == args.frames
    n_src = int(math.ceil(n16 * rate / R.SAMPLE_RATE))
    if n_src > len(data):
        raise SystemExit(f"bench: {audio_src} is {len(data) / rate:.2f} s; --frames {args.frames} needs "
                         f"{n_src / rate:.2f} s")
    e2e = D.write_wav(tmp / "e2e.wav", data[:n_src], rate)
    e2e_frames = frames_for_samples(len(A.load_16k(e2e)))
    indices = None if (exact and e2e_frames == args.frames) else list(range(args.frames))
    secs = min(args.audio_seconds, len(data) / rate)
    aud = D.write_wav(tmp / "audio_path.wav", data[:int(secs * rate)], rate)
    return Inputs(avatar_dir, audio_src, Path(gen), Path(enc), e2e, aud, args.frames, indices, secs, args.demo,
                  seeded, notes)


# ---------------------------------------------------------------------------------------------- baseline

def _reference_mel(wav: np.ndarray) -> np.ndarray:
    """SyncTalk_2D utils.melspectrogram: preemphasis, librosa STFT, mel, dB, symmetric normalisation -> (80, T)."""
    try:
        import librosa
    except ImportError:   # same numbers, lipsync_trt's torch mel
        return A.mel(wav).numpy()
    y = np.append(wav[0], wav[1:] - R.PREEMPHASIS * wav[:-1]).astype(np.float32)
    d = librosa.stft(y=y, n_fft=R.N_FFT, hop_length=R.HOP_LENGTH, win_length=R.WIN_LENGTH, pad_mode="constant")
    basis = librosa.filters.mel(sr=R.SAMPLE_RATE, n_fft=R.N_FFT, n_mels=R.N_MELS, fmin=R.FMIN, fmax=R.FMAX)
    s = 20 * np.log10(np.maximum(R.AMP_FLOOR, basis @ np.abs(d))) - R.REF_LEVEL_DB
    return np.clip(2 * R.MAX_ABS_VALUE * ((s - R.MIN_LEVEL_DB) / -R.MIN_LEVEL_DB) - R.MAX_ABS_VALUE,
                   -R.MAX_ABS_VALUE, R.MAX_ABS_VALUE)


def _reference_window(features: np.ndarray, index: int) -> torch.Tensor:
    """SyncTalk_2D get_audio_features: rows [index-8, index+8), zero-padded at both ends."""
    left, right, pad_left, pad_right = index - 8, index + 8, 0, 0
    if left < 0:
        pad_left, left = -left, 0
    if right > features.shape[0]:
        pad_right, right = right - features.shape[0], features.shape[0]
    auds = torch.from_numpy(features[left:right])
    if pad_left > 0:   # (the reference pads with zeros_like(auds[:pad_left]), which is short for clips under 8 frames)
        auds = torch.cat([torch.zeros(pad_left, auds.shape[1]), auds], dim=0)
    if pad_right > 0:
        auds = torch.cat([auds, torch.zeros(pad_right, auds.shape[1])], dim=0)
    return auds


class Baseline:
    """inference_328.py's structure: per-frame Python loop, batch 1, fp32 eager torch, OpenCV everything."""

    name = "baseline"
    precision = "fp32"

    def __init__(self, generator: Path, audio_encoder: Path, device: torch.device):
        from .models import load_audio_encoder, load_generator

        self.device = device
        self.net = load_generator(generator).to(device).eval()
        self.encoder = load_audio_encoder(audio_encoder).to(device).eval()
        self.info = {"structure": "SyncTalk_2D inference_328.py (per-frame loop, batch 1, fp32 eager torch, "
                                  "cv2.imread/resize INTER_CUBIC/VideoWriter, ffmpeg-style libx264 crf 20 + AAC mux)",
                     "mux": "ffmpeg" if shutil.which("ffmpeg") else "pyav (no ffmpeg binary here)"}

    def features(self, wav_path: Path) -> np.ndarray:
        try:   # the reference's loader; soundfile + soxr when librosa is missing
            import librosa
            wav, _ = librosa.load(str(wav_path), sr=R.SAMPLE_RATE)
        except ImportError:
            wav = A.load_16k(wav_path)
        mel = _reference_mel(wav).T                       # (T, 80) like the reference's orig_mel
        n = int((mel.shape[0] - 16) / 80.0 * float(R.FPS)) + 2
        windows = []
        for idx in range(n):                               # AudioDataset.__getitem__ per window
            start = int(80.0 * (idx / float(R.FPS)))
            end = start + 16
            if end > mel.shape[0]:
                end, start = mel.shape[0], mel.shape[0] - 16
            windows.append(torch.FloatTensor(mel[start:end, :].T.copy()).unsqueeze(0))
        outs = []
        for i in range(0, n, 64):                          # DataLoader(batch_size=64)
            batch = torch.stack(windows[i:i + 64]).to(self.device)
            with torch.no_grad():
                outs.append(self.encoder(batch))
        out = torch.cat(outs, dim=0).cpu()
        return torch.cat([out[:1], out, out[-1:]], dim=0).numpy()

    def run(self, avatar_dir: Path, wav_path: Path, n_frames: int, mp4: Path | None = None,
            stages: dict | None = None) -> np.ndarray:
        """Render the first n_frames; returns the last frame. `stages` accumulates seconds per stage."""
        import cv2

        st = stages if stages is not None else {}
        for k in ("audio", "decode", "prepare", "model", "paste", "write"):
            st.setdefault(k, 0.0)
        t = time.perf_counter()
        feats = self.features(wav_path)
        st["audio"] += time.perf_counter() - t
        img_dir, lms_dir = str(avatar_dir / "full_body_img") + "/", str(avatar_dir / "landmarks") + "/"
        len_img = len(os.listdir(img_dir)) - 1
        exm = cv2.imread(img_dir + "0.jpg")
        h0, w0 = exm.shape[:2]
        writer = None
        tmp_video = None
        if mp4 is not None:
            tmp_video = mp4.with_name(mp4.stem + "_noaudio.mp4")
            writer = cv2.VideoWriter(str(tmp_video), cv2.VideoWriter_fourcc(*"mp4v"), int(R.FPS), (w0, h0))
        step_stride, img_idx = 0, 0
        img = None
        for i in range(min(n_frames, feats.shape[0])):
            if img_idx > len_img - 1:
                step_stride = -1
            if img_idx < 1:
                step_stride = 1
            img_idx += step_stride
            t = time.perf_counter()
            img = cv2.imread(img_dir + str(img_idx) + ".jpg")
            lms_list = []
            with open(lms_dir + str(img_idx) + ".lms", "r") as f:
                for line in f.read().splitlines():
                    lms_list.append(np.array(line.split(" "), dtype=np.float32))
            lms = np.array(lms_list, dtype=np.int32)
            xmin, ymin, xmax = lms[1][0], lms[52][1], lms[31][0]
            width = xmax - xmin
            ymax = ymin + width
            t1 = time.perf_counter()
            crop_img = img[ymin:ymax, xmin:xmax]
            h, w = crop_img.shape[:2]
            crop_img = cv2.resize(crop_img, (328, 328), interpolation=cv2.INTER_CUBIC)
            crop_img_ori = crop_img.copy()
            img_real_ex = crop_img[4:324, 4:324].copy()
            img_real_ex_ori = img_real_ex.copy()
            img_masked = cv2.rectangle(img_real_ex_ori, (5, 5, 310, 305), (0, 0, 0), -1)
            img_masked = img_masked.transpose(2, 0, 1).astype(np.float32)
            img_real_ex = img_real_ex.transpose(2, 0, 1).astype(np.float32)
            img_real_ex_t = torch.from_numpy(img_real_ex / 255.0)
            img_masked_t = torch.from_numpy(img_masked / 255.0)
            img_concat_t = torch.cat([img_real_ex_t, img_masked_t], dim=0)[None]
            audio_feat = _reference_window(feats, i).reshape(32, 16, 16)[None]
            audio_feat = audio_feat.to(self.device)
            img_concat_t = img_concat_t.to(self.device)
            t2 = time.perf_counter()
            with torch.no_grad():
                pred = self.net(img_concat_t.float(), audio_feat.float())[0]
            pred = pred.cpu().numpy().transpose(1, 2, 0) * 255   # .cpu() synchronizes on CUDA
            t3 = time.perf_counter()
            pred = np.array(pred, dtype=np.uint8)
            crop_img_ori[4:324, 4:324] = pred
            crop_img_ori = cv2.resize(crop_img_ori, (w, h), interpolation=cv2.INTER_CUBIC)
            img[ymin:ymax, xmin:xmax] = crop_img_ori
            t4 = time.perf_counter()
            if writer is not None:
                writer.write(img)
            t5 = time.perf_counter()
            st["decode"] += t1 - t
            st["prepare"] += t2 - t1
            st["model"] += t3 - t2
            st["paste"] += t4 - t3
            st["write"] += t5 - t4
        if writer is not None:
            t = time.perf_counter()
            writer.release()
            self._mux(tmp_video, wav_path, mp4)
            tmp_video.unlink(missing_ok=True)
            st["write"] += time.perf_counter() - t
        return img

    @staticmethod
    def _mux(video: Path, wav: Path, out: Path) -> None:
        """The reference's `ffmpeg -i video -i wav -c:v libx264 -c:a aac -crf 20 out -y`."""
        ff = shutil.which("ffmpeg")
        if ff:
            subprocess.run([ff, "-loglevel", "error", "-i", str(video), "-i", str(wav), "-c:v", "libx264",
                            "-c:a", "aac", "-crf", "20", str(out), "-y"], check=True)
            return
        import av

        from .video import VideoWriter

        data, rate = A.load(wav)
        with av.open(str(video)) as src:
            vs = src.streams.video[0]
            with VideoWriter(out, vs.width, vs.height, audio=data, audio_rate=rate, crf=20) as w:
                for frame in src.decode(vs):
                    w.write(frame.to_ndarray(format="bgr24"))


# ---------------------------------------------------------------------------------------------- configurations

@dataclass
class Config:
    backend: str
    device: str
    precision: str
    batch: int

    @property
    def key(self) -> str:
        return f"{self.backend}/{self.device}/{self.precision}/b{self.batch}"

    @property
    def is_baseline(self) -> bool:
        return self.backend == "baseline"


def _csv(text: str | None) -> list[str]:
    return [p.strip() for p in (text or "").split(",") if p.strip()]


class Bench:
    def __init__(self, args, inputs: Inputs, tmp: Path):
        from . import avatar as avatar_mod
        from . import backends

        self.args, self.inputs, self.tmp = args, inputs, tmp
        self.mem = Memory()
        self.avatar = avatar_mod.load(inputs.avatar_dir)
        avail = backends.available()
        if args.backends:
            names = _csv(args.backends)
            for n in names:   # "torch:MODE" = torch.compile(mode=MODE); "onnxruntime:spin" = spinning threads
                if n.split(":")[0] not in avail or (":" in n and not n.startswith("torch:")
                                                    and n != "onnxruntime:spin"):
                    raise SystemExit(f"bench: unknown backend {n!r}; expected some of: {', '.join(avail)}")
        else:
            names = [n for n, a in avail.items() if a.usable]
        self.availability = {n: {"usable": a.usable, "reason": a.reason} for n, a in avail.items()}
        devs = _csv(args.devices) or ["auto"]
        self.devices = []
        for d in devs:
            dev = backends.resolve_device(d)
            if str(dev) not in [str(x) for x in self.devices]:
                self.devices.append(dev)
        self.configs: list[Config] = []
        self.skipped: list[dict] = []
        self.runners: dict[tuple, object] = {}
        self.loads: dict[str, dict] = {}
        self.results: dict[str, dict] = {}
        for dev in self.devices:
            dt = dev.type
            batches = ([int(b) for b in _csv(args.batch_sizes)] if args.batch_sizes else
                       (QUICK["batch_sizes"] if args.quick else DEFAULT_BATCHES.get(dt, [1, 4])))
            precs = _csv(args.precisions) or DEFAULT_PRECISIONS.get(dt, ["fp32"])
            self.configs.append(Config("baseline", str(dev), "fp32", 1))
            for name in names:
                if not avail[name.split(":")[0]].usable:
                    self.skipped.append({"backend": name, "device": str(dev),
                                         "reason": avail[name.split(":")[0]].reason})
                    continue
                for prec in precs:
                    for b in batches:
                        self.configs.append(Config(name, str(dev), prec, b))

    # -- setup: load every runner once, first-call latency, warmup
    def setup(self, bar) -> None:
        from . import backends, pipeline

        keep = []
        for cfg in self.configs:
            dev = torch.device(cfg.device)
            rk = (cfg.backend, cfg.device, cfg.precision)
            res = self.results.setdefault(cfg.key, {"config": cfg.__dict__ | {"key": cfg.key}, "samples": {},
                                                    "memory": [], "stages": []})
            if rk not in self.runners:
                bar.set_postfix_str(f"load {cfg.backend}/{cfg.device}/{cfg.precision}")
                try:
                    with Stopwatch(dev) as sw:
                        if cfg.is_baseline:
                            runner = Baseline(self.inputs.generator, self.inputs.audio_encoder, dev)
                        else:
                            opts = {"engines": self.args.engines} if self.args.engines else {}
                            name, _, mode = cfg.backend.partition(":")
                            if mode == "spin":
                                opts["spinning"] = True
                            elif mode:
                                opts["compile"] = mode
                            runner = backends.load(name, self.inputs.generator, self.inputs.audio_encoder,
                                                   device=dev, precision=cfg.precision, **opts)
                    self.runners[rk] = runner
                    self.loads["/".join(rk)] = {"load_s": sw.seconds, "info": _jsonable(getattr(runner, "info", {}))}
                except Exception as exc:   # a backend that cannot run this device/precision: recorded, not fatal
                    self.runners[rk] = None
                    self.loads["/".join(rk)] = {"error": _err(exc)}
            runner = self.runners[rk]
            if runner is None:
                self.skipped.append({"backend": cfg.backend, "device": cfg.device, "precision": cfg.precision,
                                     "batch": cfg.batch, "reason": self.loads["/".join(rk)]["error"]})
                self.results.pop(cfg.key, None)
                bar.update(1)
                continue
            res["load_s"] = self.loads["/".join(rk)]["load_s"]
            res["info"] = self.loads["/".join(rk)]["info"]
            try:
                bar.set_postfix_str(f"first call {cfg.key}")
                imgs, aud = self._gen_inputs(cfg.batch, dev)
                if cfg.is_baseline:
                    with Stopwatch(dev) as sw, torch.no_grad():
                        runner.net(imgs, aud).cpu()
                    res["first_call_s"] = sw.seconds
                    if self.args.warmup:
                        runner.run(self.inputs.avatar_dir, self.inputs.e2e_wav, 1)
                else:
                    with Stopwatch(dev) as sw:
                        runner.generate(imgs, aud)
                    res["first_call_s"] = sw.seconds
                    for _ in range(self.args.warmup):
                        runner.generate(imgs, aud)
                    if self.args.warmup:
                        feats = pipeline.encode_features(runner, A.load_16k(self.inputs.e2e_wav))
                        for _ in pipeline.iter_frames(runner, self._fresh_avatar(), feats,
                                                      list(range(min(cfg.batch, feats.num_frames))),
                                                      batch_size=cfg.batch):
                            pass
                keep.append(cfg)
            except Exception as exc:
                self.skipped.append({**cfg.__dict__, "reason": _err(exc)})
                self.results.pop(cfg.key, None)
            bar.update(1)
        self.configs = keep

    def _gen_inputs(self, batch: int, dev: torch.device):
        g = torch.Generator().manual_seed(batch)
        imgs = torch.rand(batch, 6, R.ROI_SIZE, R.ROI_SIZE, generator=g).to(dev)
        aud = (torch.randn(batch, *R.FEATURE_SHAPE, generator=g) * 0.5).to(dev)
        return imgs, aud

    def _fresh_avatar(self):
        """The loaded avatar with an empty frame cache: every sample decodes its JPEGs, like the baseline."""
        from .avatar import Avatar

        a = self.avatar
        return Avatar(root=a.root, height=a.height, width=a.width, boxes=a.boxes, landmarks=a.landmarks,
                      cache_size=a.cache_size)

    # -- one sample of each metric
    def sample(self, kind: str, cfg: Config) -> None:
        res = self.results[cfg.key]
        runner = self.runners[(cfg.backend, cfg.device, cfg.precision)]
        dev = torch.device(cfg.device)
        fn = getattr(self, f"_s_{kind}")
        mem: dict = {}
        try:
            with self.mem.track(dev, mem):
                value, extra = fn(cfg, runner, dev)
        except Exception as exc:
            res.setdefault("errors", []).append({"metric": kind, "error": _err(exc)})
            log(f"bench: {cfg.key} {kind}: {_err(exc)}")
            if self.args.debug:
                traceback.print_exc()
            return
        for name, v in value.items():
            res["samples"].setdefault(name, []).append(v)
        res["memory"].append({"metric": kind, **mem})
        if extra:
            res["stages"].append({"metric": kind, **extra})

    def _s_generator(self, cfg, runner, dev):
        n = self.inputs.frames
        batches = max(1, math.ceil(n / cfg.batch))
        imgs, aud = self._gen_inputs(cfg.batch, dev)

        def timed():
            with Stopwatch(dev, events=True) as sw:
                for _ in range(batches):
                    runner.generate(imgs, aud)
            return sw

        sw = in_worker(timed)   # the thread the pipeline's generator stage runs in
        return {"generator_fps": batches * cfg.batch / sw.best}, {"seconds": sw.best, "frames": batches * cfg.batch}

    def _s_e2e_memory(self, cfg, runner, dev):
        from . import pipeline

        n = self.inputs.frames
        if cfg.is_baseline:
            stages: dict = {}
            with Stopwatch(dev) as sw:
                last = runner.run(self.inputs.avatar_dir, self.inputs.e2e_wav, n, stages=stages)
            self._last_frames[cfg.key] = last
            # the baseline's model call is timed inside its loop (sequential, batch 1): its generator-only figure
            return ({"e2e_memory_fps": n / sw.seconds, "generator_fps": n / stages["model"],
                     "prepare_ms": 1000 * stages["prepare"] / n, "paste_ms": 1000 * stages["paste"] / n},
                    {"seconds": sw.seconds, "frames": n, **{k: v / n for k, v in stages.items()}})
        avatar = self._fresh_avatar()
        timings: dict = {}
        last = None
        count = 0
        with Stopwatch(dev) as sw:
            data, rate = A.load(self.inputs.e2e_wav)
            feats = pipeline.encode_features(runner, A.to_16k_mono(data, rate))
            for _, frame in pipeline.iter_frames(runner, avatar, feats, self.inputs.indices, 0, cfg.batch, timings):
                last = frame.cpu().numpy()
                count += 1
        self._last_frames[cfg.key] = last
        return {"e2e_memory_fps": count / sw.seconds}, {"seconds": sw.seconds, "frames": count,
                                                         **{k: v / count for k, v in timings.items()}}

    def _s_e2e_mp4(self, cfg, runner, dev):
        from . import pipeline

        n = self.inputs.frames
        out = self.tmp / f"out_{cfg.key.replace('/', '_')}.mp4"
        if cfg.is_baseline:
            stages: dict = {}
            with Stopwatch(dev) as sw:
                runner.run(self.inputs.avatar_dir, self.inputs.e2e_wav, n, mp4=out, stages=stages)
            size = out.stat().st_size
            out.unlink(missing_ok=True)
            return {"e2e_mp4_fps": n / sw.seconds}, {"seconds": sw.seconds, "frames": n, "bytes": size,
                                                      **{k: v / n for k, v in stages.items()}}
        avatar = self._fresh_avatar()
        with Stopwatch(dev) as sw:
            data, rate = A.load(self.inputs.e2e_wav)
            summary = pipeline.generate(runner, avatar, data, rate, out=out, frames=self.inputs.indices,
                                        batch_size=cfg.batch, progress=False, source=str(self.inputs.e2e_wav))
        size = out.stat().st_size
        out.unlink(missing_ok=True)
        return ({"e2e_mp4_fps": summary.frames / sw.seconds},
                {"seconds": sw.seconds, "frames": summary.frames, "bytes": size,
                 **{k: v / summary.frames for k, v in (summary.timings or {}).items()}})

    def _s_audio(self, cfg, runner, dev):
        from . import pipeline

        secs = self.inputs.audio_seconds
        if cfg.is_baseline:
            with Stopwatch(dev) as sw:
                runner.features(self.inputs.audio_wav)
        else:
            with Stopwatch(dev) as sw:
                data, rate = A.load(self.inputs.audio_wav)
                pipeline.encode_features(runner, A.to_16k_mono(data, rate))
        return {"audio_ms_per_s": 1000 * sw.seconds / secs}, {"seconds": sw.seconds, "audio_seconds": secs}

    def _s_compose(self, cfg, runner, dev):
        from . import compose

        n = self.inputs.frames
        order = self.avatar.order(max(n, 2))
        ids = [int(order[i]) for i in range(n)]
        host = [self.avatar.frame(t) for t in ids]
        prep = paste = 0.0
        for i in range(0, n, cfg.batch):
            chunk = ids[i:i + cfg.batch]
            frames = [torch.from_numpy(host[i + j].copy()).to(dev) for j in range(len(chunk))]
            boxes = [self.avatar.boxes[t] for t in chunk]

            def timed_prepare():   # in a worker thread, as the pipeline's decode/prepare stage
                with Stopwatch(dev) as sw:
                    got = compose.prepare(frames, boxes, runner.dtype)
                return sw, got

            sw, (inputs, crops) = in_worker(timed_prepare)
            prep += sw.seconds
            pred = inputs[:, :3]
            with Stopwatch(dev) as sw:   # in the calling thread, as the pipeline's paste
                compose.paste(frames, crops, pred, boxes)
            paste += sw.seconds
        return {"prepare_ms": 1000 * prep / n, "paste_ms": 1000 * paste / n}, None

    # -- the rounds
    def plan(self) -> list[tuple[int, str, Config]]:
        """(round, metric, config) in run order: per round, per metric, every config in a rotating order."""
        steps = []
        seen_audio, seen_compose = set(), set()
        units: dict[str, list[Config]] = {"generator": [], "e2e_memory": [], "e2e_mp4": [], "audio": [],
                                          "compose": []}
        for cfg in self.configs:
            if not cfg.is_baseline:
                units["generator"].append(cfg)
            units["e2e_memory"].append(cfg)
            units["e2e_mp4"].append(cfg)
            rk = (cfg.backend, cfg.device, cfg.precision)
            if rk not in seen_audio:
                seen_audio.add(rk)
                units["audio"].append(cfg)
            if not cfg.is_baseline:
                runner = self.runners[rk]
                ck = (cfg.device, str(runner.dtype), cfg.batch)
                if ck not in seen_compose:
                    seen_compose.add(ck)
                    units["compose"].append(cfg)
        for r in range(self.args.repeat):
            for kind, cfgs in units.items():
                if not cfgs:
                    continue
                k = r % len(cfgs)
                for cfg in cfgs[k:] + cfgs[:k]:
                    steps.append((r, kind, cfg))
        return steps

    def run(self) -> dict:
        from tqdm import tqdm

        self._last_frames: dict[str, np.ndarray] = {}
        n_runners = len({(c.backend, c.device, c.precision) for c in self.configs})
        with tqdm(total=len(self.configs), desc="bench setup", unit="config", file=sys.stderr,
                  disable=self.args.no_progress) as bar:
            self.setup(bar)
        del n_runners
        steps = self.plan()
        t0 = time.perf_counter()
        with tqdm(total=len(steps), desc="bench", unit="sample", file=sys.stderr,
                  disable=self.args.no_progress) as bar:
            for r, kind, cfg in steps:
                bar.set_postfix_str(f"round {r + 1}/{self.args.repeat} {kind} {cfg.key}")
                self.sample(kind, cfg)
                bar.update(1)
        measured_s = time.perf_counter() - t0
        self._share()
        return {"measure_seconds": measured_s}

    def _share(self) -> None:
        """Audio-path samples belong to every batch size of a runner; compose samples to every config with
        the same device, input dtype and batch size (each was measured once per round for all of them)."""
        by_runner, by_compose = {}, {}
        for cfg in self.configs:
            rk = (cfg.backend, cfg.device, cfg.precision)
            s = self.results[cfg.key]["samples"]
            if "audio_ms_per_s" in s:
                by_runner.setdefault(rk, (cfg.key, s["audio_ms_per_s"]))
            if not cfg.is_baseline and "prepare_ms" in s:
                ck = (cfg.device, str(self.runners[rk].dtype), cfg.batch)
                by_compose.setdefault(ck, (cfg.key, s["prepare_ms"], s["paste_ms"]))
        for cfg in self.configs:
            rk = (cfg.backend, cfg.device, cfg.precision)
            res = self.results[cfg.key]
            s = res["samples"]
            if "audio_ms_per_s" not in s and rk in by_runner:
                s["audio_ms_per_s"] = list(by_runner[rk][1])
                res.setdefault("shared", {})["audio_ms_per_s"] = by_runner[rk][0]
            if not cfg.is_baseline and "prepare_ms" not in s:
                ck = (cfg.device, str(self.runners[rk].dtype), cfg.batch)
                if ck in by_compose:
                    src, p, q = by_compose[ck]
                    s["prepare_ms"], s["paste_ms"] = list(p), list(q)
                    res.setdefault("shared", {})["prepare_ms"] = src
                    res["shared"]["paste_ms"] = src

    def close(self) -> None:
        for r in self.runners.values():
            with contextlib.suppress(Exception):
                if r is not None and hasattr(r, "close"):
                    r.close()


def _err(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


# ---------------------------------------------------------------------------------------------- analysis

def analyse(report: dict) -> None:
    """Add summaries, ratios to the baseline, pipeline overhead, % of peak and the issue's targets."""
    flops = report["flops"]
    peaks = report["peak_gflops"]
    base = {}
    for key, res in report["results"].items():
        res["summary"] = {m: summarize(v) for m, v in res["samples"].items()}
        mems = res.get("memory", [])
        res["summary"]["peak_rss_mb"] = summarize([m["peak_rss_mb"] for m in mems if "peak_rss_mb" in m])
        res["summary"]["rss_growth_mb"] = summarize([m["rss_growth_mb"] for m in mems if "rss_growth_mb" in m])
        cuda = [m["cuda_peak_mb"] for m in mems if "cuda_peak_mb" in m]
        if cuda:
            res["summary"]["cuda_peak_mb"] = summarize(cuda)
        if res["config"]["backend"] == "baseline":
            base[res["config"]["device"]] = res
    for key, res in report["results"].items():
        cfg, s = res["config"], res["summary"]
        b = base.get(cfg["device"])
        ratios, paired = {}, {}
        if b is not None:
            for m, (_, higher) in METRICS.items():
                mine, theirs = s.get(m, {}).get("median"), b["summary"].get(m, {}).get("median")
                if mine and theirs:
                    ratios[m] = mine / theirs if higher else theirs / mine
                a, c = res["samples"].get(m, []), b["samples"].get(m, [])
                if a and c and len(a) == len(c):   # same round = same noise: ratio per round, then median
                    paired[m] = statistics.median((x / y if higher else y / x) for x, y in zip(a, c))
        res["speedup_vs_baseline"] = ratios          # > 1: better than the baseline (fps up, ms down)
        res["speedup_vs_baseline_paired"] = paired
        g = s.get("generator_fps", {}).get("median")
        over = {}
        for m in ("e2e_memory_fps", "e2e_mp4_fps"):
            e = s.get(m, {}).get("median")
            if g and e:
                over[m.removesuffix("_fps")] = 1.0 - e / g
        res["pipeline_overhead"] = over              # 1 - end-to-end fps / generator-only fps (same config)
        dev_type = cfg["device"].split(":")[0]
        peak = peaks.get(cfg["device"], {}).get(cfg["precision"] if dev_type == "cuda" else "fp32")
        if g and peak:
            res["generator_gflops"] = g * flops["generator_per_frame"] / 1e9
            res["fraction_of_peak"] = res["generator_gflops"] / peak
    report["targets"] = targets(report)


def targets(report: dict) -> list[dict]:
    """Issue #5's acceptance on each device: the default backend at its default batch >= 3x the baseline end
    to end; pipeline overhead (to memory) < 15%, MP4 reported."""
    out = []
    for dev, d in report["defaults"].items():
        key = f"{d['backend']}/{dev}/fp32/b{d['batch']}"
        res = report["results"].get(key)
        row = {"device": dev, "config": key, "measured": res is not None}
        if res is not None:
            sp = res["speedup_vs_baseline"].get("e2e_memory_fps")
            ov = res["pipeline_overhead"]
            row.update({"e2e_memory_speedup": sp, "e2e_mp4_speedup": res["speedup_vs_baseline"].get("e2e_mp4_fps"),
                        "speedup_target": 3.0, "speedup_met": sp is not None and sp >= 3.0,
                        "overhead_memory": ov.get("e2e_memory"), "overhead_mp4": ov.get("e2e_mp4"),
                        "overhead_target": 0.15,
                        "overhead_met": ov.get("e2e_memory") is not None and ov["e2e_memory"] < 0.15})
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------- output

def _fmt(summary: dict | None, digits: int = 2) -> str:
    if not summary or not summary.get("n"):
        return "-"
    med = summary["median"]
    half = (summary["max"] - summary["min"]) / 2
    prec = digits if med < 100 else 0
    return f"{med:.{prec}f}±{half:.{prec}f}" if summary["n"] > 1 else f"{med:.{prec}f}"


def _x(v: float | None) -> str:
    return f"{v:.2f}x" if v else "-"


def _pct(v: float | None) -> str:
    return f"{100 * v:.0f}%" if v is not None else "-"


def table(report: dict) -> str:
    cols = ["config", "e2e mem f/s", "x base", "e2e mp4 f/s", "x base", "gen f/s", "x base", "ovh mem", "ovh mp4",
            "audio ms/s", "prep ms/f", "paste ms/f", "load s", "1st call s", "peak RSS MB", "% peak"]
    rows = []
    for key, res in report["results"].items():
        s, sp, ov = res["summary"], res["speedup_vs_baseline"], res["pipeline_overhead"]
        mark = " *" if any(t["config"] == key for t in report["targets"]) else ""
        rows.append([key + mark, _fmt(s.get("e2e_memory_fps")), _x(sp.get("e2e_memory_fps")),
                     _fmt(s.get("e2e_mp4_fps")), _x(sp.get("e2e_mp4_fps")), _fmt(s.get("generator_fps")),
                     _x(sp.get("generator_fps")), _pct(ov.get("e2e_memory")), _pct(ov.get("e2e_mp4")),
                     _fmt(s.get("audio_ms_per_s"), 1), _fmt(s.get("prepare_ms"), 1), _fmt(s.get("paste_ms"), 1),
                     f"{res['load_s']:.2f}" if res.get("load_s") is not None else "-",
                     f"{res['first_call_s']:.2f}" if res.get("first_call_s") is not None else "-",
                     f"{s['peak_rss_mb']['max']:.0f}" if s.get("peak_rss_mb", {}).get("n") else "-",
                     _pct(res.get("fraction_of_peak"))])
    widths = [max(len(str(r[i])) for r in rows + [cols]) for i in range(len(cols))]
    line = lambda r: "  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
    out = [line(cols), line(["-" * w for w in widths])] + [line(r) for r in rows]
    m, f, inp = report["machine"], report["flops"], report["inputs"]
    out.append("")
    out.append(f"median ± half-range over {report['config']['repeat']} interleaved rounds; {inp['frames']} frames of "
               f"{Path(inp['avatar']).name} ({inp['width']}x{inp['height']}); x base = speedup over the baseline "
               f"on the same device; ovh = 1 - end-to-end f/s / generator-only f/s; * = default backend and batch")
    out.append(f"FLOPs: generator {f['generator_per_frame'] / 1e9:.2f} GFLOP/frame, audio encoder "
               f"{f['audio_encoder_per_window'] / 1e9:.3f} GFLOP/window; peak (matmul, this run): " +
               ", ".join(f"{d} {p}: {v:.0f} GFLOP/s" for d, ps in report["peak_gflops"].items() for p, v in ps.items()))
    load = (f"; load average {m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end"
            if m.get("loadavg_start") and m.get("loadavg_end") else "")
    out.append(f"machine: {m['cpu_model']}, {m['usable_cpus']} CPUs"
               + (f", {', '.join(g['name'] for g in m['gpus'])}" if m["gpus"] else "") + load)
    for t in report["targets"]:
        if not t["measured"]:
            out.append(f"target ({t['device']}): default {t['config']} not measured (add its batch size)")
            continue
        out.append(f"target ({t['device']}): default {t['config']} end to end {_x(t['e2e_memory_speedup'])} the "
                   f"baseline (need >= 3x: {'met' if t['speedup_met'] else 'NOT met'}), MP4 "
                   f"{_x(t['e2e_mp4_speedup'])}; pipeline overhead {_pct(t['overhead_memory'])} to memory "
                   f"(need < 15%: {'met' if t['overhead_met'] else 'NOT met'}), {_pct(t['overhead_mp4'])} to MP4")
    for s in report["skipped"]:
        what = "/".join(str(s[k]) for k in ("backend", "device", "precision", "batch") if k in s)
        out.append(f"skipped {what}: {s['reason']}")
    return "\n".join(out)


def compare(report: dict, old: dict) -> tuple[str, list]:
    rows, out = [], []
    for key, res in report["results"].items():
        prev = old.get("results", {}).get(key)
        if not prev:
            continue
        for m, (unit, higher) in METRICS.items():
            a = prev.get("summary", {}).get(m, {}).get("median")
            b = res["summary"].get(m, {}).get("median")
            if a and b:
                change = (b / a - 1) if higher else (a / b - 1)
                rows.append({"config": key, "metric": m, "old": a, "new": b, "improvement": change})
    if not rows:
        return "compare: no configuration in common with the earlier run", rows
    w = max(len(r["config"]) for r in rows)
    out.append(f"change against {old.get('created', '?')} ({old.get('machine', {}).get('cpu_model', '?')}); "
               "+ is better")
    for r in rows:
        out.append(f"{r['config'].ljust(w)}  {r['metric']:<15} {r['old']:10.2f} -> {r['new']:10.2f}  "
                   f"{100 * r['improvement']:+6.1f}%")
    return "\n".join(out), rows


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("e2e_memory_fps", "end to end, frames in memory"), ("e2e_mp4_fps", "end to end, to MP4"),
              ("generator_fps", "generator only")]
    devices = sorted({r["config"]["device"] for r in report["results"].values()})
    fig, axes = plt.subplots(len(devices), len(panels), figsize=(5.2 * len(panels), 4.2 * len(devices)),
                             squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, dev in enumerate(devices):
        res = [r for r in report["results"].values() if r["config"]["device"] == dev]
        base = next((r for r in res if r["config"]["backend"] == "baseline"), None)
        groups = sorted({(r["config"]["backend"], r["config"]["precision"]) for r in res
                         if r["config"]["backend"] != "baseline"})
        batches = sorted({r["config"]["batch"] for r in res if r["config"]["backend"] != "baseline"})
        width = 0.8 / max(1, len(batches))
        for col, (metric, title) in enumerate(panels):
            ax = axes[row][col]
            for bi, b in enumerate(batches):
                xs, ys, lo, hi = [], [], [], []
                for gi, (be, pr) in enumerate(groups):
                    r = next((r for r in res if r["config"]["backend"] == be and r["config"]["precision"] == pr
                              and r["config"]["batch"] == b), None)
                    s = r["summary"].get(metric, {}) if r else {}
                    if s.get("n"):
                        xs.append(gi - 0.4 + width * (bi + 0.5))
                        ys.append(s["median"])
                        lo.append(s["median"] - s["min"])
                        hi.append(s["max"] - s["median"])
                if xs:
                    ax.bar(xs, ys, width * 0.9, yerr=[lo, hi], capsize=3, label=f"batch {b}",
                           color=colors[bi % len(colors)])
                    for x, y in zip(xs, ys):
                        ax.annotate(f"{y:.1f}", (x, y), ha="center", va="bottom", fontsize=7,
                                    xytext=(0, 2), textcoords="offset points")
            bs = base["summary"].get(metric, {}) if base else {}
            if bs.get("n"):
                ax.axhline(bs["median"], color="crimson", linestyle="--", linewidth=1.2,
                           label=f"baseline {bs['median']:.2f}")
            ax.set_xticks(range(len(groups)))
            ax.set_xticklabels([f"{be}\n{pr}" for be, pr in groups])
            ax.set_title(f"{title} ({dev})", fontsize=10)
            ax.set_ylabel("frames/s")
            ax.grid(axis="y", alpha=0.3)
            ax.legend(fontsize=7)
    m = report["machine"]
    fig.suptitle(f"lipsync_trt bench: {m['cpu_model']} ({m['usable_cpus']} CPUs)"
                 + (f", {m['gpus'][0]['name']}" if m["gpus"] else "")
                 + f"; {report['inputs']['frames']} frames of {Path(report['inputs']['avatar']).name}; "
                 f"median, bars min..max", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def check_report(report: dict) -> list[str]:
    """What is missing or not positive in a report (used by the tests; empty when complete)."""
    problems = []
    for k in ("machine", "flops", "peak_gflops", "results", "targets", "inputs", "config", "defaults"):
        if k not in report:
            problems.append(f"missing {k}")
    for key, res in report.get("results", {}).items():
        for m in METRICS:
            vals = res.get("samples", {}).get(m)
            if not vals:
                problems.append(f"{key}: no samples of {m}")
            elif not all(isinstance(v, (int, float)) and v > 0 and math.isfinite(v) for v in vals):
                problems.append(f"{key}: non-positive {m}: {vals}")
        for k in ("load_s", "first_call_s"):
            if not (isinstance(res.get(k), (int, float)) and res[k] > 0):
                problems.append(f"{key}: {k} missing or not positive")
        if not res.get("summary", {}).get("peak_rss_mb", {}).get("n"):
            problems.append(f"{key}: no peak RSS")
    return problems


# ---------------------------------------------------------------------------------------------- CLI

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lipsync_trt.bench",
                                description="Compare backends, batch sizes and stages against the SyncTalk_2D "
                                            "baseline; writes a table (stdout), a JSON and a PNG plot.")
    src = p.add_argument_group("inputs")
    src.add_argument("--avatar", help="avatar folder (SyncTalk_2D layout: full_body_img/, landmarks/)")
    src.add_argument("--audio", help="speech WAV")
    src.add_argument("--generator", help="generator checkpoint (.pth); default: seeded demo weights")
    src.add_argument("--audio-encoder", help="audio encoder checkpoint (.pth); default: seeded demo weights")
    src.add_argument("--demo", action="store_true", help="synthetic avatar, speech and seeded weights")
    src.add_argument("--engines", help="folder of prebuilt ONNX/TensorRT artifacts passed to the backends")
    cfg = p.add_argument_group("configurations")
    cfg.add_argument("--backends", help="comma list (default: every available one); the baseline always runs; "
                     "torch:MODE is the torch backend with torch.compile(mode=MODE), e.g. torch:reduce-overhead "
                     "(CUDA graphs per batch size) or torch:max-autotune; onnxruntime:spin is onnxruntime with its idle "
                     "threads busy-waiting (spinning=True)")
    cfg.add_argument("--devices", help="comma list: cpu, cuda, cuda:1 (default: auto = cuda when present, else cpu)")
    cfg.add_argument("--batch-sizes", help="comma list (default: 1,4 on a CPU, 1,8,32,128 on CUDA)")
    cfg.add_argument("--precisions", help="comma list: fp32, fp16, bf16 (default: fp32 on a CPU, fp32,fp16 on CUDA)")
    run = p.add_argument_group("run")
    run.add_argument("--frames", type=int, help=f"the first N video frames of the audio (default {DEFAULTS['frames']})")
    run.add_argument("--audio-seconds", type=float,
                     help=f"seconds of audio for the audio-path metric (default {DEFAULTS['audio_seconds']:g})")
    run.add_argument("--warmup", type=int, help="untimed generator calls per config after the first (default 1)")
    run.add_argument("--repeat", type=int, help=f"interleaved rounds (default {DEFAULTS['repeat']})")
    run.add_argument("--quick", action="store_true", help="a short run: 1 frame, batch 1, 2 rounds, no warmup")
    out = p.add_argument_group("output")
    out.add_argument("--json", default="bench.json", help="results JSON (default ./bench.json)")
    out.add_argument("--plot", default="bench.png", help="PNG plot (default ./bench.png; 'none' to skip)")
    out.add_argument("--compare", help="an earlier results JSON to show the change against")
    out.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    out.add_argument("--debug", action="store_true", help="print tracebacks of failed samples")
    args = p.parse_args(argv)
    base = QUICK if args.quick else DEFAULTS
    for k in ("frames", "repeat", "warmup", "audio_seconds"):
        if getattr(args, k) is None:
            setattr(args, k, base[k])
    if args.frames < 1 or args.repeat < 1 or args.warmup < 0 or args.audio_seconds <= 0:
        p.error("--frames and --repeat must be >= 1, --warmup >= 0, --audio-seconds > 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    created = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    info = machine()
    with tempfile.TemporaryDirectory(prefix="lipsync_bench_") as tmpdir:
        tmp = Path(tmpdir)
        inputs = make_inputs(args, tmp)
        for note in inputs.notes:
            log(f"note: {note}")
        bench = Bench(args, inputs, tmp)
        log(f"bench: {len(bench.configs)} configs ({', '.join(c.key for c in bench.configs)}), "
            f"{inputs.frames} frames, {args.repeat} rounds")
        flops = count_flops()
        peaks: dict = {}
        for dev in bench.devices:
            precs = sorted({c.precision for c in bench.configs if c.device == str(dev)}) if dev.type == "cuda" else ["fp32"]
            peaks[str(dev)] = {p: matmul_peak(dev, p, args.quick) for p in precs}
        try:
            timing = bench.run()
        finally:
            bench.close()
        for dev in bench.devices:   # again at the end: the better of the two
            for p in list(peaks[str(dev)]):
                peaks[str(dev)][p] = max(peaks[str(dev)][p], matmul_peak(dev, p, args.quick))
        defaults = {}
        from . import backends, pipeline
        for dev in bench.devices:
            name, d = backends.select("auto", dev, args.engines)
            defaults[str(dev)] = {"backend": name, "batch": pipeline.default_batch_size(d)}
        del pipeline
        agree = {}
        for key, frame in bench._last_frames.items():
            base = bench._last_frames.get(f"baseline/{key.split('/')[1]}/fp32/b1")
            if frame is not None and base is not None and frame.shape == base.shape and not key.startswith("baseline"):
                d = np.abs(frame.astype(np.int16) - base.astype(np.int16))
                agree[key] = {"identical": float((d == 0).mean()), "within_2": float((d <= 2).mean()),
                              "max_abs": int(d.max())}
        info["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        report = {
            "schema": SCHEMA, "created": created, "command": " ".join([Path(sys.executable).name, "-m",
                                                                         "lipsync_trt.bench"] + sys.argv[1:]),
            "config": {k: v for k, v in vars(args).items()}, "machine": info,
            "inputs": {"avatar": str(inputs.avatar_dir), "audio": str(inputs.audio_src),
                       "generator": str(inputs.generator), "audio_encoder": str(inputs.audio_encoder),
                       "seeded_weights": inputs.seeded_weights, "demo": inputs.demo, "frames": inputs.frames,
                       "audio_seconds": inputs.audio_seconds, "width": bench.avatar.width,
                       "height": bench.avatar.height, "template_frames": bench.avatar.count, "notes": inputs.notes},
            "flops": flops, "peak_gflops": peaks, "memory_method": bench.mem.method,
            "availability": bench.availability, "loads": bench.loads, "defaults": defaults,
            "skipped": bench.skipped, "results": bench.results, "last_frame_vs_baseline": agree,
            "measure_seconds": timing["measure_seconds"],
        }
        analyse(report)
        report["total_seconds"] = time.perf_counter() - started
    text = table(report)
    print(text)
    if args.compare:
        old = json.loads(Path(args.compare).read_text())
        ctext, rows = compare(report, old)
        report["compare"] = {"against": args.compare, "rows": rows}
        print()
        print(ctext)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    tmp_json = Path(str(args.json) + ".part")
    tmp_json.write_text(json.dumps(_jsonable(report), indent=1))
    os.replace(tmp_json, args.json)
    log(f"bench: wrote {args.json}")
    if args.plot and args.plot.lower() != "none":
        try:
            plot(report, Path(args.plot))
            log(f"bench: wrote {args.plot}")
        except ImportError:
            log("bench: matplotlib is not installed; no plot (pip install matplotlib)")
    log(f"bench: {report['total_seconds']:.1f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
