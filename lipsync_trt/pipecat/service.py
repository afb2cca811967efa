"""`LipSyncVideoService`: a Pipecat avatar service over this engine, placed after the TTS and before
`transport.output()`, as Pipecat's hosted avatar services are (Simli, Tavus, HeyGen).

TTS audio goes into a live stream (`LipSync.live()` in-process, or `serve` over the seed WebSocket protocol); a task
of the service's own keeps the 25 fps clock: once per 40 ms it takes the next frame of the stream's timeline and
pushes its image (OutputImageRawFrame, RGB, `sync_with_audio` so the transport shows it when its audio starts) and
its audio (SpeechOutputAudioRawFrame: exactly the frame's samples, every pushed sample once, silence between
utterances). A speech frame not made in time goes out as the template, late-marked, with its audio on time, so a
slow device never puts voice and lips apart. Frames that followed TTS audio in the pipeline (TTSStoppedFrame, text)
are held and pushed after the frame that plays that audio, so the pipeline's order is kept. InterruptionFrame drops
the audio not yet played; EndFrame plays out what was pushed, then closes; CancelFrame closes at once.
"""
from __future__ import annotations

import asyncio
import time
from collections import Counter

import numpy as np
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InterruptionFrame,
    OutputImageRawFrame,
    SpeechOutputAudioRawFrame,
    StartFrame,
    SystemFrame,
    TTSAudioRawFrame,
    TTSStoppedFrame,
)
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.ai_service import AIService
from pipecat.services.settings import ServiceSettings

from ..errors import AudioError, LipsyncError, UsageError
from ..recipe import FPS
from .source import LocalSource, Step

FRAME_S = 1.0 / FPS          # 40 ms: one video frame, one audio slot
MAX_RATE = 384_000           # Hz: the highest TTS rate taken (soxr's and any TTS's range)
MAX_FRAME_SECONDS = 600      # audio in one TTSAudioRawFrame (TTS services send 20 ms .. a few s; the stream keeps
                             # every slot not yet played, about 4 bytes a sample at the stream's rate)


