"""`LipSync.live()`: a clocked live stream. Audio is pushed whenever it comes (a TTS burst, a microphone, nothing);
each `next()` returns the next frame of the 25 fps timeline with its own 40 ms of audio, so a player shows lips
and voice together and the avatar never goes dark.

The timeline (`timeline.Timeline`: the slots, the queue of pushed audio, the speech rule) is a row of slots of
rate/25 samples. `next()` returning frame k commits slot k + L (L =
`recipe.live_lookahead`, the recipe's need plus the resampler's hold-back): pushed audio fills the slots after
the committed ones, a slot no audio reached is silence. A frame whose receptive field (`recipe.receptive_field`)
holds pushed audio is a speech frame, generated as `LipSync.frames()` makes it from the whole timeline; any
other frame is idle: the template frame itself, with no generator call (idle="template"). Full slots of pushed
audio are planned ahead of the clock, so their frames are made ahead (up to `AHEAD` frames) while earlier ones
play; `interrupt()` turns every slot not yet returned into silence and makes again what was made from it.

The 16 kHz audio is kept as a buffer (resampled slot by slot), and each encoder window's mel is cut from it on
demand (`audio.mel_span`): nothing incremental has to be rewound at an interruption except the resampler,
which restarts a few slots back. Model calls go through a `batcher.Batcher` (shared with the LipSync's other
streams); this object is its client and decides which frames are ready.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from . import audio as A
from . import batcher as B
from . import recipe as R
from . import stream as core
from .errors import StreamError, UsageError
from .timeline import Timeline, exact_slot, hold_back, lookahead  # noqa: F401 (hold_back, lookahead: public here)

IDLE_MODES = ("template", "generate")
AHEAD = 12                  # frames past the one returned last that may be made ahead from queued audio (480 ms:
                            # slack for the generator; what an interrupt() may throw away)
_AGAIN = object()           # _wait_image: the timeline changed (interrupt) while waiting


@dataclass
class LiveFrame:
    """One frame of the live timeline: `image` BGR uint8 (H, W, 3) (a tensor with as_tensor=True), `audio` its
    rate/25 samples (float32) to play with it, `speech` whether it was generated from pushed audio, `late` whether
    it was not made in time (`next(timeout)` gave up waiting, or the batcher refused it under load: its deadline or
    queue bound); the image is then the template frame and the audio is on time."""

    index: int
    image: np.ndarray | torch.Tensor
    audio: np.ndarray
    speech: bool
    late: bool = False


class Live:
    """A clocked live stream of one `LipSync` (see `LipSync.live`). `push` from any thread, `next` from one,
    `interrupt` from any; a context manager."""

    def __init__(self, runner, avatar, templates, batcher, rate: int = R.SAMPLE_RATE, idle: str = "template",
                 as_tensor: bool = False, start_frame: int = 0, feather: int = 0):
        if idle not in IDLE_MODES:
            raise UsageError(f"idle={idle!r}: expected one of {', '.join(IDLE_MODES)}")
        if not isinstance(as_tensor, bool):
            raise UsageError(f"as_tensor={as_tensor!r}: expected True or False")
        if isinstance(start_frame, bool) or not isinstance(start_frame, (int, np.integer)):
            raise UsageError(f"start_frame={start_frame!r}: expected an int (a template frame index)")
        self.samples_per_frame = exact_slot(rate)   # (AudioError for a bad rate, before anything is made)
        self.rate = int(rate)
        avatar.order(2, start_frame)                 # validates the start frame
        self.avatar, self.templates, self.batcher = avatar, templates, batcher
        self.idle, self.as_tensor, self.start_frame = idle, bool(as_tensor), start_frame
        # the batcher's client (full frames, this stream's blend): encoder results come back to `_on_features`,
        # which decides the frames they make ready; every result to `_on_result`
        self.core = core.Core(runner, templates, batcher, self._on_result, self._on_features, feather=feather,
                              wants=self._wants)
        self.tl = Timeline(self.rate)                # the slots, the queue of pushed audio, the speech rule
        self.hold, self.lookahead, self.reach = self.tl.hold, self.tl.lookahead, self.tl.reach
        self.stats: Counter = Counter()              # frames: speech, idle, late, generated (generator results)
        self._cond = threading.Condition(threading.RLock())
        self._next_lock = threading.Lock()
        self._closed = False
        self._failed: str | None = None
        # the 16 kHz audio of slots [0, fed), from x16_base; a restarted resampler's first `discard` samples dropped
        self._resampler = A.StreamResampler(self.rate)
        self._fed = 0
        self._x16 = torch.zeros(0)
        self._x16_base = 0
        self._discard = 0
        # model work: window -> feature; frames decided [returned, decided); speech frames waiting for windows;
        # request id -> (epoch, "enc" windows | "gen" frame); results by frame
        self._feats: dict[int, torch.Tensor] = {}
        self._asked: set[int] = set()
        self._decided = 0
        self._speech: dict[int, bool] = {}
        self._waiting: set[int] = set()
        self._images: dict[int, object] = {}
        self._epoch = 0
        self._requests: dict[int, tuple] = {}
        self._ids = itertools.count()

    # -- public
    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the frames."""
        return self.avatar.height, self.avatar.width

    def push(self, chunk: np.ndarray) -> None:
        """Append samples (1-D float32/float64 in [-1, 1] or int16 PCM, any length) to the timeline; returns at
        once (the model runs in the batcher). AudioError for bad samples (the stream stays usable); StreamError after
        close. Pushed audio is held until it is played (a 10-minute burst at 48 kHz: 115 MB)."""
        with self._cond:
            self._check_open("push")
        x = A.stream_samples(chunk, "live chunk")
        if not len(x):
            return
        with self._cond:
            self._check_open("push")
            self.tl.push(x)
            if self.tl.queued >= self.samples_per_frame:
                self._schedule()

    def next(self, timeout: float | None = None) -> LiveFrame:
        """The next frame of the timeline (index 0, 1, 2, ...); it commits slot index + L. Blocks until the frame
        is made; with `timeout` (seconds) a speech frame not made by then comes back late-marked, as the template."""
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float, np.floating))
                                    or not (timeout >= 0 and np.isfinite(timeout))):
            raise UsageError(f"timeout={timeout!r}: expected a finite number of seconds >= 0, or None")
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._next_lock.acquire(timeout=-1 if timeout is None else timeout):   # another thread is in next()
            raise StreamError(f"next(timeout={timeout}): another thread's next() held the stream all that time; "
                              "a live stream has one consumer")
        try:
            return self._next(deadline)
        finally:
            self._next_lock.release()

    def _next(self, deadline: float | None) -> LiveFrame:
        with self._cond:
            self._check_open("next")
            k = self.tl.returned
            while True:                              # again when an interrupt() from another thread changed frame k
                self.tl.commit(k + self.lookahead + 1)
                self._schedule()
                if k >= self._decided:
                    raise RuntimeError(f"live: frame {k} undecided after committing slot {k + self.lookahead}")
                speech, epoch = self._speech[k], self._epoch
                image = None
                if speech or self.idle == "generate":
                    image = self._wait_image(k, deadline, epoch)
                    if image is _AGAIN:
                        continue
                late = (speech or self.idle == "generate") and image is None
                break
            if late:                                 # not wanted any more: the batcher drops it if it has not run
                for r in [r for r, req in self._requests.items() if req[1] == "gen" and req[2] == k]:
                    del self._requests[r]
                self._waiting.discard(k)
            if image is None:
                image = self._template(k)
            else:
                image = image if self.as_tensor else image.cpu().numpy()
            audio = self.tl.slots[k].copy()
            self.tl.returned = k + 1
            self._images.pop(k, None)
            self._speech.pop(k, None)
            self.stats["speech" if speech else "idle"] += 1
            self.stats["late"] += late
            self._trim()
            return LiveFrame(k, image, audio, speech, late)

    def interrupt(self) -> None:
        """Barge-in: drop every pushed sample that no returned frame has carried; from the next frame on the audio
        is silence until new audio is pushed, and frames made ahead from the dropped audio are made again."""
        with self._cond:
            self._check_open("interrupt")
            j = self.tl.returned
            self.tl.silence(self.tl.committed)
            self._epoch += 1                         # results of requests made before are ignored
            self._requests.clear()
            self._asked.clear()
            self._images.clear()
            self._waiting.clear()
            self._speech = {i: v for i, v in self._speech.items() if i < j}
            self._decided = j
            cut = self._rewind(j)
            for w in [w for w in self._feats if self._window_end(w) > cut]:
                del self._feats[w]
            self.stats["interrupts"] += 1
            self._cond.notify_all()

    def close(self) -> None:
        """End the stream: its queued model work is dropped; push/next afterwards raise StreamError."""
        with self._cond:
            self._closed = True
            self.core.cancel()
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "Live":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self):
        raise TypeError("a live stream is not iterable: call next() once per video frame (25 per second)")

    # -- what the batcher's worker calls (through the core)
    def _wants(self, request: int) -> bool:
        """Whether a queued generator job is still wanted (not dropped by interrupt(), not returned late)."""
        return request in self._requests

    def _on_features(self, request: int, feats: torch.Tensor, n_windows=None) -> list:
        """Encoder results of request `request` -> the generator jobs of the frames they complete."""
        with self._cond:
            req = self._requests.pop(request, None)
            if req is None or req[0] != self._epoch or self._closed:
                return []
            for w, f in zip(req[2], feats):
                self._feats[w] = f
                self._asked.discard(w)
            return self._ready_jobs()

    def _on_result(self, result: B.Result) -> None:
        with self._cond:
            if result.kind is B.Kind.FAILED:
                self._failed = result.reason
                self._cond.notify_all()
                return
            req = self._requests.pop(result.frame, None)
            if result.kind is B.Kind.FRAME:
                self.stats["generated"] += 1
            if req is None or req[0] != self._epoch or req[2] < self.tl.returned:
                return                               # made from dropped audio, or returned late already
            frame = req[2]
            if result.kind is B.Kind.FRAME:
                self._images[frame] = result.image
            elif result.kind in (B.Kind.REJECTED, B.Kind.SKIPPED):   # the batcher's deadline or queue bound: late
                self._images[frame] = None
            elif result.kind is B.Kind.ERROR:
                self._images[frame] = StreamError(f"frame {frame}: {result.reason}")
            self._cond.notify_all()

    # -- internals (under self._cond)
    def _check_open(self, what: str) -> None:
        if self._closed:
            raise StreamError(f"{what} after close: this live stream has ended; open a new one with LipSync.live()")
        if self._failed is not None:
            raise StreamError(f"live stream failed: {self._failed}")

    def _feed(self, n: int) -> None:
        """Resample planned slots [fed, n) into the 16 kHz buffer."""
        new = []
        while self._fed < min(n, self.tl.planned):
            y = self._resampler.push(self.tl.slots[self._fed])
            self._fed += 1
            if self._discard:
                cut = min(self._discard, len(y))
                y, self._discard = y[cut:], self._discard - cut
            if len(y):
                new.append(torch.from_numpy(np.array(y, np.float32)))
        if new:
            self._x16 = torch.cat([self._x16, *new])

    @property
    def _x16_end(self) -> int:
        return self._x16_base + self._x16.numel()

    def _schedule(self) -> None:
        """Decide every frame whose audio is planned (speech or idle), up to AHEAD frames past the last returned,
        and send the speech frames' missing encoder windows to the batcher."""
        limit = self.tl.returned + AHEAD
        self.tl.take(limit + self.lookahead + 1)
        self._feed(limit + self.lookahead + 1)
        new_windows: list[int] = []
        while self._decided < limit:
            j = self._decided
            span = self.tl.span(j)
            if span.stop > self.tl.planned or R.samples_needed(j) > self._x16_end:
                break
            speech = self.tl.is_speech(j)
            self._speech[j] = speech
            self._decided += 1
            if speech or self.idle == "generate":
                self._waiting.add(j)
                for w in self._windows_of(j):
                    if w not in self._feats and w not in self._asked:
                        self._asked.add(w)
                        new_windows.append(w)
        if new_windows:
            self._encode(sorted(new_windows))
        self.core.render(self._ready_jobs())

    @staticmethod
    def _windows_of(frame: int) -> list[int]:
        return sorted({w for w in (R.window_of_row(r) for r in R.feature_rows(frame)) if w is not None})

    @staticmethod
    def _window_end(w: int) -> int:
        """One past the last 16 kHz sample encoder window w reads."""
        return R.HOP_LENGTH * (R.window_start(w) + R.MEL_WINDOW - 1) + R.WIN_LENGTH // 2

    def _encode(self, windows: list[int]) -> None:
        m0 = R.window_start(windows[0])
        m1 = R.window_start(windows[-1]) + R.MEL_WINDOW
        mel = A.mel_span(self._x16, self._x16_base, m0, m1)
        idx = torch.tensor([R.window_start(w) - m0 for w in windows])[:, None] + torch.arange(R.MEL_WINDOW)[None, :]
        x = mel[:, idx].permute(1, 0, 2).unsqueeze(1).contiguous()
        req = next(self._ids)
        self._requests[req] = (self._epoch, "enc", windows)
        self.core.encode(req, x)

    def _ready_jobs(self) -> list:
        """Generator jobs [(request id, template, feature window)] of the waiting frames whose windows are known."""
        jobs = []
        for j in sorted(self._waiting):
            ws = self._windows_of(j)
            if not all(w in self._feats for w in ws):
                continue
            self._waiting.discard(j)
            rows = [R.window_of_row(r) for r in R.feature_rows(j)]
            ref = self._feats[ws[0]]
            win = torch.stack([torch.zeros_like(ref) if w is None else self._feats[w] for w in rows])
            req = next(self._ids)
            self._requests[req] = (self._epoch, "gen", j)
            jobs.append((req, R.template_of(j, self.avatar.count, self.start_frame), win.reshape(R.FEATURE_SHAPE)))
        return jobs

    def _wait_image(self, k: int, deadline: float | None, epoch: int):
        """Frame k's generated image (a device tensor), None when it did not come by `deadline` (time.monotonic), or
        _AGAIN when an interrupt changed the timeline meanwhile (frame k is decided again)."""
        while k not in self._images:
            if self._epoch != epoch:
                return _AGAIN
            if self._closed:
                raise StreamError("live stream closed while waiting for a frame")
            if self._failed is not None:
                raise StreamError(f"live stream failed: {self._failed}")
            if not self.batcher.alive:
                raise StreamError(f"the model worker stopped before frame {k} was made (LipSync.close(), or the "
                                  "worker failed): open a new live stream")
            wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if wait <= 0:
                return None
            self._cond.wait(wait)
        image = self._images.pop(k)
        if isinstance(image, Exception):
            raise image
        return image

    def _template(self, k: int):
        t = R.template_of(k, self.avatar.count, self.start_frame)
        return self.templates.frame(t).clone() if self.as_tensor else self.avatar.frame(t).copy()

    def _rewind(self, j: int) -> int:
        """After slots from j changed: drop the 16 kHz samples they may reach and restart the resampler so that it
        makes them again from the new slots. Returns the first 16 kHz sample that changed."""
        spf = R.SAMPLES_PER_FRAME
        if self.hold == 0:                           # 16 kHz: the buffer is the slots themselves
            keep_slot, start = j, j
        else:                                        # a few slots back: the filter's reach, then its warm-up
            keep_slot = max(j - self.reach, 0)
            start = max(keep_slot - self.reach - 1, 0)
        cut = min(spf * keep_slot, self._x16_end)    # (the resampler may not have given all of them yet)
        if cut < self._x16_base or cut < spf * start:
            raise RuntimeError(f"live: cannot rewind to slot {j} (16 kHz buffer from {self._x16_base}, cut {cut})")
        self._x16 = self._x16[:cut - self._x16_base]
        if self.hold:                                # a fresh resampler from slot `start`; its output before `cut`
            self._resampler = A.StreamResampler(self.rate)   # (the warm-up) is dropped, the rest continues the buffer
            self._discard = cut - spf * start
        self._fed = start
        return cut

    def _trim(self) -> None:
        """Forget what no later frame, rewind or resampler restart can read."""
        spf = R.SAMPLES_PER_FRAME
        keep_slot = min(self.tl.returned - 3 * self.reach - 2, self.tl.span(self.tl.returned).start)
        self.tl.trim(keep_slot)
        first = R.first_window(self.tl.returned)
        for w in [w for w in self._feats if w < first]:
            del self._feats[w]
        base = min(R.HOP_LENGTH * R.window_start(first) - R.WIN_LENGTH // 2 - 1,
                   spf * (self.tl.returned - self.reach)) - spf
        if base > self._x16_base:
            self._x16 = self._x16[base - self._x16_base:].clone()
            self._x16_base = base
