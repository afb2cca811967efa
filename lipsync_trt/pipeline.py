"""The only place that knows the order of the stages: audio -> features -> (template frames -> prepare ->
generator -> paste) -> frames, batched, with decode/prepare, model and paste/sink overlapped in threads."""
from __future__ import annotations

import contextlib
import os
import queue
import re
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from . import audio as A
from . import compose
from . import recipe as R
from .avatar import Avatar
from .backends.base import Runner
from .compose import TemplateCrops
from .errors import UsageError
from .video import DEFAULT_CRF, DEFAULT_PRESET

ENCODER_BATCH = 256   # mel windows per audio-encoder call (windows batch freely, RECIPE §2; bounded for memory)
HELPER_NICE = 10   # how much lower than the model's the helper threads' CPU priority is, on a CPU (Linux)


@dataclass
class Features:
    """Audio side of a job: the 16 kHz samples, the mel (80, T), encoder outputs (N, 512), padded (N + 2, 512)."""

    samples: np.ndarray
    mel: torch.Tensor
    features: torch.Tensor
    padded: torch.Tensor

    @property
    def num_frames(self) -> int:
        """Video frames this audio makes (N + 2)."""
        return self.padded.shape[0]


CACHE_BUDGET = 4 << 30          # bytes of device memory the template cache may take by default (CUDA only)
CACHE_FREE_FRACTION = 0.25      # ... and at most this share of the device's free memory


def use_template_cache(runner: Runner, avatar: Avatar, templates: int, cache: bool | None = None) -> bool:
    """Whether iter_frames keeps each template's crop and decoded frame on the device (`compose.TemplateCrops`):
    `cache` when given, else on CUDA when all `templates` fit the budget. On a CPU it stays off by default: a clip
    reuses a template only after a ping-pong period (sanders: 1,044 frames), and the whole avatar would take
    gigabytes of host memory (measured: docs/BENCHMARKS.md, "Template cache")."""
    if cache is not None:
        return cache
    if runner.device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(runner.device)
    need = TemplateCrops.nbytes(avatar, templates, frames=True)
    return need <= min(CACHE_BUDGET, CACHE_FREE_FRACTION * free)


def default_batch_size(runner: Runner | torch.device) -> int:
    """32 on a GPU (fills it); 1 on a CPU, where larger batches only spill the caches (the measurements are in
    docs/BENCHMARKS.md)."""
    device = runner.device if isinstance(runner, Runner) else torch.device(runner)
    return 32 if device.type == "cuda" else 1


def encode_features(runner: Runner, wav16k: np.ndarray, batch: int = ENCODER_BATCH) -> Features:
    """16 kHz mono samples -> mel, per-window encoder features and the padded per-frame features."""
    samples = torch.from_numpy(np.ascontiguousarray(wav16k, dtype=np.float32)).to(runner.device)
    mel = A.mel(samples)
    windows = A.mel_windows(mel)
    feats = torch.cat([runner.encode_audio(windows[i:i + batch]) for i in range(0, len(windows), batch)])
    return Features(samples=wav16k, mel=mel, features=feats, padded=A.pad_features(feats))


# an index or an inclusive range of ASCII digits, at most 12 each (int() of thousands of digits raises)
_FRAME_SPEC = re.compile(r"^\s*([0-9]{1,12})\s*(?:-\s*([0-9]{1,12})\s*)?$")


def frame_ranges(spec: str, what: str = "--frames") -> list[tuple[int, int]]:
    """'0,1,2,100-139' -> its inclusive (lo, hi) ranges, checked without knowing the clip's length (syntax, order,
    not empty): UsageError naming `what` otherwise. batch checks every job's selection with it before any runs."""
    if not isinstance(spec, str):
        raise UsageError(f"{what}: expected a string like '0-99,120', got {type(spec).__name__}")
    ranges = []
    for part in spec.split(","):
        if not part.strip():
            continue
        m = _FRAME_SPEC.match(part)
        if not m:
            raise UsageError(f"{what}: {part.strip()!r} is not an index or an inclusive range like 100-139")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise UsageError(f"{what}: range {part.strip()!r} runs backwards")
        ranges.append((lo, hi))
    if not ranges:
        raise UsageError(f"{what}: no frame indices given")
    return ranges


def parse_frames(spec: str, num_frames: int) -> list[int]:
    """'0,1,2,100-139' -> sorted unique indices; each must be inside 0..num_frames-1."""
    ranges = frame_ranges(spec)
    for _, hi in ranges:
        if hi >= num_frames:
            raise UsageError(f"--frames: index {hi} is outside 0..{num_frames - 1} (this audio makes "
                             f"{num_frames} video frames)")
    out: set[int] = set()
    for lo, hi in ranges:
        out.update(range(lo, hi + 1))
    return sorted(out)


