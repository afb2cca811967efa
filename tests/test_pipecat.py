"""The Pipecat video service (issue #23 §2), driven by Pipecat's own test helper (`pipecat.tests.utils.run_test`: a
real pipeline with a source and a sink, no network, no API key) on the demo avatar.

Oracles, none of them the service's or the live core's code:
- audio: the int16 samples the "TTS" sent. The audio out, concatenated, must be the live timeline: silence, then
  the first utterance sample for sample, silence, then a prefix of the second (cut by the barge-in), silence.
- images: a frame whose receptive field (worked out here from the recipe: feature rows i-8..i+7, encoder windows,
  mel frames, STFT windows) holds a played sample equals `LipSync.frames()` on the played audio (the whole-file
  path: one-shot mel, features in one batch, offline compositing), within what float32 reordering allows: at most
  1 level, on under 0.1 % of the face box (tests/test_stream.py's bound). Any other frame is the template JPEG
  itself (decoded here with OpenCV), in the reference's ping-pong order (`bench.reference.frame_order`).
- remote mode: the same service over `serve` (in-process server thread, as tests/test_serve.py starts it) gives the
  in-process images within JPEG q95's loss inside the face box (mean absolute difference at most 2 levels after
  putting the in-process box through the same JPEG, tests/test_serve.py's bound) and exactly outside it.

Checkpoints: the demo's with sharp output logits (output_gain=0.25, as tests/test_stream.py), so that audio on the
wrong frame moves the mouth far beyond the tolerances. The clock runs with late_after=None (wait for every frame:
this CPU makes a mouth slower than real time), so no frame is late and every comparison is exact in kind.
"""
from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pipecat", reason="Pipecat is not installed (pip install -e '.[pipecat]')")
cv2 = pytest.importorskip("cv2")

