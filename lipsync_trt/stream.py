"""The streaming core: audio chunks in, video frames out as soon as the recipe allows (RECIPE §1-4), equal to
the whole-file path on the same samples. `LipSync.stream` is its public face; the server uses the same pieces.

Three pieces, each with one owner at a time:
  `AudioWindows`  samples at any rate -> incremental 16 kHz resampling and mel -> encoder input windows;
  `ReadyFrames`   encoder features in window order -> the video frames whose feature windows are complete;
  `Core`          the batcher's one client for every live path (`LipSync.stream`, `LipSync.live`, each server
                  stream): options fixed at construction, windows to the encoder, the frames the stream's own rule
                  makes ready to the generator, typed `batcher.Result`s back.
`Stream` joins them for one caller: push a chunk, get every frame that became ready (the encoder and generator
calls go through a `batcher.Batcher`, one worker thread that batches them with other streams' and is the only
thread calling the runner, so runners need not be thread-safe).
"""
from __future__ import annotations

import atexit
import functools
import math
import threading
from typing import Iterator

import numpy as np
import torch

from . import audio as A
from . import batcher as B
from . import recipe as R
from .errors import StreamError


class AudioWindows:
    """Samples (float32, at `rate`) in, encoder input windows (K, 1, 80, 16) out, in window order. At `finish` the
    windows left (those reading the zero padding past the end, and the end clamp of RECIPE §2) and N."""

    def __init__(self, rate: int = R.SAMPLE_RATE, record: bool = False):
        self.resampler = A.StreamResampler(rate)
        self.mel_inc = A.IncrementalMel()
        self.mel = torch.zeros(R.N_MELS, 0)          # mel frames from mel_base
        self.mel_base = 0
        self.next_window = 0
        self.samples16: list[np.ndarray] | None = [] if record else None   # the 16 kHz samples, when recorded

    def push(self, x: np.ndarray) -> tuple[int, torch.Tensor]:
        """Samples -> (index of the first new window, the new windows)."""
        return self._windows(self.mel_inc.push(self._record(self.resampler.push(x))))

    def finish(self) -> tuple[int, torch.Tensor, int]:
        """End of audio: (index of the first new window, the remaining windows, N = total windows). AudioError (from
        recipe.num_windows) when the audio was too short for one window."""
        first, mid = self._windows(self.mel_inc.push(self._record(self.resampler.flush())))
        tail, t = self.mel_inc.finish()
        self._append(tail)
        n = R.num_windows(t)
        starts = R.window_starts(t)[self.next_window:]
        self.next_window = n
        return first, torch.cat([mid, self._cut(starts, t)]), n

    def _record(self, y: np.ndarray) -> np.ndarray:
        if self.samples16 is not None:
            self.samples16.append(np.array(y, np.float32))
        return y

    def _append(self, frames: torch.Tensor) -> None:
        if frames.shape[1]:
            self.mel = torch.cat([self.mel, frames], dim=1)

    def _windows(self, new_frames: torch.Tensor) -> tuple[int, torch.Tensor]:
        self._append(new_frames)
        n_mel = self.mel_base + self.mel.shape[1]
        first, starts = self.next_window, []
        while R.window_start(self.next_window) + R.MEL_WINDOW <= n_mel:
            starts.append(R.window_start(self.next_window))
            self.next_window += 1
        return first, self._cut(starts, n_mel)

    def _cut(self, starts: list[int], n_mel: int) -> torch.Tensor:
        if not starts:
            return torch.zeros(0, 1, R.N_MELS, R.MEL_WINDOW)
        idx = torch.tensor(starts)[:, None] - self.mel_base + torch.arange(R.MEL_WINDOW)[None, :]
        out = self.mel[:, idx].permute(1, 0, 2).unsqueeze(1).contiguous()
        keep = max(0, min(R.window_start(self.next_window), n_mel - R.MEL_WINDOW))   # the next window's frames on
        if keep > self.mel_base:
            self.mel = self.mel[:, keep - self.mel_base:]
            self.mel_base = keep
        return out