_DONE = object()


class Worker(threading.Thread):
    """The pipeline's one thread primitive: fn(item) for each item of `inbox` (an iterable, or a queue ended by
    _DONE), in order, results into the bounded queue `outbox` (None: a sink, results dropped); `setup()` first.
    The first error ends it and travels on: into `outbox` (the consumer re-raises it) and into `error`.
    Setting `stop` ends it early (puts re-check it every 0.1 s)."""

    def __init__(self, fn: Callable, inbox: Iterable | queue.Queue, outbox: queue.Queue | None = None,
                 stop: threading.Event | None = None, setup: Callable[[], None] | None = None, name: str | None = None):
        super().__init__(daemon=True, name=name)
        self.fn, self.inbox, self.outbox, self.setup = fn, inbox, outbox, setup
        self.stop = stop if stop is not None else threading.Event()
        self.error: BaseException | None = None

    def _items(self):
        if isinstance(self.inbox, queue.Queue):
            while True:
                item = self.inbox.get()
                yield item
                if item is _DONE or isinstance(item, BaseException):
                    return
        else:
            yield from self.inbox
            yield _DONE

    def _put(self, item) -> bool:
        if self.outbox is None:
            return True
        while not self.stop.is_set():
            try:
                self.outbox.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run(self) -> None:
        try:
            if self.setup is not None:
                self.setup()
            for item in self._items():
                if self.stop.is_set():
                    return
                if item is _DONE or isinstance(item, BaseException):
                    self._put(item)
                    return
                if not self._put(self.fn(item)):
                    return
        except BaseException as exc:   # handed on; the consumer re-raises it
            self.error = exc
            self._put(exc)


def _prepare(runner: Runner, avatar: Avatar, template_ids: list[int], cache: TemplateCrops | None = None):
    if cache is not None:   # inputs derived from the cached crops; a fresh copy of each (kept) frame to paste into
        crops, boxes = cache.get(template_ids)
        frames = [cache.frame(t, keep=True).clone() for t in template_ids]
        return frames, compose.generator_inputs(crops, runner.dtype), crops, boxes
    frames = [torch.from_numpy(avatar.frame(t).copy()).to(runner.device) for t in template_ids]
    boxes = [avatar.boxes[t] for t in template_ids]
    inputs, crops = compose.prepare(frames, boxes, runner.dtype)
    return frames, inputs, crops, boxes


def _paste(prepared, pred: torch.Tensor, feather: int = 0) -> list[torch.Tensor]:
    frames, _, crops, boxes = prepared
    return compose.paste(frames, crops, pred, boxes, feather=feather)


_THREADS_LOCK = threading.Lock()
_THREADS_USERS = 0
_THREADS_SAVED: tuple[int, int] = (0, 0)


@contextlib.contextmanager
def helper_threads(runner: Runner) -> Iterator[None]:
    """While frames render on the CPU, run OpenCV single-threaded, and torch's helper ops too when the networks
    run in another runtime's pool (ONNX Runtime): spinning helper pools otherwise take the cores from the model
    (docs/BENCHMARKS.md). Both counts are process-wide, so concurrent users share one saved value: the first
    one in saves them, the last one out restores them."""
    global _THREADS_USERS, _THREADS_SAVED
    if runner.device.type != "cpu":
        yield
        return
    import cv2

    with _THREADS_LOCK:
        if _THREADS_USERS == 0:
            _THREADS_SAVED = cv2.getNumThreads(), torch.get_num_threads()
        _THREADS_USERS += 1
        cv2.setNumThreads(1)
        if runner.own_cpu_pool:
            torch.set_num_threads(1)
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _THREADS_USERS -= 1
            if _THREADS_USERS == 0:
                cv2.setNumThreads(_THREADS_SAVED[0])
                torch.set_num_threads(_THREADS_SAVED[1])


def yield_to_model(runner: Runner) -> None:
    """Lower the calling thread's CPU priority by HELPER_NICE when the model runs on the CPU (Linux only: there
    a thread has its own nice value, inherited by the threads it starts, such as x264's). The model's threads
    then preempt decode/prepare and the H.264 encode instead of stalling at a barrier while one of their two
    cores is taken (`generate` to MP4 on a CPU: see docs/BENCHMARKS.md). Call it only in threads the
    pipeline starts: an unprivileged thread cannot raise its priority back."""
    if runner.device.type != "cpu" or not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + HELPER_NICE))
    except OSError:
        pass   # not permitted (seccomp, containers): priorities stay equal, which is only slower