from pipecat.frames.frames import (  # noqa: E402
    EndFrame,
    ErrorFrame,
    InterruptionFrame,
    OutputImageRawFrame,
    SpeechOutputAudioRawFrame,
    StartFrame,
    TextFrame,
    TTSAudioRawFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor  # noqa: E402
from pipecat.tests.utils import SleepFrame, run_test  # noqa: E402

try:
    from pipecat.pipeline.worker import PipelineParams  # noqa: E402  (Pipecat >= 1.3)
except ImportError:                                      # pragma: no cover
    from pipecat.pipeline.task import PipelineParams  # noqa: E402

from lipsync_trt import api, backends  # noqa: E402
from lipsync_trt import avatar as AV  # noqa: E402
from lipsync_trt.bench import reference  # noqa: E402
from lipsync_trt.demo import demo_checkpoints, make_speech  # noqa: E402
from lipsync_trt.errors import AudioError  # noqa: E402
from lipsync_trt.pipecat import LipSyncVideoService  # noqa: E402
from lipsync_trt.pipecat.source import to_pcm16  # noqa: E402

BACKEND = "onnxruntime" if backends.available()["onnxruntime"].usable else "torch"
MAX_LEVEL = 1               # levels, anywhere (float32 reordering; tests/test_stream.py)
MAX_OFF_SHARE = 0.001       # of the face box's pixels
MAX_JPEG_MEAN = 2.0         # levels, mean over the face box, remote (JPEG q95) vs in-process through the same JPEG
JPEG_QUALITY = 95           # serve's default --jpeg-quality
SLOT16 = 640                # 16 kHz samples per video frame


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return demo_checkpoints(tmp_path_factory.mktemp("pipecat_ckpt"), output_gain=0.25)


@pytest.fixture(scope="module")
def runner(ckpt):
    return backends.load(BACKEND, *ckpt, device="cpu")


@pytest.fixture(scope="module")
def ls(runner, demo):
    with api.LipSync(AV.load(demo["avatar"]), runner, batch_size=4) as ls:
        yield ls


def utterance(seconds: float, rate: int, seed: int) -> np.ndarray:
    """A TTS utterance as int16 PCM, whole 40 ms slots long."""
    n = int(round(seconds * 25)) * (rate // 25)
    return np.rint(make_speech(n / rate + 0.01, rate, seed=seed)[:n] * 32767).astype(np.int16)


def tts_frames(x: np.ndarray, rate: int, ms: int = 20) -> list[TTSAudioRawFrame]:
    step = rate * ms // 1000
    return [TTSAudioRawFrame(audio=x[i:i + step].tobytes(), sample_rate=rate, num_channels=1)
            for i in range(0, len(x), step)]


def run_pipeline(service, frames, rate: int):
    kwargs = {"pipeline_params": PipelineParams(audio_out_sample_rate=rate)}
    if "start_timeout" in inspect.signature(run_test).parameters:
        kwargs["start_timeout"] = 60.0        # the service opens its live stream at StartFrame
    down, up = asyncio.run(run_test(service, frames_to_send=frames, **kwargs))
    return list(down), list(up)


def split(down) -> tuple[list, list, list]:
    """(images, audios, everything in order) of the service's output."""
    images = [f for f in down if isinstance(f, OutputImageRawFrame) and "lipsync" in f.metadata]
    audios = [f for f in down if isinstance(f, SpeechOutputAudioRawFrame) and "lipsync" in f.metadata]
    return images, audios, down


def find(out: np.ndarray, x: np.ndarray, start: int = 0) -> tuple[int, int]:
    """(offset, length) of the longest prefix of x (at least one 40 ms slot) found in out at or after `start`."""
    head = x[:SLOT16]
    for a in np.flatnonzero(out[start:len(out) - len(head) + 1] == head[0]) + start:
        if np.array_equal(out[a:a + len(head)], head):
            n = 0
            m = min(len(x), len(out) - a)
            while n < m and out[a + n] == x[n]:
                n += 1
            return int(a), n
    raise AssertionError("the utterance is not in the audio out")


def field16(i: int) -> tuple[int, int]:
    """16 kHz samples [lo, hi) video frame i's mouth depends on, from the recipe (RECIPE §1-3): feature rows
    i-8..i+7 = encoder windows max(i-9, 0)..i+6; window w = mel frames int(80 w / 25) .. +15; mel frame m = the
    800-sample STFT window centred on 200 m (and the sample before it, for the pre-emphasis)."""
    first, last = max(i - 9, 0), i + 6
    lo = 200 * int(80 * first / 25) - 400 - 1
    hi = 200 * (int(80 * last / 25) + 15) + 400
    return max(lo, 0), hi


def box_of(avatar, t: int) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = (int(v) for v in avatar.boxes[t])
    return x1, y1, x2, y2


def bgr(frame: OutputImageRawFrame, h: int, w: int) -> np.ndarray:
    assert frame.format == "RGB" and tuple(frame.size) == (w, h), (frame.format, frame.size)
    return np.frombuffer(frame.image, np.uint8).reshape(h, w, 3)[..., ::-1]


def template(avatar_root, t: int) -> np.ndarray:
    return cv2.imread(str(Path(avatar_root) / "full_body_img" / f"{t}.jpg"))


def check_close(got: np.ndarray, want: np.ndarray, box, what: str) -> None:
    d = np.abs(got.astype(np.int16) - want.astype(np.int16))
    x1, y1, x2, y2 = box
    off = int((d.max(axis=2) > 0).sum())
    assert d.max() <= MAX_LEVEL and off <= MAX_OFF_SHARE * (x2 - x1) * (y2 - y1), \
        f"{what}: max {d.max()} levels, {off} pixels differ (box {(x2 - x1) * (y2 - y1)} px)"


# ------------------------------------------------------------------------------------------------ tests

def test_module_needs_the_extra_and_says_so():
    """Without Pipecat, importing lipsync_trt.pipecat fails with the extra's name (a fresh interpreter with pipecat
    blocked)."""
    code = "import sys; sys.modules['pipecat'] = None; import lipsync_trt.pipecat"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "ImportError" in r.stderr and "lipsync_trt[pipecat]" in r.stderr, r.stderr[-500:]


def test_rates_not_divisible_by_25_are_refused(ls):
    with pytest.raises(AudioError, match="divisible by 25"):
        LipSyncVideoService(ls, rate=16010)
    # a pipeline at 16,010 Hz: no stream is opened, the error goes upstream, other frames still pass
    service = LipSyncVideoService(ls)
    down, up = run_pipeline(service, [TextFrame("hello")], 16010)
    assert any(isinstance(f, ErrorFrame) and "divisible by 25" in f.error for f in up), up
    assert [type(f) for f in down] == [TextFrame]


async def until(cond, what: str, timeout: float = 120.0) -> None:
    """Wait for cond() on the event loop (polling every 5 ms); an AssertionError after `timeout` s, not a hang."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


class Script(FrameProcessor):
    """Plays a conversation into the service from a task of its own, each step waiting for the service's timeline
    (frames out) instead of the wall clock, so the test means the same on a fast or a loaded machine. The EndFrame
    that run_test sends after its frames waits here until the script is done."""

    def __init__(self, service, steps):
        super().__init__()
        self.service, self.steps, self.task = service, steps, None

    async def process_frame(self, frame, direction):
        await super().process_frame(frame, direction)
        if isinstance(frame, StartFrame):
            await self.push_frame(frame, direction)
            self.task = asyncio.ensure_future(self.play())
            return
        if isinstance(frame, EndFrame) and self.task is not None:
            await self.task
        await self.push_frame(frame, direction)

    async def wait_frames(self, n: int) -> None:
        await until(lambda: self.service.stats["frames"] >= n, f"{n} frames out")

    async def play(self):
        for step in self.steps:
            await step(self)


@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_conversation_in_process(ls, demo):
    """Idle, an utterance, silence, a second utterance cut by a barge-in, idle: audio, images, counts, order."""
    rate = 16000
    u1, u2 = utterance(0.6, rate, seed=1), utterance(0.8, rate, seed=2)
    service = LipSyncVideoService(ls, late_after=None)
    heard = []                        # indices of the frames out that carry a non-zero sample
    service.on_frame = lambda step, t: heard.append(step.index) if step.pcm.count(0) < len(step.pcm) else None
    slots1 = len(u1) // SLOT16

    async def idle_start(sc):
        await sc.wait_frames(5)

    async def first(sc):
        for f in [*tts_frames(u1, rate), TTSStoppedFrame()]:
            await sc.push_frame(f)

    async def silence(sc):            # u1 played out (judged from the frames out), then 30 frames (1.2 s) of silence
        await until(lambda: len(heard) >= slots1 and not sc.service.pending, "the first utterance to play out")
        await sc.wait_frames(heard[-1] + 1 + 30)

    async def second(sc):
        for f in tts_frames(u2, rate):
            await sc.push_frame(f)
        # six frames of u2 heard, then the user barges in
        await until(lambda: len(heard) >= slots1 + 6, "six frames of the second utterance")
        await sc.push_frame(InterruptionFrame())
        await sc.wait_frames(sc.service.stats["frames"] + 20)

    down, _ = run_pipeline(Pipeline([Script(service, [idle_start, first, silence, second]), service]), [], rate)
    images, audios, order = split(down)
    av = ls.avatar
    h, w = av.height, av.width
    n = len(images)

    # counts: one image and one audio frame per timeline frame, indices 0..n-1, image before its audio
    assert n == len(audios) > 0
    assert [f.metadata["lipsync"]["index"] for f in images] == list(range(n))
    assert [f.metadata["lipsync"]["index"] for f in audios] == list(range(n))
    pos = {id(f): i for i, f in enumerate(order)}
    assert all(pos[id(a)] == pos[id(i)] + 1 for i, a in zip(images, audios))
    assert not any(f.metadata["lipsync"]["late"] for f in images)
    assert service.stats["frames"] == n and service.stats["late"] == 0

    # audio: every sample of the timeline once, at the TTS's rate: u1 whole, a prefix of u2, silence elsewhere
    assert all(a.sample_rate == rate and a.num_channels == 1 and len(a.audio) == 2 * SLOT16 for a in audios)
    out = np.frombuffer(b"".join(a.audio for a in audios), np.int16)
    a1, n1 = find(out, u1)
    assert n1 == len(u1), f"only {n1} of {len(u1)} samples of the first utterance came out in one piece"
    a2, n2 = find(out, u2, a1 + n1)
    assert 0 < n2 < len(u2), f"the barge-in did not cut the second utterance ({n2} of {len(u2)} played)"
    assert a1 % SLOT16 == 0 and a2 % SLOT16 == 0 and n2 % SLOT16 == 0   # pushed while idle: from a slot edge
    rest = out.copy()
    rest[a1:a1 + n1] = 0
    rest[a2:a2 + n2] = 0
    assert not rest.any(), "samples out that are neither silence nor the utterances in order"
    assert a2 - (a1 + n1) >= 30 * SLOT16, "less than 1.2 s of silence between the utterances"
    assert n2 >= 6 * SLOT16 and n * SLOT16 >= a2 + n2 + 15 * SLOT16, "no idle frames after the barge-in"

    # the held TTSStoppedFrame comes right after the audio frame that plays u1's last sample
    stop = [i for i, f in enumerate(order) if isinstance(f, TTSStoppedFrame)]
    assert len(stop) == 1
    k_last = (a1 + n1 - 1) // SLOT16
    assert order[stop[0] - 1] is audios[k_last]
    assert any(isinstance(f, InterruptionFrame) for f in order)

    # images: frames returned before the barge-in were made from the timeline as it was then (u2 whole in its place:
    # their lookahead held audio that the barge-in dropped, as tests/test_live.py's eras); the others from the audio
    # played. Speech frames = LipSync.frames() of their timeline; the other frames = the template itself.
    cut = (a2 + n2) // SLOT16                 # the barge-in took effect at this frame: its audio is silence
    total = max(len(out), a2 + len(u2)) + 25 * SLOT16
    played = np.zeros(total, np.float32)
    played[:len(out)] = out.astype(np.float32) / 32768
    before = played.copy()
    before[a2:a2 + len(u2)] = u2.astype(np.float32) / 32768
    eras = [(range(0, cut), before, [(a1, a1 + n1), (a2, a2 + len(u2))]),
            (range(cut, n), played, [(a1, a1 + n1), (a2, a2 + n2)])]
    order_t = reference.frame_order(av.count, n)
    offline, speech = {}, 0
    for frames_, audio, spans in eras:
        flags = {k: any(lo < e and s < hi for s, e in spans) for k in frames_ for lo, hi in [field16(k)]}
        wanted = [k for k in frames_ if flags[k]]
        offline.update(ls.frames(audio, rate=rate, frames=wanted) if wanted else {})
        for k in frames_:
            f = images[k]
            assert f.metadata["lipsync"]["speech"] == flags[k], f"frame {k}: speech flag"
            got = bgr(f, h, w)
            t = order_t[k]
            if flags[k]:
                speech += 1
                check_close(got, offline[k], box_of(av, t), f"speech frame {k} (barge-in at {cut})")
            else:
                assert np.array_equal(got, template(demo["avatar"], t)), f"idle frame {k} is not template {t}"
    assert speech == service.stats["speech"] and n - speech == service.stats["idle"] > 25
    # the comparison can fail: the generated mouths are far from the template
    k = (a1 // SLOT16) + 5
    x1, y1, x2, y2 = box_of(av, order_t[k])
    far = np.abs(offline[k][y1:y2, x1:x2].astype(np.int16) - template(demo["avatar"], order_t[k])[y1:y2, x1:x2])
    assert far.mean() > 5 * MAX_LEVEL


def test_frames_pass_through_in_order(ls):
    """With no audio pending a data frame passes at once; behind pushed audio it waits for that audio to play."""
    rate = 16000
    u = utterance(0.2, rate, seed=3)
    service = LipSyncVideoService(ls, late_after=None)
    down, _ = run_pipeline(service, [TextFrame("before"), *tts_frames(u, rate), TextFrame("after"),
                                     SleepFrame(0.2)], rate)
    images, audios, order = split(down)
    texts = [i for i, f in enumerate(order) if isinstance(f, TextFrame)]
    assert [order[i].text for i in texts] == ["before", "after"]
    out = np.frombuffer(b"".join(a.audio for a in audios), np.int16)
    a, m = find(out, u)
    assert m == len(u)
    assert order[texts[1] - 1] is audios[(a + m - 1) // SLOT16]     # right after u's last sample plays
    assert texts[0] < order.index(audios[a // SLOT16])


# ------------------------------------------------------------------------------------------------ hostile input

def test_bad_frames_are_refused_one_line_and_the_stream_goes_on(ls):
    """Frames that are not whole int16 samples, bad rates or channel counts, over MAX_FRAME_SECONDS: one ErrorFrame
    each (one line), dropped; an upstream TTS frame and foreign frames pass; stereo is mixed to mono; the utterance
    after all of them plays whole, and the stream is closed at the end."""
    from lipsync_trt.pipecat.service import MAX_FRAME_SECONDS

    rate = 16000
    u = utterance(0.2, rate, seed=7)
    stereo = np.stack([u, u], axis=1).reshape(-1)               # both channels the same: the mix is u exactly
    foreign = OutputImageRawFrame(image=b"\0" * 12, size=(2, 2), format="RGB")
    bad = [TTSAudioRawFrame(audio=b"\1\2\3", sample_rate=rate, num_channels=1),       # odd bytes
           TTSAudioRawFrame(audio=u[:4].tobytes(), sample_rate=0, num_channels=1),
           TTSAudioRawFrame(audio=u[:4].tobytes(), sample_rate=rate, num_channels=-1),
           TTSAudioRawFrame(audio=u[:3].tobytes(), sample_rate=rate, num_channels=2),    # not whole stereo frames
           TTSAudioRawFrame(audio=np.ones(25 * (MAX_FRAME_SECONDS + 1), np.int16).tobytes(), sample_rate=25,
                            num_channels=1)]
    service = LipSyncVideoService(ls, late_after=None)
    down, up = run_pipeline(service, [*bad, foreign, TextFrame("x"),
                                      TTSAudioRawFrame(audio=stereo.tobytes(), sample_rate=rate, num_channels=2),
                                      SleepFrame(0.3)], rate)
    errors = [f.error for f in up if isinstance(f, ErrorFrame)]
    assert len(errors) == len(bad), errors
    assert all("TTSAudioRawFrame" in e and "\n" not in e for e in errors), errors
    assert any(f is foreign for f in down) and any(isinstance(f, TextFrame) for f in down)
    images, audios, _ = split(down)
    out = np.frombuffer(b"".join(a.audio for a in audios), np.int16)
    a, m = find(out, u)
    assert m == len(u) and not out[:a].any() and not out[a + m:].any(), "stereo mixed to mono, nothing else played"
    assert len(images) == len(audios) and service._source.live.closed


def test_frames_after_end(ls):
    """Frames queued after an EndFrame make nothing and raise nothing (the stream is closed at the EndFrame); TTS
    audio reaching a closed service passes through as it came (voice, no video) and opens no second stream."""
    rate = 16000
    u = utterance(0.12, rate, seed=11)
    service = LipSyncVideoService(ls)
    tts = TTSAudioRawFrame(audio=u.tobytes(), sample_rate=rate, num_channels=1)
    down, up = run_pipeline(service, [SleepFrame(0.2), EndFrame(), tts, TextFrame("after")], rate)
    images, audios, _ = split(down)
    assert not any(isinstance(f, ErrorFrame) for f in up), up
    assert images and not any(f.metadata["lipsync"]["speech"] for f in images) and service._source.live.closed
    frames, passed = service.stats["frames"], []

    async def after():                # straight into the closed service (a Pipecat pipeline ends at its EndFrame)
        async def keep(frame, direction=None):
            passed.append(frame)
        service.push_frame = keep
        await service.process_frame(tts, FrameDirection.DOWNSTREAM)
        await service.process_frame(TextFrame("later"), FrameDirection.DOWNSTREAM)

    asyncio.run(after())
    assert service.stats["frames"] == frames and passed[0] is tts and passed[1].text == "later"
    assert not any(isinstance(f, (OutputImageRawFrame, ErrorFrame)) for f in passed)


def test_tts_at_another_rate_is_resampled_once(ls):
    """TTS at 16 kHz into a 24 kHz pipeline: the audio out is at 24 kHz and equals soxr's one-shot HQ resampling of
    the utterance (the stream resampler's tail is flushed at TTSStoppedFrame), within 2 LSB; nothing else plays."""
    import soxr

    u = utterance(0.4, 16000, seed=12)
    service = LipSyncVideoService(ls)                  # the default late rule: this test looks at the audio only
    down, up = run_pipeline(service, [SleepFrame(0.1), *tts_frames(u, 16000), TTSStoppedFrame(), SleepFrame(0.2)],
                            24000)
    assert not any(isinstance(f, ErrorFrame) for f in up), up
    images, audios, _ = split(down)
    assert audios and all(a.sample_rate == 24000 and len(a.audio) == 2 * 960 for a in audios)
    out = np.frombuffer(b"".join(a.audio for a in audios), np.int16).astype(np.int32)
    want = np.rint(soxr.resample(u.astype(np.float32) / 32768, 16000, 24000, "HQ") * 32768).astype(np.int32)
    start = int(np.flatnonzero(np.abs(out) > 2)[0])
    start -= int(np.flatnonzero(np.abs(want) > 2)[0])
    got = out[start:start + len(want)]
    assert start % 960 == 0 and len(got) == len(want) == 24000 * 4 // 10
    assert np.abs(got - want).max() <= 2, f"max {np.abs(got - want).max()} LSB from soxr's one-shot resampling"
    assert not out[:start].any() and not out[start + len(want):].any()


def test_cancel_frame_closes_the_stream_at_once(ls):
    """A CancelFrame in the middle of an utterance: the stream is closed without playing the rest."""
    from pipecat.frames.frames import CancelFrame

    rate = 16000
    u = utterance(2.0, rate, seed=13)
    service = LipSyncVideoService(ls)
    down, _ = asyncio.run(run_test(service, frames_to_send=[*tts_frames(u, rate), SleepFrame(0.5), CancelFrame()],
                                   pipeline_params=PipelineParams(audio_out_sample_rate=rate), start_timeout=60.0,
                                   send_end_frame=False))
    images, audios, _ = split(list(down))
    out = np.frombuffer(b"".join(a.audio for a in audios), np.int16)
    assert len(out) < len(u) // 2 and service._source.live.closed


def test_huge_tts_frame_then_barge_in_keeps_the_clock(ls):
    """60 s of TTS in one frame at 24 kHz with the default late rule: the clock keeps 25 fps (speech frames this CPU
    does not make in time go out late, as the template, their audio on time), the audio is the frame's samples in
    order, and a barge-in cuts it."""
    rate = 24000
    slot = rate // 25
    rng = np.random.default_rng(8)
    x = np.clip(rng.normal(0, 3000, 60 * rate), -32768, 32767).astype(np.int16)
    x[0] = x[0] or 1
    service = LipSyncVideoService(ls)
    heard = []
    service.on_frame = lambda step, t: heard.append(t) if step.pcm.count(0) < len(step.pcm) else None

    async def play(sc):
        await sc.push_frame(TTSAudioRawFrame(audio=x.tobytes(), sample_rate=rate, num_channels=1))
        await until(lambda: len(heard) >= 25, "a second of the long frame")
        await sc.push_frame(InterruptionFrame())
        await sc.wait_frames(sc.service.stats["frames"] + 10)

    down, up = run_pipeline(Pipeline([Script(service, [play]), service]), [], rate)
    assert not any(isinstance(f, ErrorFrame) for f in up), up
    images, audios, _ = split(down)
    out = np.frombuffer(b"".join(a.audio for a in audios), np.int16)
    start = int(np.flatnonzero(out)[0])
    played = len(np.flatnonzero(out.reshape(-1, slot).any(axis=1)))
    assert np.array_equal(out[start:start + played * slot], x[:played * slot])
    assert 25 <= played < 60 and not out[start + played * slot:].any(), "the barge-in did not cut the long frame"
    assert len(heard) == played and heard[-1] - heard[0] < 60 * 0.04 * played, "the clock stalled"
    assert service.stats["late"] + service.stats["speech"] >= played   # late speech frames count in both


@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_two_services_share_one_lipsync_from_two_tasks(ls):
    """Two pipelines (two services, one LipSync and its batcher) run at once on one event loop: each plays its own
    utterance whole, sample for sample, on its own timeline; neither sees the other's audio."""
    rate = 16000
    us = [utterance(0.2, rate, seed=9), utterance(0.24, rate, seed=10)]
    services = [LipSyncVideoService(ls, late_after=None) for _ in us]

    async def both():
        runs = [run_test(s, frames_to_send=[SleepFrame(0.1), *tts_frames(u, rate), SleepFrame(0.3)],
                         pipeline_params=PipelineParams(audio_out_sample_rate=rate), start_timeout=60.0)
                for s, u in zip(services, us)]
        return await asyncio.gather(*runs)

    for (down, up), u, other in zip(asyncio.run(both()), us, reversed(us)):
        images, audios, _ = split(down)
        assert [f.metadata["lipsync"]["index"] for f in images] == list(range(len(images))) and images
        out = np.frombuffer(b"".join(a.audio for a in audios), np.int16)
        a, m = find(out, u)
        assert m == len(u) and not out[:a].any() and not out[a + m:].any()


# ------------------------------------------------------------------------------------------------ remote mode

@pytest.fixture(scope="module")
def server(runner, demo, ckpt):
    pytest.importorskip("aiohttp")
    from lipsync_trt.serve.scheduler import ModelEntry
    from lipsync_trt.serve.server import ServeConfig, ServerThread

    entries = {"demo": ModelEntry("demo", AV.load(demo["avatar"]), runner)}
    cfg = ServeConfig(avatars={"demo": str(demo["avatar"])}, generators={None: str(ckpt[0])},
                      audio_encoder=str(ckpt[1]), backend=BACKEND, device="cpu", host="127.0.0.1", port=0,
                      max_batch=8, max_wait_ms=5, max_queue=10_000, max_delay_ms=0)
    srv = ServerThread(cfg, entries, runner)
    yield srv
    srv.stop()


def as_jpeg(img: np.ndarray) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    assert ok
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)


@pytest.mark.parametrize("rate", [16000, 24000])
def test_remote_timeline_is_the_cores(ls, rate):
    """The remote source's own model of the timeline (no server: what it sends is not needed here) against
    LipSync.live() itself, frame by frame over a random script of bursts, sub-slot pieces, partial slots and
    barge-ins: the same audio sample for sample and the same speech flags (the core's rule: a pushed sample within
    the frame's receptive field widened by the resampler's reach). next(timeout=0) gives the core's flags without
    waiting for any image."""
    from lipsync_trt.pipecat.remote import RemoteLive

    rng = np.random.default_rng(rate)
    spf = rate // 25
    remote = RemoteLive("ws://unused/", "demo")
    remote._start_timeline(rate)
    script = {}
    for k in sorted(rng.choice(np.arange(2, 150), 10, replace=False)):
        op = rng.choice(["burst", "pieces", "interrupt"], p=[0.45, 0.4, 0.15])
        n = int(rng.integers(1, 15 * spf)) if op == "burst" else int(rng.integers(1, 3 * spf // 2))
        script[int(k)] = (op, np.rint(rng.normal(0, 3000, n)).astype(np.int16))
    with ls.live(rate=rate) as live:
        for k in range(170):
            op, x = script.get(k, (None, None))
            if op == "interrupt":
                live.interrupt()
            elif op is not None:
                live.push(x)
            f = live.next(timeout=0)
            j = remote._advance([x] if op in ("burst", "pieces") else [], op == "interrupt")
            assert f.index == j == k
            assert remote.tl.is_speech(k) == f.speech, f"frame {k}: speech flag ({rate} Hz)"
            assert np.array_equal(to_pcm16(remote._finish(k)), to_pcm16(f.audio)), f"frame {k}: audio"
    assert live.stats["speech"] > 20 and live.stats["idle"] > 20


@pytest.mark.slow
def test_remote_gives_the_in_process_frames(ls, server, demo):
    """One scripted timeline (idle, an utterance, a second one cut by a barge-in) stepped through the in-process
    source and through serve: the same audio sample for sample, the same speech flags, the same images (JPEG)."""
    from lipsync_trt.pipecat.remote import RemoteLive
    from lipsync_trt.pipecat.source import LocalSource

    rate = 24000
    u1, u2 = utterance(0.6, rate, seed=4), utterance(1.2, rate, seed=5)
    script = {4: ("push", u1), 40: ("push", u2), 52: ("interrupt", None)}
    steps = 80

    async def run(source):
        await source.open(rate)
        out = []
        try:
            for k in range(steps):
                op, x = script.get(k, (None, None))
                out.append(await source.step([x] if op == "push" else [], op == "interrupt", None))
        finally:
            await source.close()
        return out

    local = asyncio.run(run(LocalSource(ls)))
    remote_src = RemoteLive(server.ws_url, "demo")
    remote = asyncio.run(run(remote_src))
    av = ls.avatar
    h, w = av.height, av.width
    order_t = reference.frame_order(av.count, steps)
    assert [s.index for s in remote] == list(range(steps))
    assert b"".join(s.pcm for s in remote) == b"".join(s.pcm for s in local)
    assert np.frombuffer(b"".join(s.pcm for s in local), np.int16).any()
    compared = dropped = 0
    for k, (a, b) in enumerate(zip(local, remote)):
        assert a.speech == b.speech, f"frame {k}: speech flag"
        img_a = np.frombuffer(a.rgb, np.uint8).reshape(h, w, 3)[..., ::-1]
        img_b = np.frombuffer(b.rgb, np.uint8).reshape(h, w, 3)[..., ::-1]
        t = order_t[k]
        x1, y1, x2, y2 = box_of(av, t)
        if b.late:                                    # after the barge-in: the server heard dropped audio
            assert k > 52 and a.speech and np.array_equal(img_b, template(demo["avatar"], t))
            dropped += 1
            continue
        outside = np.ones((h, w), bool)
        outside[y1:y2, x1:x2] = False
        assert np.array_equal(img_a[outside], img_b[outside]), f"frame {k}: outside the face box"
        d = np.abs(img_b[y1:y2, x1:x2].astype(np.int16) - as_jpeg(img_a[y1:y2, x1:x2])).mean()
        assert d <= MAX_JPEG_MEAN, f"frame {k}: mean {d:.2f} levels from the in-process mouth through JPEG"
        compared += a.speech
    assert compared >= 30 and dropped == remote_src.stats["dropped"]


@pytest.mark.slow
def test_remote_service_through_pipecat(ls, server, demo):
    """LipSyncVideoService.remote in a Pipecat pipeline: counts, the audio of the timeline, idle templates."""
    rate = 24000
    slot = rate // 25
    u = utterance(0.4, rate, seed=6)
    service = LipSyncVideoService.remote(server.ws_url, "demo", late_after=None)
    down, up = run_pipeline(service, [SleepFrame(0.2), *tts_frames(u, rate), SleepFrame(1.5)], rate)
    assert not any(isinstance(f, ErrorFrame) for f in up), up
    images, audios, _ = split(down)
    n = len(images)
    assert n == len(audios) > 20
    assert [f.metadata["lipsync"]["index"] for f in images] == list(range(n))
    out = np.frombuffer(b"".join(a.audio for a in audios), np.int16)
    start, m = find(out, u)
    assert m == len(u) and start % slot == 0
    assert not out[:start].any() and not out[start + len(u):].any()
    av = ls.avatar
    order_t = reference.frame_order(av.count, n)
    for k, f in enumerate(images):
        if not f.metadata["lipsync"]["speech"]:
            assert np.array_equal(bgr(f, av.height, av.width), template(demo["avatar"], order_t[k])), k
    assert service.stats["speech"] >= len(u) // slot


# ------------------------------------------------------------------------------------------------ the example bot

@pytest.mark.slow
def test_echo_bot_example_serves_video_and_voice(demo, tmp_path):
    """examples/pipecat_echo_bot.py --demo, one command: an aiortc client offers a WAV of speech as its microphone and
    gets back video at the avatar's size and the voice (the speech it sent, above the gate) through the SmallWebRTC
    transport; the bot ends the session when the client leaves and stops on Ctrl-C."""
    import signal
    import socket
    import time

    aiortc = pytest.importorskip("aiortc")
    aiohttp = pytest.importorskip("aiohttp")
    from aiortc.contrib.media import MediaPlayer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    example = Path(__file__).resolve().parents[1] / "examples" / "pipecat_echo_bot.py"
    bot = subprocess.Popen([sys.executable, str(example), "--demo", "--backend", BACKEND, "--host", "127.0.0.1",
                            "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        line = ""
        while "open http" not in line:
            line = bot.stdout.readline()
            assert line or bot.poll() is None, "the bot exited before serving"
            assert time.monotonic() < deadline, "the bot did not start in 240 s"

        async def call():
            pc = aiortc.RTCPeerConnection()
            pc.addTransceiver(MediaPlayer(str(demo["audio"])).audio, direction="sendrecv")
            pc.addTransceiver("video", direction="recvonly")
            pc.createDataChannel("signalling")
            got = {"video": [], "audio": []}

            @pc.on("track")
            def on_track(track):
                async def pump():
                    while True:
                        try:
                            f = await track.recv()
                        except Exception:
                            return
                        if track.kind == "video":
                            got["video"].append((f.width, f.height))
                        else:
                            got["audio"].append(int(np.abs(f.to_ndarray()).max()))
                asyncio.ensure_future(pump())

            await pc.setLocalDescription(await pc.createOffer())
            async with aiohttp.ClientSession() as s:
                async with s.post(f"http://127.0.0.1:{port}/api/offer", json={
                        "sdp": pc.localDescription.sdp, "type": pc.localDescription.type}) as r:
                    assert r.status == 200, await r.text()
                    answer = await r.json()
            await pc.setRemoteDescription(aiortc.RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
            await asyncio.sleep(8)
            await pc.close()
            await asyncio.sleep(1)
            return got

        got = asyncio.run(call())
        h, w = AV.load(demo["avatar"]).height, AV.load(demo["avatar"]).width
        assert len(got["video"]) > 50 and set(got["video"]) == {(w, h)}, got["video"][:5]
        assert sum(m > 1000 for m in got["audio"]) > 25, "the speech did not come back"
    finally:
        bot.send_signal(signal.SIGINT)
        try:
            out = bot.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            bot.kill()
            out = bot.communicate()[0]
    assert "session ended" in out, out[-2000:]