class ReadyFrames:
    """Encoder features (in window order) in, ready video frames out: [(frame, template, feature window (32, 16, 16))]
    for every frame whose feature rows (RECIPE §3) are all known; at the end (N given) the rest."""

    def __init__(self, template_count: int, start: int = 0):
        self.count, self.start = template_count, start
        self.first_feature = None                    # window 0's feature (padded row 0 repeats it)
        self.feats: list[torch.Tensor] = []          # windows from base
        self.base = 0
        self.known = 0                               # windows received
        self.n_windows: int | None = None            # N, once the audio has ended
        self.next_frame = 0

    def add(self, first: int, feats: torch.Tensor, n_windows: int | None = None
            ) -> list[tuple[int, int, torch.Tensor]]:
        """Windows [first, first + len) (and N at the end) -> the frames that became ready, in order."""
        if first != self.known:
            raise RuntimeError(f"encoder windows out of order: got {first}, expected {self.known}")
        for f in feats:
            if self.known == 0:
                self.first_feature = f
            self.feats.append(f)
            self.known += 1
        if n_windows is not None:
            if self.known != n_windows:
                raise RuntimeError(f"audio ended with {self.known} windows, expected {n_windows}")
            self.n_windows = n_windows
        out = []
        while self._ready(self.next_frame):
            i = self.next_frame
            out.append((i, R.template_of(i, self.count, self.start), self._window(i)))
            self.next_frame += 1
        drop = R.first_window(self.next_frame) - self.base        # windows no later frame reads
        if drop > 0:
            del self.feats[:drop]
            self.base += drop
        return out

    @property
    def frames_total(self) -> int | None:
        """N + 2 once the audio has ended."""
        return None if self.n_windows is None else R.num_video_frames(self.n_windows)

    def _ready(self, i: int) -> bool:
        return self.is_ready(i, self.known, self.n_windows)

    @staticmethod
    def is_ready(i: int, known: int, n_windows: int | None = None) -> bool:
        """Whether frame i is ready once windows [0, known) (and N, at the end) are encoded (RECIPE §3)."""
        if n_windows is not None:
            return i < R.num_video_frames(n_windows)
        return R.last_window(i) < known

    def _window(self, i: int) -> torch.Tensor:
        ks = [R.window_of_row(r, self.n_windows) for r in R.feature_rows(i)]
        rows = [None if k is None else (self.first_feature if k == 0 else self.feats[k - self.base]) for k in ks]
        ref = next(r for r in rows if r is not None)
        return torch.stack([r if r is not None else torch.zeros_like(ref) for r in rows]).reshape(R.FEATURE_SHAPE)


class _OutputCounts:
    """Cumulative 16 kHz output counts of a stream resampler fed whole `chunk`-sample pieces at `rate` (they do not
    depend on the content: fed zeros here), extended on demand; the resampler is kept, so growing the table costs
    only the new chunks."""

    def __init__(self, rate: int, chunk: int):
        self.chunk, self.lock = chunk, threading.Lock()
        self.resampler = A.StreamResampler(rate)
        self.table = np.zeros(0, np.int64)

    def close(self) -> None:
        self.resampler.flush()

    def until(self, samples: int, chunks: int = 0) -> np.ndarray:
        """The table, long enough to reach `samples` outputs and to hold `chunks` entries."""
        with self.lock:
            while not len(self.table) or self.table[-1] < samples or len(self.table) < chunks:
                zeros, total = np.zeros(self.chunk, np.float32), int(self.table[-1]) if len(self.table) else 0
                more = np.empty(max(64, len(self.table)), np.int64)
                for k in range(len(more)):
                    total += len(self.resampler.push(zeros))
                    more[k] = total
                self.table = np.concatenate([self.table, more])
            return self.table


_COUNTS: dict[tuple[int, int], _OutputCounts] = {}
_COUNTS_LOCK = threading.Lock()


