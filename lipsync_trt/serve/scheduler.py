"""Batching across streams: one model worker thread runs the audio encoder and the generators in batches
(max batch, max wait), a small thread pool turns mouths into JPEG + ZIP, and results go back to each
stream's event-loop delivery. Back-pressure: a stream with `max_queue` frames in flight gets its new frames
answered OVERLOADED (policy 'reject') or with the last mouth again (policy 'skip'), never an unbounded queue; and
a frame that has waited longer than `max_delay` since its last chunk arrived is answered the same way instead of
being generated, so the wait stays bounded in time however many streams share the device.
"""
from __future__ import annotations

import collections
import threading
import time
import traceback
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import compose
from .. import recipe as R
from ..avatar import Avatar
from ..backends.base import Runner
from .protocol import Status, encode_response, error_response, frame_zip
from .session import END, ERROR, FRAME, REUSE, Stream

POLICIES = ("reject", "skip")
ENCODER_BATCH = 256


@dataclass
class ModelEntry:
    """An avatar the server was started with and the runner of its generator (runners may be shared)."""

    name: str
    avatar: Avatar
    runner: Runner
    _cache: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def prepared(self, template: int, cache_size: int) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """(generator input (6, 320, 320), crop328 uint8, box) of a template frame, LRU-cached per avatar."""
        with self._lock:
            hit = self._cache.get(template)
            if hit is not None:
                self._cache.move_to_end(template)
                return hit
        x1, y1, x2, y2 = (int(v) for v in self.avatar.boxes[template])
        crop = torch.from_numpy(np.ascontiguousarray(self.avatar.frame(template)[y1:y2, x1:x2]))
        # compose.prepare as the offline pipeline runs it (OpenCV on a CPU, Triton/PyTorch on CUDA)
        inputs, crop328 = compose.prepare([crop.to(self.runner.device)], [(0, 0, x2 - x1, y2 - y1)],
                                          self.runner.dtype)
        value = (inputs[0], crop328[0], (x1, y1, x2, y2))
        with self._lock:
            self._cache[template] = value
            while len(self._cache) > cache_size:
                self._cache.popitem(last=False)
        return value


def mouths(pred: torch.Tensor, crops328: list[torch.Tensor], boxes: list[tuple]) -> list[np.ndarray]:
    """Generator output -> the box-sized region of each composited frame (compose.mouths: what compose.paste
    writes into the frame offline)."""
    return [m.cpu().numpy() for m in compose.mouths(torch.stack(crops328), pred, boxes)]


def encode_jpeg(img: np.ndarray, quality: int) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


@dataclass
class _GenJob:
    stream: Stream
    frame_id: int
    template: int
    audio: torch.Tensor
    t_ready: float       # when it was queued for the generator (features encoded): the batching clock
    t_arrived: float     # when the chunk that made it ready was submitted: the deadline's clock


