"""One client stream of the wire protocol over the library's streaming core (`lipsync_trt.stream`): numbered
24 kHz chunks (gaps filled with silence, repeats ignored) in, answers out in frame-id order.

  `AudioFront` (event loop): chunk ids -> `stream.AudioWindows` (incremental resampling, mel, encoder windows).
  `WireStream`: the front, a `stream.Core` (the batcher's client, with the `stream.ReadyFrames` rule) and the
            in-order delivery of its answers as protocol messages. (`stream.Stream` is `LipSync.stream`.)
Video frame i is ready once chunk `ready_chunk(i)` has arrived (i + 11 or i + 12: the recipe's need plus the
resampler's hold-back), a rule that repeats every `ready_chunk_period()` frames.
"""
from __future__ import annotations

import numpy as np

from .. import batcher as B
from .. import recipe as R
from .. import stream as core
from .protocol import (CHUNK_SAMPLES, MAX_GAP_CHUNKS, REUSED_FILE, STREAM_RATE, ProtocolError, Status,
                       encode_response, error_response, frame_zip)

def ready_chunk(frame: int) -> int:
    """The chunk id whose arrival makes video frame `frame` ready mid-stream: frame + 11 or frame + 12."""
    return core.ready_chunk(frame, STREAM_RATE, CHUNK_SAMPLES)


def ready_chunk_period() -> int | None:
    """P with ready_chunk(i + P) = ready_chunk(i) + P for every frame (see stream.ready_chunk_period)."""
    return core.ready_chunk_period(STREAM_RATE, CHUNK_SAMPLES)


class AudioFront:
    """Chunks in (ids, gaps, repeats), encoder input windows out. Owned by the event loop."""

    def __init__(self, max_gap: int = MAX_GAP_CHUNKS):
        self.windows = core.AudioWindows(STREAM_RATE)
        self.next_chunk = 0
        self.max_gap = max_gap
        self.ended = False

    @property
    def samples16(self) -> list[np.ndarray] | None:
        """The 16 kHz samples so far, when recording (set to [] to record; tests)."""
        return self.windows.samples16

    @samples16.setter
    def samples16(self, value: list | None) -> None:
        self.windows.samples16 = value

    def push(self, chunk_id: int, audio: np.ndarray):
        """A 960-sample chunk: (first window index, new windows (K, 1, 80, 16)), or None for a repeat (ignored).
        A gap before it is filled with silence; a gap larger than max_gap is a ProtocolError."""
        if chunk_id < self.next_chunk:
            return None
        gap = chunk_id - self.next_chunk
        if gap > self.max_gap:
            raise ProtocolError(Status.MALFORMED, f"frame id {chunk_id} jumps {gap} chunks ahead of "
                                f"{self.next_chunk} (at most {self.max_gap} missing chunks are filled with silence)",
                                chunk_id)
        x = audio if not gap else np.concatenate([np.zeros(gap * CHUNK_SAMPLES, np.float32), audio])
        self.next_chunk = chunk_id + 1
        return self.windows.push(x)

    def finish(self):
        """End of stream: (first window index, the remaining windows, N). AudioError when too short for a frame."""
        self.ended = True
        return self.windows.finish()


FRAME, REUSE, ERROR, END = "frame", "reuse", "error", "end"   # kinds of answers waiting for their turn


class WireStream:
    """One client stream: what the wire needs around the library's `stream.Core` (the batcher's client, with the
    ready-frame rule of `stream.ReadyFrames`, mouths and the blend fixed at construction): chunk ids and gap filling
    (`front`, on the event loop), JPEG + ZIP packing (`packer`, off the loop), answers in frame-id order through
    `emit(stream, message)` on the loop."""

    def __init__(self, model: str, entry, loop, emit, packer, max_gap: int = MAX_GAP_CHUNKS, feather: int = 0):
        self.model, self.entry, self.loop, self._emit, self.packer = model, entry, loop, emit, packer
        self.avatar = entry.avatar
        self.front = AudioFront(max_gap)
        self.frames = core.ReadyFrames(entry.avatar.count)
        self.core = core.Core(entry.runner, entry.templates, packer.batcher, self.on_result, self.frames.add,
                              mouths=True, feather=feather)
        self.done = False            # END delivered (or closed)
        self.next_out = 0
        self.held: dict[int, tuple] = {}
        self.last_mouth: tuple[int, bytes, tuple] | None = None   # (frame id, jpeg, box) last sent
        self.on_done = None          # callback(stream) once END is delivered

    @property
    def closed(self) -> bool:
        """Connection gone (or the stream failed): the batcher drops this stream's work."""
        return self.core.cancelled

    @closed.setter
    def closed(self, value: bool) -> None:
        if value:
            self.core.cancel()

    # event loop
    def push(self, chunk_id: int, audio: np.ndarray) -> None:
        """A chunk (ids, gaps and repeats as `AudioFront` says; ProtocolError for a bad one): its new encoder
        windows go to the batcher."""
        got = self.front.push(chunk_id, audio)
        if got is not None and len(got[1]):
            self.core.encode(*got)

    def finish(self) -> None:
        """End of the stream's audio: the last windows go to the batcher, and END follows the last frame (the answers
        leave in frame-id order). AudioError when the stream was too short for a frame."""
        first, windows, n = self.front.finish()
        self.core.encode(first, windows, n)
        total = R.num_video_frames(n)
        self.post(total, (END, encode_response(Status.END, total), None, None))

    # the batcher's worker (through the core)
    def on_result(self, r: B.Result) -> None:
        if r.kind is B.Kind.FRAME:
            self.packer.pack(self, r.frame, r.image, r.box, r.t_ready)
        elif r.kind is B.Kind.SKIPPED:
            self.post(r.frame, (REUSE, None, None, None))
        elif r.kind is B.Kind.REJECTED:
            self.post(r.frame, (ERROR, error_response(Status.OVERLOADED, r.frame,
                                                      f"server overloaded: {r.reason} (policy reject)"), None, None))
        elif r.kind is B.Kind.ERROR:
            self.post(r.frame, (FRAME, error_response(Status.INTERNAL, r.frame, r.reason[:200]), None, None))
        elif r.kind is B.Kind.FAILED:
            self.closed = True
            self.post(-1, (END, error_response(Status.INTERNAL, 0, r.reason[:200]), None, None))

    # any thread
    def post(self, frame_id: int, item: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.deliver, frame_id, item)
        except RuntimeError:         # loop closed (shutdown)
            pass

    # event loop
    def deliver(self, frame_id: int, item: tuple) -> None:
        if self.done:
            return
        if frame_id < 0:             # the stream failed: say so now and stop
            self.done = True
            self.held.clear()
            self._emit(self, item[1])
            if self.on_done:
                self.on_done(self)
            return
        self.held[frame_id] = item
        while self.next_out in self.held:
            i = self.next_out
            kind, msg, jpeg, box = self.held.pop(i)
            if kind == FRAME and jpeg is not None:
                self.last_mouth = (i, jpeg, box)
            elif kind == REUSE:
                msg = self._reuse(i)
            self.next_out += 1
            self._emit(self, msg)
            if kind == END:
                self.done = True
                self.held.clear()
                if self.on_done:
                    self.on_done(self)
                return

    def _reuse(self, i: int) -> bytes:
        if self.last_mouth is None:
            return error_response(Status.OVERLOADED, i, "server overloaded (policy skip): no earlier mouth to reuse")
        j, jpeg, box = self.last_mouth
        note = f"mouth of frame {j} reused: server overloaded (policy skip)".encode()
        return encode_response(Status.OK, i, frame_zip(jpeg, box, {REUSED_FILE: note}))