def _output_counts(rate: int, chunk: int) -> _OutputCounts:
    with _COUNTS_LOCK:
        if (rate, chunk) not in _COUNTS:
            _COUNTS[rate, chunk] = _OutputCounts(rate, chunk)
        return _COUNTS[rate, chunk]


@atexit.register
def _release_counts() -> None:
    """Release the tables' resamplers before interpreter exit (soxr's bindings report live ones as leaks)."""
    for counts in _COUNTS.values():
        counts.close()


def output_counts(rate: int, chunk: int, pieces: int) -> np.ndarray:
    """Cumulative 16 kHz output counts of a stream resampler after each of the first `pieces` `chunk`-sample pieces
    at `rate` (they do not depend on the content)."""
    return _output_counts(rate, chunk).until(0, pieces)[:pieces]


def ready_chunk(frame: int, rate: int, chunk: int) -> int:
    """For audio pushed in `chunk`-sample pieces at `rate` (numbered from 0): the piece whose arrival makes video
    frame i ready before the end of the stream, the resampler's hold-back included (RECIPE §3)."""
    need = R.samples_needed(frame)
    return int(np.searchsorted(_output_counts(rate, chunk).until(need), need))


@functools.lru_cache(maxsize=16)
def ready_chunk_period(rate: int, chunk: int, search: int = 12000) -> int | None:
    """P with ready_chunk(i + P) = ready_chunk(i) + P for every frame i, when a piece is one video frame long (else
    None; None too if no period shows within `search` pieces). The resampler's hold-back after piece c repeats
    with a period p of its own, and samples_needed(i + WINDOW_CYCLE) = samples_needed(i) + WINDOW_CYCLE pieces'
    worth, so P = lcm(WINDOW_CYCLE, p)."""
    if chunk * R.SAMPLE_RATE != rate * R.SAMPLES_PER_FRAME:
        return None
    counts = _output_counts(rate, chunk).until(0, search)[:search]
    hold = R.SAMPLES_PER_FRAME * np.arange(1, search + 1) - counts
    for p in range(1, search // 4):
        if np.array_equal(hold[p:], hold[:-p]):
            return math.lcm(R.WINDOW_CYCLE, p)
    return None


class Core:
    """The batcher's one client for every live path (`LipSync.stream`, `LipSync.live`, each server stream). Options
    are fixed at construction; `encode(first, windows)` sends encoder windows, `render` ready frames [(frame,
    template, feature window)]; in the batcher's worker, `ready(first, feats, n_windows)` (the stream's own rule)
    turns encoder results into the frames they make ready, which go to the generator, and every `batcher.Result`
    goes to `deliver`. `first` and `frame` are the client's keys, passed back as given: window and frame indices
    for the streams, request ids for `live.Live`. `wants(frame)` says whether a queued frame is still wanted (live
    drops frames returned late or made from interrupted audio); `cancel()` drops all its queued work."""

    def __init__(self, runner, templates, batcher, deliver, ready, mouths: bool = False, feather: int = 0,
                 wants=None):
        self.runner, self.templates, self.batcher = runner, templates, batcher
        self.mouths, self.feather = bool(mouths), int(feather)
        self.deliver, self.ready = deliver, ready
        self.wants = wants or (lambda frame: True)   # a queued frame still wanted? (else dropped before the generator)
        self.cancelled = False

    def encode(self, first: int, windows: torch.Tensor, n_windows: int | None = None,
               t_arrived: float | None = None) -> None:
        self.batcher.encode(self, first, windows, n_windows, t_arrived)

    def render(self, jobs: list[tuple[int, int, torch.Tensor]], t_arrived: float | None = None) -> None:
        if jobs:
            self.batcher.render(self, jobs, t_arrived)

    def cancel(self) -> None:
        self.cancelled = True

    # the batcher's worker
    def on_features(self, first: int, feats: torch.Tensor, n_windows: int | None, t_arrived: float) -> None:
        self.render(self.ready(first, feats, n_windows), t_arrived)

    def on_result(self, result: B.Result) -> None:
        self.deliver(result)


class Stream:
    """One live audio stream of a `LipSync` (see `LipSync.stream`): `push(chunk)` returns every frame that became
    ready, in order, none twice; `close()` returns the rest. Safe to use one stream per thread, many at once."""

    def __init__(self, runner, avatar, templates, batcher, rate: int, mouths: bool = False, as_tensor: bool = False,
                 start_frame: int = 0, feather: int = 0):
        avatar.order(2, start_frame)                 # validates the start frame
        self.avatar, self.mouths, self.as_tensor = avatar, bool(mouths), bool(as_tensor)
        self.audio = AudioWindows(rate)
        self.frames = ReadyFrames(avatar.count, start_frame)
        self.core = Core(runner, templates, batcher, self._deliver, self.frames.add, mouths=mouths, feather=feather)
        self.closed = False                          # no more audio (close() was called)
        self._cond = threading.Condition()
        self._results: dict[int, B.Result] = {}
        self._failed: str | None = None
        self._next = 0                               # frames expected so far (the next one's index)
        self._last = None                            # the last frame returned (policy skip repeats it)
        self._busy = threading.Lock()

    # -- public
    def push(self, chunk: np.ndarray) -> list[tuple]:
        """Add samples (1-D float32 in [-1, 1] or int16, any length); return the frames they made ready."""
        with self._busy:
            if self.closed:
                raise StreamError("push after close: this stream has ended; open a new one with LipSync.stream()")
            x = A.stream_samples(chunk)
            return self._run(*self.audio.push(x))

    def close(self) -> list[tuple]:
        """End of audio: the remaining frames (AudioError when the whole stream was too short for one frame)."""
        with self._busy:
            if self.closed:
                raise StreamError("close after close: this stream has already ended")
            self.closed = True
            return self._run(*self.audio.finish())

    @property
    def frames_total(self) -> int | None:
        """Video frames of the whole stream, once it is closed."""
        return self.frames.frames_total

    @property
    def cancelled(self) -> bool:
        return self.core.cancelled

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.closed = True
        self.core.cancel()

    def __iter__(self) -> Iterator:
        raise TypeError("a Stream is not iterable: iterate over what push() and close() return")

    # -- the batcher's worker (through the core)
    def _deliver(self, result: B.Result) -> None:
        with self._cond:
            if result.kind is B.Kind.FAILED:
                self._failed = result.reason
            else:
                self._results[result.frame] = result
            self._cond.notify_all()

    # -- internals
    def _run(self, first: int, windows: torch.Tensor, n: int | None = None) -> list[tuple]:
        """Windows to the batcher (encoder, then generator, batched with other streams); wait once for the frames
        they make ready (known here from the window count: `ReadyFrames.is_ready`) and return them in order."""
        if not len(windows) and n is None:
            return []                                # no new window: no new frame
        start = self._next
        while ReadyFrames.is_ready(self._next, first + len(windows), n):
            self._next += 1
        ids = range(start, self._next)
        self.core.encode(first, windows, n)
        with self._cond:
            while not all(i in self._results for i in ids):
                if self._failed is not None:
                    raise StreamError(f"stream failed: {self._failed}")
                if not self.core.batcher.alive:
                    raise StreamError("the batcher stopped before this stream's frames were made")
                self._cond.wait(1.0)
            got = [self._results.pop(i) for i in ids]
        out = []
        for r in got:
            if r.kind is B.Kind.ERROR:
                raise StreamError(f"frame {r.frame}: {r.reason}")
            if r.kind is B.Kind.FRAME:
                img = r.image if self.as_tensor else r.image.cpu().numpy()
                item = (r.frame, r.box, img) if self.mouths else (r.frame, img)
            elif r.kind is B.Kind.SKIPPED and self._last is not None:
                item = (r.frame, *self._last[1:])     # the batcher's policy skip: the last frame again
            else:
                continue                             # rejected (or nothing to repeat yet): no frame i
            self._last = item
            out.append(item)
        return out