class Scheduler:
    def __init__(self, encoder: Runner, max_batch: int = 8, max_wait: float = 0.010, max_queue: int = 50,
                 policy: str = "reject", jpeg_quality: int = 95, encode_threads: int = 2, cache_size: int = 128,
                 max_delay: float | None = None):
        if policy not in POLICIES:
            raise ValueError(f"policy {policy!r}: expected one of {POLICIES}")
        self.encoder, self.max_batch, self.max_wait = encoder, max(1, max_batch), max(0.0, max_wait)
        self.max_delay = max_delay if max_delay and max_delay > 0 else None   # seconds; None: no deadline
        self.max_queue, self.policy, self.jpeg_quality, self.cache_size = max(1, max_queue), policy, jpeg_quality, cache_size
        self._cond = threading.Condition()
        self._enc: collections.deque = collections.deque()
        self._gen: collections.deque = collections.deque()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="lipsync-model", daemon=True)
        self._pool = ThreadPoolExecutor(max_workers=max(1, encode_threads), thread_name_prefix="lipsync-jpeg")
        self.stats = collections.Counter()
        self.latency = collections.deque(maxlen=10000)     # seconds from frame ready to ZIP done

    def start(self) -> "Scheduler":
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=30)
        self._pool.shutdown(wait=True)

    def submit(self, stream: Stream, first: int, windows: torch.Tensor, n_windows: int | None = None) -> None:
        """New encoder windows of a stream (in order), and N when the stream has ended. Any thread."""
        with self._cond:
            self._enc.append((stream, first, windows, n_windows, time.perf_counter()))
            self._cond.notify_all()

    def queued(self) -> int:
        with self._cond:
            return len(self._gen)

    # -- the model worker
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._enc and not self._gen:
                    self._cond.wait()
                if self._stop:
                    return
                enc = list(self._enc)
                self._enc.clear()
            # encode first: the frames it makes ready can join this batch, and no encoding runs between the
            # deadline check below and the generator
            try:
                if enc:
                    self._encode(enc)
            except Exception:   # never let the worker die; the affected frames were answered INTERNAL
                traceback.print_exc()
            with self._cond:
                late = self._take_late()
                batch = self._take_batch() if self._gen else None
                if not late and batch is None:
                    # wait for more frames, at most until the oldest is max_wait old
                    if self._gen and not self._enc and not self._stop:
                        wait = self._gen[0].t_ready + self.max_wait - time.perf_counter()
                        if wait > 0:
                            self._cond.wait(wait)
                    continue
            try:
                if late:
                    self._answer_late(late)
                if batch:
                    self._generate(batch)
            except Exception:
                traceback.print_exc()

    def _take_late(self) -> list[_GenJob]:
        """Under the lock: the queued frames older than max_delay (counted from their last chunk's arrival), taken
        out of the queue. The queue is in arrival order (batches are taken out of it in order), so they are a
        prefix of it."""
        late: list[_GenJob] = []
        if self.max_delay is None:
            return late
        limit = time.perf_counter() - self.max_delay
        while self._gen and self._gen[0].t_arrived < limit:
            late.append(self._gen.popleft())
        return late

    def _answer_late(self, late: list[_GenJob]) -> None:
        """Frames past the deadline are not generated: answered by the overload policy, as a full queue is."""
        now = time.perf_counter()
        for j in late:
            with j.stream.lock:
                j.stream.inflight -= 1
            self.stats["late"] += 1
            if not j.stream.closed:
                self._overloaded(j.stream, j.frame_id, f"frame {j.frame_id} waited {1000 * (now - j.t_arrived):.0f} "
                                 f"ms for the generator, over the {1000 * self.max_delay:.0f} ms limit")

    def _take_batch(self) -> list[_GenJob] | None:
        head = self._gen[0]
        runner = head.stream.entry.runner
        same = [j for j in self._gen if j.stream.entry.runner is runner]
        full = len(same) >= self.max_batch
        if not full and time.perf_counter() - head.t_ready < self.max_wait:
            return None
        take = same[:self.max_batch]
        chosen = set(map(id, take))
        self._gen = collections.deque(j for j in self._gen if id(j) not in chosen)
        return take

    def _encode(self, jobs: list) -> None:
        live = [j for j in jobs if not j[0].closed]
        wins = [j[2] for j in live if len(j[2])]
        feats = torch.zeros(0, R.FEATURE_DIM)
        try:
            if wins:
                allw = torch.cat(wins)
                feats = torch.cat([self.encoder.encode_audio(allw[i:i + ENCODER_BATCH]).float().cpu()
                                   for i in range(0, len(allw), ENCODER_BATCH)])
        except Exception as exc:
            for stream, *_ in live:
                self._fail_stream(stream, f"audio encoder failed: {exc}")
            raise
        pos, now = 0, time.perf_counter()
        ready: list[_GenJob] = []
        for stream, first, w, n, t_arrived in live:
            f = feats[pos:pos + len(w)]
            pos += len(w)
            try:
                frames = stream.back.add(first, f, n)
            except Exception as exc:
                self._fail_stream(stream, f"stream state: {exc}")
                continue
            for i, template, audio in frames:
                ready.append(self._admit(stream, i, template, audio, now, t_arrived))
            if n is not None:
                stream.post(stream.back.frames_total, (END, encode_response(Status.END, stream.back.frames_total),
                                                       None, None))
        with self._cond:
            self._gen.extend(j for j in ready if j is not None)

    def _admit(self, stream: Stream, i: int, template: int, audio: torch.Tensor, now: float, t_arrived: float
               ) -> _GenJob | None:
        with stream.lock:
            full = stream.inflight >= self.max_queue
            if not full:
                stream.inflight += 1
        if not full:
            return _GenJob(stream, i, template, audio, now, t_arrived)
        self._overloaded(stream, i, f"{self.max_queue} frames of this stream are already queued")
        return None

    def _overloaded(self, stream: Stream, i: int, reason: str) -> None:
        """Answer frame i without generating it, per the policy: skip -> the last mouth again (marked reused),
        reject -> OVERLOADED with the reason. (Delivered in frame order like every answer.)"""
        if self.policy == "skip":
            self.stats["reused"] += 1
            stream.post(i, (REUSE, None, None, None))
        else:
            self.stats["overloaded"] += 1
            stream.post(i, (ERROR, error_response(Status.OVERLOADED, i, f"server overloaded: {reason} (policy reject)"),
                            None, None))

    def _generate(self, batch: list[_GenJob]) -> None:
        batch = [j for j in batch if not j.stream.closed]
        if not batch:
            return
        runner = batch[0].stream.entry.runner
        try:
            prep = [j.stream.entry.prepared(j.template, self.cache_size) for j in batch]
            x = torch.stack([p[0] for p in prep])
            a = torch.stack([j.audio for j in batch]).to(runner.device, runner.dtype)
            pred = runner.generate(x, a)
            crops = mouths(pred, [p[1] for p in prep], [p[2] for p in prep])
        except Exception as exc:
            for j in batch:
                j.stream.post(j.frame_id, (FRAME, error_response(Status.INTERNAL, j.frame_id,
                                                                 f"generator failed: {exc}"[:200]), None, None))
            raise
        self.stats["batches"] += 1
        self.stats["frames"] += len(batch)
        self._pool.submit(self._pack, batch, crops, [p[2] for p in prep])

    def _pack(self, batch: list[_GenJob], crops: list[np.ndarray], boxes: list[tuple]) -> None:
        for j, img, box in zip(batch, crops, boxes):
            try:
                jpeg = encode_jpeg(img, self.jpeg_quality)
                msg = encode_response(Status.OK, j.frame_id, frame_zip(jpeg, box))
            except Exception as exc:
                jpeg, msg = None, error_response(Status.INTERNAL, j.frame_id, f"encoding failed: {exc}"[:200])
            self.latency.append(time.perf_counter() - j.t_ready)
            j.stream.post(j.frame_id, (FRAME, msg, jpeg, box))

    def _fail_stream(self, stream: Stream, reason: str) -> None:
        stream.closed = True
        stream.post(-1, (END, error_response(Status.INTERNAL, 0, reason[:200]), None, None))
