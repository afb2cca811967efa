"""The media side of one WebRTC peer (aiortc and PyAV, imported by serve/webrtc.py only when a peer connects):
its microphone track pushed into a `LipSync.live()` stream (silence gated out, so a quiet caller gets idle frames),
and ONE clock that takes a frame every 40 ms and hands its image to the outgoing video track and its own audio to
the outgoing audio track, both stamped from the frame index, so the receiver plays lips and voice together.
"""
from __future__ import annotations

import asyncio
import fractions
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame, AudioResampler, VideoFrame

from .. import recipe as R
from ..errors import LipsyncError

FPS = int(R.FPS)                               # 25 video frames a second, one per 40 ms slot of the live timeline
VIDEO_CLOCK = 90000                            # RTP video clock (Hz): frame k has pts k * 3600
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK)
VIDEO_QUEUE = 4                                # outgoing video frames waiting for the encoder before the oldest goes
AUDIO_PTIME_MS = 20                            # outgoing audio frames: one Opus packet each (a video frame's audio = 2)
SLIP_S = 0.5                                   # the clock this far behind its schedule restarts it from now


class Gate:
    """Decides which incoming samples are pushed. A microphone never stops sending, but only pushed audio makes
    speech frames, so pieces quieter than `threshold_db` dBFS are not pushed once `hangover` samples of them
    followed the last loud one (pauses inside speech stay, as pushed silence). When it opens again, the last
    `preroll` quiet samples go first: they keep the onset's soft start and give the slots it fills a margin
    against network jitter (live commits a slot short of audio padded with silence)."""

    def __init__(self, rate: int, threshold_db: float, hangover_s: float, preroll_s: float):
        self.threshold = threshold_db
        self.hangover, self.preroll = int(hangover_s * rate), int(preroll_s * rate)
        self.open = False
        self.quiet = 0                              # quiet samples since the last loud piece (gate open)
        self.held: deque = deque()                  # quiet pieces kept for the pre-roll (gate closed)
        self.held_n = 0

    def feed(self, x: np.ndarray) -> np.ndarray | None:
        """One piece (int16 mono) -> the samples to push now (None: nothing)."""
        loud = level_db(x) >= self.threshold
        if self.open:
            self.quiet = 0 if loud else self.quiet + len(x)
            if self.quiet >= self.hangover:
                self.open, self.quiet = False, 0
            return x
        if loud:
            out = np.concatenate([*self.held, x])
            self.held.clear()
            self.open, self.quiet, self.held_n = True, 0, 0
            return out
        self.held.append(x)
        self.held_n += len(x)
        while self.held and self.held_n - len(self.held[0]) >= self.preroll:
            self.held_n -= len(self.held.popleft())
        return None

    def reset(self) -> None:
        """Barge-in: closed, nothing held."""
        self.open, self.quiet, self.held_n = False, 0, 0
        self.held.clear()


def level_db(x: np.ndarray) -> float:
    """RMS level of int16 samples in dBFS (-inf for digital silence)."""
    if not len(x):
        return float("-inf")
    rms = float(np.sqrt(np.mean(np.square(x.astype(np.float64) / 32768.0))))
    return 20.0 * np.log10(rms) if rms > 0 else float("-inf")


class QueueTrack(MediaStreamTrack):
    """An outgoing track fed by the clock: `recv()` (called by aiortc's sender) returns the next frame put. The
    first `recv` starts the clock (the sender runs once DTLS is up). `limit`: the oldest frame is dropped when
    that many wait (video only: audio frames are never dropped, they are the timeline)."""

    def __init__(self, kind: str, started: asyncio.Event, limit: int | None = None):
        super().__init__()
        self.kind = kind
        self.started, self.limit = started, limit
        self.queue: asyncio.Queue = asyncio.Queue()
        self.dropped = 0

    def put(self, frame) -> None:
        if self.limit is not None and self.queue.qsize() >= self.limit:
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(frame)

    def end(self) -> None:
        self.queue.put_nowait(None)

    async def recv(self):
        if self.readyState != "live":
            raise MediaStreamError
        self.started.set()
        frame = await self.queue.get()
        if frame is None:
            self.stop()
            raise MediaStreamError
        return frame