@contextlib.contextmanager
def in_background(fn: Callable[[object], None], setup: Callable[[], None] | None = None,
                  depth: int = 4) -> Iterator[Callable[[object], None]]:
    """Yield `submit`; a `Worker` calls fn(item) for each submitted item, in order (`setup()` first). Its error is
    re-raised in the caller at the next submit or at exit; on exit it finishes what was submitted first."""
    work: queue.Queue = queue.Queue(maxsize=depth)
    worker = Worker(fn, work, setup=setup, name="lipsync_trt-sink")
    worker.start()

    def put(item) -> None:
        while worker.is_alive():   # a failed worker takes nothing more: never block on its full queue
            try:
                work.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def submit(item) -> None:
        if worker.error is not None:
            raise worker.error
        put(item)

    try:
        yield submit
    finally:
        put(_DONE)
        worker.join()
    if worker.error is not None:
        raise worker.error


def iter_frames(runner: Runner, avatar: Avatar, feats: Features, indices: list[int] | None = None,
                start_frame: int = 0, batch_size: int | None = None, timings: dict | None = None,
                cache: bool | None = None, feather: int = 0, tune_threads: bool = True,
                templates: TemplateCrops | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (video frame index, composited frame (H, W, 3) uint8 BGR torch tensor) in ascending order.
    `feather` > 0 blends each box's edge into the template over that many pixels (`compose.parse_blend`).

    Decode + prepare runs in one thread, the generator in another, paste in the caller's thread, so the
    three overlap. `timings`, when given, accumulates seconds per stage ('prepare', 'model', 'paste').
    `cache`: keep decoded + prepared templates on the device (see `use_template_cache`; None = decide). `templates`:
    the cache to keep them in, kept across calls (a LipSync's own, for this avatar on the runner's device); None: a
    cache for this call only. With a shared cache the decision is made for all the avatar's templates, which it may
    come to hold (a clip shorter than a ping-pong period reuses none of its own templates anyway).
    On the CPU, with `tune_threads`, helper thread counts are lowered until the iterator finishes or is closed
    (`helper_threads`); the public `LipSync.frames` leaves them alone, since its caller decides how long it lives.
    """
    with helper_threads(runner) if tune_threads else contextlib.nullcontext():
        yield from _iter_frames(runner, avatar, feats, indices, start_frame, batch_size, timings, cache, feather,
                                templates)


def _iter_frames(runner: Runner, avatar: Avatar, feats: Features, indices: list[int] | None,
                 start_frame: int, batch_size: int | None, timings: dict | None,
                 cache: bool | None, feather: int = 0, shared: TemplateCrops | None = None
                 ) -> Iterator[tuple[int, torch.Tensor]]:
    n = feats.num_frames
    indices = list(range(n)) if indices is None else indices
    order = avatar.order(n, start_frame)
    if shared is not None and (shared.avatar is not avatar or shared.device != runner.device):
        raise ValueError("iter_frames: templates= must be a cache of this avatar on the runner's device")
    used = avatar.count if shared is not None else len({int(order[i]) for i in indices})
    templates = None
    if use_template_cache(runner, avatar, used, cache):
        templates = shared if shared is not None else TemplateCrops(avatar, runner.device, frames=True)
    bs = batch_size or default_batch_size(runner)
    batches = [indices[i:i + bs] for i in range(0, len(indices), bs)]
    stats = timings if timings is not None else {}
    for key in ("prepare", "model", "paste"):
        stats.setdefault(key, 0.0)

    def prep(idx: list[int]):
        t = time.perf_counter()
        prepared = _prepare(runner, avatar, [int(order[i]) for i in idx], templates)
        audio = A.feature_windows(feats.padded, idx).to(runner.dtype)
        stats["prepare"] += time.perf_counter() - t
        return idx, prepared, audio

    def model(item):
        idx, prepared, audio = item
        t = time.perf_counter()
        pred = runner.generate(prepared[1], audio)
        if pred.device.type == "cuda":
            torch.cuda.current_stream(pred.device).synchronize()
        stats["model"] += time.perf_counter() - t
        return idx, prepared, pred

    stop = threading.Event()
    q1: queue.Queue = queue.Queue(maxsize=2)
    q2: queue.Queue = queue.Queue(maxsize=2)
    workers = [Worker(prep, batches, q1, stop, setup=lambda: yield_to_model(runner), name="lipsync_trt-prepare"),
               Worker(model, q1, q2, stop, name="lipsync_trt-model")]
    for w in workers:
        w.start()
    try:
        while True:
            item = q2.get()
            if item is _DONE:
                break
            if isinstance(item, BaseException):
                raise item
            idx, prepared, pred = item
            t = time.perf_counter()
            frames = _paste(prepared, pred, feather)
            stats["paste"] += time.perf_counter() - t
            yield from zip(idx, frames)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=5)


@dataclass
class Summary:
    """What a generate call did: frame count, wall time, frames/s, backend, device, output paths."""

    frames: int
    seconds: float
    backend: str
    device: str
    batch_size: int
    out: str | None = None
    frames_dir: str | None = None
    timings: dict | None = None

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else float("inf")

    def line(self) -> str:
        where = ", ".join(p for p in (self.out, self.frames_dir) if p)
        return (f"{self.frames} frames in {self.seconds:.2f} s ({self.fps:.2f} frames/s), backend {self.backend}, "
                f"device {self.device}, batch {self.batch_size}" + (f" -> {where}" if where else ""))


def audio_span(indices: list[int], samples: np.ndarray, rate: int) -> np.ndarray | None:
    """The input audio under a set of rendered frames: all of it for the whole clip, the matching span
    for one contiguous range, None (no audio track) for scattered frames."""
    if indices[-1] - indices[0] + 1 != len(indices):
        return None
    start = round(indices[0] * rate / R.FPS)
    stop = round((indices[-1] + 1) * rate / R.FPS)
    return samples[start:stop]


def generate(runner: Runner, avatar: Avatar, samples: np.ndarray, rate: int, out: str | os.PathLike | None = None,
             frames_dir: str | os.PathLike | None = None, frames: str | list[int] | None = None,
             start_frame: int = 0, batch_size: int | None = None, crf: int = DEFAULT_CRF,
             preset: str = DEFAULT_PRESET,
             codec: str = "libx264", progress: bool = True, source: str = "audio", feather: int = 0,
             templates: TemplateCrops | None = None) -> Summary:
    """Render audio (samples at `rate`, (n,) or (n, channels)) to an MP4 and/or a folder of PNGs. Frames are
    encoded/written in a helper thread (`in_background`), at the helper priority on a CPU (`yield_to_model`).
    `feather`, `templates`: see `iter_frames`."""
    from tqdm import tqdm

    from .audio import to_16k_mono
    from .video import FramesDir, VideoWriter, check_writable

    if out is None and frames_dir is None:
        raise UsageError("nothing to write: give an output video path and/or a frames folder")
    if out is not None:
        check_writable(out)
    fdir = FramesDir(frames_dir) if frames_dir is not None else None   # checked now, written all or nothing
    wav16k = to_16k_mono(samples, rate, source=source)
    avatar.order(2, start_frame)   # validates the start frame before any work
    t0 = time.perf_counter()
    feats = encode_features(runner, wav16k)
    n = feats.num_frames
    whole = frames is None
    indices = list(range(n)) if whole else (parse_frames(frames, n) if isinstance(frames, str) else
                                            parse_frames(",".join(map(str, frames)), n))
    track = samples if whole else audio_span(indices, samples, rate)
    bs = batch_size or default_batch_size(runner)
    timings: dict = {}
    writer = (VideoWriter(out, avatar.width, avatar.height, audio=track, audio_rate=rate, crf=crf, codec=codec,
                          preset=preset)
              if out is not None else contextlib.nullcontext())

    def sink(item: tuple[int, np.ndarray]) -> None:   # in its own thread: the H.264 encode overlaps the paste
        i, arr = item
        if out is not None:
            writer.write(arr)
        if fdir is not None:
            fdir.write(i, arr)

    with (fdir or contextlib.nullcontext(), writer, in_background(sink, setup=lambda: yield_to_model(runner)) as submit,
          tqdm(total=len(indices), unit="frame", disable=not progress, desc="generate", leave=False) as bar):
        for i, frame in iter_frames(runner, avatar, feats, indices, start_frame, bs, timings, feather=feather,
                                    templates=templates):
            submit((i, frame.cpu().numpy()))
            bar.update(1)
    return Summary(frames=len(indices), seconds=time.perf_counter() - t0, backend=runner.name,
                   device=str(runner.device), batch_size=bs, out=str(out) if out else None,
                   frames_dir=str(fdir.path) if fdir else None, timings=timings)
