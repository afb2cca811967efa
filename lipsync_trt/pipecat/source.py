"""What the Pipecat service's clock steps once per video frame: a live stream (in-process `LipSync.live()`, or
`remote.RemoteLive` over `serve`) behind one small async contract, so the clock does not know which it drives.

A step applies a pending barge-in, pushes the audio that arrived since the last step, then takes the next frame of
the timeline (waiting at most `timeout` s for a speech frame's image), already converted to what Pipecat carries:
RGB bytes and int16 PCM. Doing push and next in one step keeps the service's model of the timeline exact (a push
lands before or after a commit, never racing it).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np


@dataclass
class Step:
    """One frame out of a step: its index on the timeline, RGB bytes (width x height x 3), int16 PCM bytes of its
    samples_per_frame samples, and the core's flags."""

    index: int
    rgb: bytes
    pcm: bytes
    speech: bool
    late: bool


def to_pcm16(audio: np.ndarray) -> bytes:
    """float32 samples in [-1, 1] -> int16 PCM bytes; exact for samples that came in as int16 (k / 32768)."""
    return np.clip(np.rint(np.asarray(audio, np.float64) * 32768.0), -32768, 32767).astype("<i2").tobytes()


def to_rgb(image_bgr: np.ndarray) -> bytes:
    """A (H, W, 3) uint8 BGR frame as RGB bytes, row-major (Pipecat's OutputImageRawFrame format 'RGB')."""
    return np.ascontiguousarray(np.asarray(image_bgr)[..., ::-1]).tobytes()


class LocalSource:
    """`LipSync.live()` in this process; every call into it runs in a worker thread (the event loop never waits
    for the model)."""

    def __init__(self, lipsync, idle: str = "template", **live_options):
        self.lipsync, self.idle, self.live_options = lipsync, idle, live_options
        self.live = None

    async def open(self, rate: int) -> None:
        self.live = await asyncio.to_thread(self.lipsync.live, rate=rate, idle=self.idle, **self.live_options)

    @property
    def rate(self) -> int:
        return self.live.rate

    @property
    def samples_per_frame(self) -> int:
        return self.live.samples_per_frame

    @property
    def lookahead(self) -> int:
        return self.live.lookahead

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.live.size)

    async def step(self, chunks: list[np.ndarray], interrupt: bool, timeout: float | None) -> Step:
        return await asyncio.to_thread(self._step, chunks, interrupt, timeout)

    def _step(self, chunks, interrupt, timeout) -> Step:
        if interrupt:
            self.live.interrupt()
        for c in chunks:
            self.live.push(c)
        f = self.live.next(timeout=timeout)
        return Step(f.index, to_rgb(f.image), to_pcm16(f.audio), bool(f.speech), bool(f.late))

    async def close(self) -> None:
        if self.live is not None:
            await asyncio.to_thread(self.live.close)