class LipSyncVideoService(AIService):
    """Lip-synced avatar video for a Pipecat pipeline: TTSAudioRawFrame in, paired OutputImageRawFrame +
    SpeechOutputAudioRawFrame out at 25 fps (see the module docstring).

    lipsync: a loaded `lipsync_trt.LipSync` (in-process); see `LipSyncVideoService.remote` for a `serve` box.
    idle: "template" (silent frames are the template itself, no generator call) or "generate".
    rate: the live stream's rate (default: the pipeline's audio_out_sample_rate, which TTS services use); must be
        divisible by 25. TTS audio at another rate is resampled to it (soxr HQ), and the audio out is at this rate.
    late_after: seconds past a frame's due time that the clock waits for a speech frame before sending it late (the
        template, audio on time); None waits as long as the device needs (frames then come slower than real time
        on a slow device; tests and offline rendering use it).
    sync_with_audio: mark images so the output transport shows each with its own audio (Pipecat >= 0.0.107); the
        transport must then have video_out_is_live=False (its default; a "live" transport ignores the mark),
        video_out_framerate=25 and video_out_width/height = the avatar's size.
    """

    def __init__(self, lipsync=None, idle: str = "template", *, rate: int | None = None,
                 late_after: float | None = 0.0, sync_with_audio: bool = True, source=None, **kwargs):
        kwargs.setdefault("settings", ServiceSettings(model=None))   # no model to switch at run time
        super().__init__(**kwargs)
        if (lipsync is None) == (source is None):
            raise UsageError("LipSyncVideoService: give a loaded LipSync (or use LipSyncVideoService.remote)")
        if late_after is not None and not (late_after >= 0 and np.isfinite(late_after)):
            raise UsageError(f"late_after={late_after!r}: expected seconds >= 0, or None")
        if rate is not None:
            _check_rate(rate, "LipSyncVideoService(rate=...)")
        self._source = source if source is not None else LocalSource(lipsync, idle=idle)
        self._rate_arg = rate
        self._closed = False                     # the stream ran and ended (EndFrame/CancelFrame): never reopened
        self._pipeline_rate: int | None = None
        self._late_after = late_after
        self._sync_with_audio = sync_with_audio
        self.stats: Counter = Counter()          # frames, speech, idle, late (and interrupts)
        self.on_frame = None                     # optional callable(Step, pushed_at): benchmarks, tests
        self._reset_state()

    @classmethod
    def remote(cls, url: str, model: str, *, avatar=None, idle: str = "template", session=None,
               **kwargs) -> "LipSyncVideoService":
        """The same service with the mouths made by `python -m lipsync_trt serve` at `url` (ws://host:port/) for its
        avatar `model`, over the seed WebSocket protocol, composited here onto the template frames (fetched from the
        server, or read from the local avatar folder `avatar`). See remote.RemoteLive for what differs."""
        from .remote import RemoteLive

        return cls(source=RemoteLive(url, model, avatar=avatar, idle=idle, session=session), **kwargs)

    def _reset_state(self) -> None:
        self._inbox: list[tuple] = []            # ("audio", int16 array) | ("frame", frame, direction), in order
        self._held: list[tuple[int, Frame, FrameDirection]] = []   # (release at timeline sample, frame, direction)
        self._interrupt = False
        self._clock: asyncio.Task | None = None
        self._open = False
        self._draining = False
        self._drained = asyncio.Event()
        self._spf = 0
        self._committed = 0                      # slots of the timeline committed (model of the core's)
        self._end = 0                            # timeline samples up to the last committed or pushed one
        self._audio_end = 0                      # timeline position just past the last pushed sample
        self._emitted = 0                        # timeline samples of the frames pushed downstream
        self._resamplers: dict[int, object] = {}

    # -- Pipecat lifecycle
    async def setup(self, setup) -> None:
        await super().setup(setup)
        self._pipeline_rate = getattr(setup, "audio_out_sample_rate", None)   # Pipecat >= 1.8

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        if self._open or self._closed:               # a second StartFrame, or one after the end: one stream only
            return
        rate = self._rate_arg or self._pipeline_rate or frame.audio_out_sample_rate
        try:
            _check_rate(rate, "the pipeline's audio_out_sample_rate")
            await self._source.open(rate)
        except LipsyncError as exc:                  # no video: said once, upstream, as Pipecat services do
            await self.push_error(error_msg=f"{self}: {exc}", exception=exc)
            return
        self._spf = self._source.samples_per_frame
        self._open = True

    async def stop(self, frame: EndFrame) -> None:
        """EndFrame: play out every pushed sample and release the frames held behind it, then close."""
        await super().stop(frame)
        if self._running:
            self._draining = True
            self._check_drained()
            drained = asyncio.ensure_future(self._drained.wait())
            try:
                await asyncio.wait({self._clock, drained}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                drained.cancel()
        await self._shutdown(push_held=True)

    async def cancel(self, frame: CancelFrame) -> None:
        await super().cancel(frame)
        await self._shutdown(push_held=False)

    async def cleanup(self) -> None:
        await super().cleanup()
        await self._shutdown(push_held=False)

    @property
    def pending(self) -> bool:
        """Whether TTS audio received has not all been played out (pushed downstream in its frames) yet."""
        return bool(self._inbox) or self._audio_end > self._emitted

    @property
    def _running(self) -> bool:
        return self._clock is not None and not self._clock.done()

    async def _shutdown(self, push_held: bool) -> None:
        """Stop the clock and close the stream; at an EndFrame the frames still held go out before it (a failed
        stream leaves some), at a CancelFrame or teardown they are dropped as Pipecat drops queued frames."""
        clock, self._clock = self._clock, None
        if clock is not None and not clock.done():
            await self.cancel_task(clock)
        if self._open:
            self._open, self._closed = False, True
            await self._source.close()
        held = [(f, d) for _, f, d in self._held] + [(i[1], i[2]) for i in self._inbox if i[0] == "frame"]
        self._held, self._inbox = [], []
        if push_held:
            for f, d in held:
                await self.push_frame(f, d)

    # -- frames
    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, StartFrame):
            await self.push_frame(frame, direction)
            if self._open and self._clock is None:
                self._clock = self.create_task(self._run_clock(), "lipsync_clock")
        elif isinstance(frame, TTSAudioRawFrame) and direction == FrameDirection.DOWNSTREAM:
            if not self._running:                    # no stream (it failed to open, or has ended): the voice
                await self.push_frame(frame, direction)   # still plays, without video
                return
            try:
                x = self._mono_at_rate(frame)
            except AudioError as exc:                # said upstream; the stream goes on without this frame
                await self.push_error(error_msg=f"{self}: {exc}", exception=exc)
                return
            self._inbox.append(("audio", x))
        elif isinstance(frame, InterruptionFrame):
            self._on_interruption()
            await self.push_frame(frame, direction)
        elif isinstance(frame, (EndFrame, CancelFrame)):
            await self.push_frame(frame, direction)      # stop()/cancel() ran in super().process_frame
        else:
            if isinstance(frame, TTSStoppedFrame) and self._resamplers:
                self._flush_resamplers()
            if isinstance(frame, SystemFrame) or direction == FrameDirection.UPSTREAM or not self._ordered():
                await self.push_frame(frame, direction)
            else:
                self._inbox.append(("frame", frame, direction))

    def _ordered(self) -> bool:
        """Whether a data/control frame arriving now must wait for audio pushed before it to be played."""
        return self._running and bool(self._inbox or self._held or self._audio_end > self._emitted)

    def _on_interruption(self) -> None:
        """Barge-in: the audio not yet pushed and the interruptible frames held are dropped; the core drops what
        it has not played at the next step. Uninterruptible frames still go out, at the next frame."""
        if not self._running:
            return
        keep = [i for i in self._inbox if i[0] == "frame" and not getattr(i[1], "interruptible", True)]
        self._inbox = keep
        self._held = [(0, f, d) for _, f, d in self._held if not getattr(f, "interruptible", True)]
        self._resamplers.clear()
        self._interrupt = True
        self.stats["interrupts"] += 1

    def _mono_at_rate(self, frame: TTSAudioRawFrame) -> np.ndarray:
        """The frame's int16 PCM as mono int16 at the stream's rate (channels averaged, other rates resampled);
        AudioError for a frame that is not whole int16 samples of its channels, a bad rate or channel count, or
        more than MAX_FRAME_SECONDS of audio."""
        rate, channels, audio = frame.sample_rate, frame.num_channels, frame.audio
        if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or not 0 < rate <= MAX_RATE:
            raise AudioError(f"TTSAudioRawFrame: sample_rate {rate!r}: expected 1..{MAX_RATE} Hz (frame dropped)")
        if isinstance(channels, bool) or not isinstance(channels, (int, np.integer)) or not 0 < channels <= 64:
            raise AudioError(f"TTSAudioRawFrame: num_channels {channels!r}: expected 1..64 (frame dropped)")
        if not isinstance(audio, (bytes, bytearray, memoryview)) or len(audio) % (2 * channels):
            raise AudioError(f"TTSAudioRawFrame: {len(audio) if hasattr(audio, '__len__') else type(audio).__name__}"
                             f" bytes are not whole 16-bit samples of {channels} channel(s) (frame dropped)")
        if len(audio) > 2 * channels * rate * MAX_FRAME_SECONDS:
            raise AudioError(f"TTSAudioRawFrame: {len(audio) / (2 * channels * rate):.0f} s of audio in one frame, "
                             f"over {MAX_FRAME_SECONDS} s (frame dropped): send speech in pieces")
        x = np.frombuffer(audio, dtype="<i2")
        if channels > 1:
            x = np.rint(x.reshape(-1, channels).astype(np.float32).mean(axis=1)).astype(np.int16)
        rate = int(rate)
        if rate == self._source.rate:
            return np.array(x, np.int16)
        rs = self._resamplers.get(rate)
        if rs is None:
            import soxr

            rs = self._resamplers[rate] = soxr.ResampleStream(rate, self._source.rate, 1, dtype="float32",
                                                              quality="HQ")
        y = rs.resample_chunk(x.astype(np.float32) / 32768.0)
        return np.clip(np.rint(y * 32768.0), -32768, 32767).astype(np.int16)

    def _flush_resamplers(self) -> None:
        """End of an utterance at another rate: the resampler's held-back tail goes out with it."""
        for rs in self._resamplers.values():
            y = rs.resample_chunk(np.zeros(0, np.float32), last=True)
            if len(y):
                self._inbox.append(("audio", np.clip(np.rint(y * 32768.0), -32768, 32767).astype(np.int16)))
        self._resamplers.clear()

    # -- the clock
    async def _run_clock(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            t0 = loop.time()
            k = 0
            while True:
                chunks, interrupt = self._take_inbox(k)
                due = t0 + k * FRAME_S
                timeout = None if self._late_after is None else max(0.0, due + self._late_after - loop.time())
                step = await self._source.step(chunks, interrupt, timeout)
                if step.index != k:
                    raise RuntimeError(f"live stream returned frame {step.index}, expected {k}")
                now = loop.time()
                if now < due:
                    await asyncio.sleep(due - now)
                elif self._late_after is None and now > due + FRAME_S:
                    t0 += now - due                  # a slow device: the clock follows it instead of bursting
                await self._emit(step)
                self._committed = k + self._source.lookahead + 1
                self._end = max(self._end, self._committed * self._spf)
                k += 1
                await self._release()
                if self._check_drained():
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:                     # the stream failed: say so upstream, stop the video
            await self.push_error(error_msg=f"{self}: lip-sync stream failed: {exc}", exception=exc)
            self._drained.set()

    def _take_inbox(self, k: int) -> tuple[list[np.ndarray], bool]:
        """The audio to push at this step, in order, and the timeline position each held frame waits for."""
        interrupt, self._interrupt = self._interrupt, False
        if interrupt:                                # the core silences every slot not yet returned
            self._end = self._committed * self._spf
            self._audio_end = self._emitted
        chunks = []
        for item in self._inbox:
            if item[0] == "audio":
                if len(item[1]):
                    chunks.append(item[1])
                    self._end += len(item[1])
                    self._audio_end = self._end
            else:
                self._held.append((self._audio_end, item[1], item[2]))
        self._inbox = []
        return chunks, interrupt

    async def _emit(self, step: Step) -> None:
        h, w = self._source.size
        image = OutputImageRawFrame(image=step.rgb, size=(w, h), format="RGB")
        if self._sync_with_audio and hasattr(image, "sync_with_audio"):
            image.sync_with_audio = True
        audio = SpeechOutputAudioRawFrame(audio=step.pcm, sample_rate=self._source.rate, num_channels=1)
        for f in (image, audio):
            f.metadata["lipsync"] = {"index": step.index, "speech": step.speech, "late": step.late}
        await self.push_frame(image)
        await self.push_frame(audio)
        self._emitted += self._spf
        self.stats["frames"] += 1
        self.stats["speech" if step.speech else "idle"] += 1
        self.stats["late"] += step.late
        if self.on_frame is not None:
            self.on_frame(step, time.perf_counter())

    async def _release(self) -> None:
        while self._held and self._held[0][0] <= self._emitted:
            _, frame, direction = self._held.pop(0)
            await self.push_frame(frame, direction)

    def _check_drained(self) -> bool:
        if self._draining and not self._inbox and not self._held and self._audio_end <= self._emitted:
            self._drained.set()
            return True
        return False


def _check_rate(rate, what: str) -> None:
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0 or rate % int(FPS):
        raise AudioError(f"{what}: {rate!r} Hz is not a positive rate divisible by {int(FPS)}; the live stream needs "
                         f"whole samples per 40 ms frame (16000, 24000, 48000 are): set the pipeline's "
                         f"audio_out_sample_rate or LipSyncVideoService(rate=...) to one")