class Media:
    """One peer's live stream and tracks. `pump(track)` pushes the incoming audio; `clock()` runs the 25 fps
    clock; `counts` are what the figures report (frames, speech, idle, late, ...)."""

    def __init__(self, live, size: tuple[int, int] | None, wait_s: float, gate: Gate):
        self.live, self.size, self.wait_s, self.gate = live, size, wait_s, gate
        self.rate = live.rate
        self.started = asyncio.Event()
        self.video = QueueTrack("video", self.started, VIDEO_QUEUE)
        self.audio = QueueTrack("audio", self.started)
        self.counts: Counter = Counter()
        self.behind_s = 0.0                          # how far the last frame went out after its schedule
        self.last_index = -1                         # the last frame taken from the live stream
        self.interrupted_at: int | None = None       # the first frame after the last interrupt (its audio dropped)
        self.lookahead = live.lookahead
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lipsync-webrtc")
        self._resampler = AudioResampler(format="s16", layout="mono", rate=self.rate)
        self._audio_tb = fractions.Fraction(1, self.rate)
        self._packet = self.rate // 1000 * AUDIO_PTIME_MS    # samples per outgoing audio frame

    # -- incoming
    def push_frame(self, frame: AudioFrame) -> None:
        """An incoming audio frame (any rate, layout, format) -> mono s16 at the live rate -> gate -> live."""
        for piece in self._resampler.resample(frame):
            x = piece.to_ndarray().reshape(-1)
            self.counts["received_samples"] += len(x)
            out = self.gate.feed(x)
            if out is not None and len(out):
                self.live.push(out)
                self.counts["pushed_samples"] += len(out)

    async def pump(self, track, idle_s: float) -> str:
        """Push the incoming track until it ends; returns why it stopped. No frame for `idle_s` (0: wait forever)
        means the peer is gone (a browser sends audio packets even in silence)."""
        while True:
            try:
                frame = await (asyncio.wait_for(track.recv(), idle_s) if idle_s else track.recv())
            except MediaStreamError:
                return "the peer's audio track ended"
            except asyncio.TimeoutError:
                return f"no audio from the peer for {idle_s:g} s"
            self.push_frame(frame)

    def interrupt(self) -> None:
        """Barge-in from the peer: the audio not yet played is dropped, the gate closes."""
        self.gate.reset()
        self.live.interrupt()
        self.interrupted_at = self.last_index + 1
        self.counts["interrupts"] += 1

    # -- outgoing
    def _take(self):
        """(Clock thread) the next live frame, and its video and audio frames stamped from its index."""
        f = self.live.next(timeout=self.wait_s)
        self.last_index = f.index
        img = f.image
        if self.size is not None and (img.shape[1], img.shape[0]) != self.size:
            import cv2

            img = cv2.resize(img, self.size, interpolation=cv2.INTER_AREA)
        vf = VideoFrame.from_ndarray(np.ascontiguousarray(img), format="bgr24")
        vf.pts, vf.time_base = f.index * (VIDEO_CLOCK // FPS), VIDEO_TIME_BASE
        pcm = np.clip(np.round(f.audio * 32767.0), -32768, 32767).astype(np.int16)
        afs = []
        for at in range(0, len(pcm), self._packet):   # 20 ms frames: aiortc sends an encoder call's packets
            piece = np.repeat(pcm[at:at + self._packet], 2)[None]   # with one RTP timestamp (a receiver joins
            af = AudioFrame.from_ndarray(piece, format="s16", layout="stereo")   # them); stereo as Opus is sent
            af.sample_rate, af.pts, af.time_base = self.rate, f.index * len(pcm) + at, self._audio_tb
            afs.append(af)                             # (mono would be upmixed 3 dB down)
        return f, vf, afs

    async def clock(self) -> str:
        """Every 40 ms (from the tracks' first recv): one frame to each track. next() blocks, so it runs in this
        peer's own thread; a frame not made within wait_s comes back late-marked (the template) and goes out on
        time. Returns why it stopped."""
        await self.started.wait()
        loop = asyncio.get_running_loop()
        t0, k = loop.time(), 0
        while True:
            try:
                f, vf, afs = await loop.run_in_executor(self._executor, self._take)
            except LipsyncError as exc:             # closed (StreamError) or the model worker failed
                return str(exc)
            self.video.put(vf)
            for af in afs:
                self.audio.put(af)
            c = self.counts
            c["frames"] += 1
            c["speech" if f.speech else "idle"] += 1
            c["late"] += f.late
            k += 1
            self.behind_s = loop.time() - (t0 + k / FPS)
            if self.behind_s > SLIP_S:              # starved of CPU: restart the schedule instead of bursting
                c["clock_slips"] += 1
                t0 = loop.time() - k / FPS
            elif self.behind_s < 0:
                await asyncio.sleep(-self.behind_s)

    def stats(self) -> dict:
        c = self.counts
        return {"frames": c["frames"], "speech": c["speech"], "idle": c["idle"], "late": c["late"],
                "video_dropped": self.video.dropped, "clock_slips": c["clock_slips"],
                "interrupts": c["interrupts"], "interrupted_at": self.interrupted_at,
                "lookahead_ms": self.lookahead * 1000 // FPS,
                "preroll_ms": round(self.gate.preroll * 1000 / self.rate), "wait_ms": round(self.wait_s * 1000),
                "behind_ms": round(self.behind_s * 1000, 1)}

    def close(self) -> None:
        self.live.close()
        self.video.end()
        self.audio.end()
        self._executor.shutdown(wait=False)
