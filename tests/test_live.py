"""LipSync.live (issue #21): a clocked stream with idle frames, barge-in and the audio of every frame.

Oracles, none of them the live code:
- audio: a plain model of the timeline written here (pushed samples go at the end of what is committed; each
  next() returning frame k commits slot k + L; interrupt() zeroes what was not returned), compared sample-exact;
- speech images: `LipSync.frames()` on the whole timeline's audio (the whole-file path: one-shot mel and encoder,
  generator in batches of 4); tolerances as tests/test_stream.py states them (16 kHz: at most 1 level on under
  0.1 % of the face box; 24 kHz: soxr's stream filter against its one-shot resampling, 0.5 level mean);
- idle images: the template JPEG decoded by OpenCV, exactly; and the receptive field is wide enough: an idle frame of
  `frames()` on the timeline equals the same frame of `frames()` on silence;
- cost: a runner wrapper that counts the generator's frames.
Checkpoints with sharp output logits (as tests/test_stream.py), so audio at the wrong frame moves the mouth far.
"""
from __future__ import annotations

import threading

import cv2
import numpy as np
import pytest
import torch

from lipsync_trt import api, backends
from lipsync_trt import avatar as AV
from lipsync_trt import recipe as R
from lipsync_trt.bench.live import CountingRunner   # the real runner, its generator's frames counted
from lipsync_trt.demo import demo_checkpoints, make_speech
from lipsync_trt.errors import AudioError, StreamError, UsageError

BACKEND = "onnxruntime" if backends.available()["onnxruntime"].usable else "torch"
MAX_LEVEL, MAX_OFF_SHARE, MAX_MEAN_24K = 1, 0.001, 0.5


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    ckpt = demo_checkpoints(tmp_path_factory.mktemp("live_ckpt"), output_gain=0.25)
    return backends.load(BACKEND, *ckpt, device="cpu")


@pytest.fixture(scope="module")
def ls(runner, demo):
    return api.LipSync(AV.load(demo["avatar"]), runner, batch_size=4)


class Timeline:
    """The spec's timeline, modelled independently: what the returned frames' audio must be."""

    def __init__(self, rate: int, lookahead: int):
        self.spf, self.L = rate // 25, lookahead
        self.audio = np.zeros(0, np.float32)
        self.pushed = np.zeros(0, bool)
        self.write = 0          # where the next pushed sample goes
        self.returned = 0       # frames returned
        self.before: list = []  # (frames returned, audio, pushed) at each interrupt: what those frames were made of

    def _grow(self, n: int) -> None:
        if n > len(self.audio):
            self.audio = np.concatenate([self.audio, np.zeros(n - len(self.audio), np.float32)])
            self.pushed = np.concatenate([self.pushed, np.zeros(n - len(self.pushed), bool)])

    def push(self, x: np.ndarray) -> None:
        committed = (self.returned + self.L) * self.spf if self.returned else 0   # slots 0..returned-1+L
        self.write = max(self.write, committed)
        self._grow(self.write + len(x))
        self.audio[self.write:self.write + len(x)] = x
        self.pushed[self.write:self.write + len(x)] = True
        self.write += len(x)

    def next(self) -> None:
        self.returned += 1

    def interrupt(self) -> None:
        self.before.append((self.returned, self.audio.copy(), self.pushed.copy()))
        cut = self.returned * self.spf
        self.audio[cut:] = 0
        self.pushed[cut:] = False
        self.write = min(self.write, cut)

    def played(self, extra_slots: int = 0) -> np.ndarray:
        n = (self.returned + extra_slots) * self.spf
        self._grow(n)
        return self.audio[:n].copy()

    def eras(self, extra_slots: int) -> list[tuple[range, np.ndarray, np.ndarray]]:
        """(frames, audio, pushed): frames returned before an interrupt were made from the timeline as it was
        then (their lookahead held audio the interrupt dropped later); the rest from the final one."""
        n = (self.returned + extra_slots) * self.spf
        self._grow(n)
        out, first = [], 0
        for returned, audio, pushed in self.before + [(self.returned, self.audio, self.pushed)]:
            a, p = np.zeros(n, np.float32), np.zeros(n, bool)
            a[:min(n, len(audio))], p[:min(n, len(pushed))] = audio[:n], pushed[:n]
            out.append((range(first, returned), a, p))
            first = returned
        return out


def run(ls, script, rate: int = 16000, seed: int = 0, **kw):
    """Run a script of ("next", n) / ("push", samples) / ("interrupt",) on a live stream and on the model timeline;
    push pieces of random sizes (1 sample to 1.5 slots). Returns (frames, timeline, live)."""
    rng = np.random.default_rng(seed)
    frames = []
    with ls.live(rate=rate, **kw) as live:
        tl = Timeline(rate, live.lookahead)
        for step in script:
            if step[0] == "next":
                for _ in range(step[1]):
                    f = live.next()
                    assert f.index == tl.returned
                    frames.append(f)
                    tl.next()
            elif step[0] == "push":
                x, pos = step[1], 0
                tl.push(x)
                while pos < len(x):
                    n = int(rng.integers(1, 3 * live.samples_per_frame // 2))
                    live.push(x[pos:pos + n])
                    pos += n
            else:
                live.interrupt()
                tl.interrupt()
    return frames, tl, live


def template_jpeg(ls, i: int) -> np.ndarray:
    """Template of video frame i, decoded by OpenCV from the avatar folder's JPEG."""
    t = R.template_of(i, ls.avatar.count, ls.start_frame)
    img = cv2.imread(str(ls.avatar.frame_path(t)), cv2.IMREAD_COLOR)
    assert img is not None
    return img


def face_box_diff(a: np.ndarray, b: np.ndarray, box) -> tuple[int, float, float]:
    x1, y1, x2, y2 = (int(v) for v in box)
    d = np.abs(a[y1:y2, x1:x2].astype(np.int16) - b[y1:y2, x1:x2].astype(np.int16))
    return int(d.max()), float((d > 0).any(axis=2).mean()), float(d.mean())


def speech_flags_16k(tl: Timeline, n: int) -> list[bool]:
    """Frame i is speech when its receptive field (16 kHz samples) holds a pushed sample."""
    out = []
    for frames, _, pushed in tl.eras(2 * tl.L):
        for i in frames:
            lo, hi = R.receptive_field(i)
            out.append(bool(pushed[lo:hi].any()))
    return out[:n]


def check_frames(ls, frames, tl: Timeline, rate: int = 16000, idle: str = "template") -> dict:
    """Audio sample-exact; speech (and idle="generate") images as frames() on the timeline; idle ones the template."""
    audio = np.concatenate([f.audio for f in frames])
    assert np.array_equal(audio, tl.played()), "the frames' audio is not the timeline"
    assert all(f.audio.dtype == np.float32 and len(f.audio) == rate // 25 for f in frames)
    ref = {}
    for era, era_audio, _ in tl.eras(2 * tl.L):
        want = [f.index for f in frames if f.index in era and (f.speech or idle == "generate")]
        ref.update(ls.frames(era_audio, rate=rate, frames=want) if want else {})
    order = ls.avatar.order(len(frames))
    stats = {"speech": 0, "idle": 0, "worst_level": 0, "worst_mean": 0.0}
    for f in frames:
        assert not f.late and f.image.dtype == np.uint8 and f.image.shape == (ls.avatar.height, ls.avatar.width, 3)
        if f.speech or idle == "generate":
            box = ls.avatar.boxes[order[f.index]]
            x1, y1, x2, y2 = (int(v) for v in box)
            outside = f.image.copy()
            outside[y1:y2, x1:x2] = ref[f.index][y1:y2, x1:x2]
            assert np.array_equal(outside, ref[f.index]), f"frame {f.index}: pixels outside the face box differ"
            level, share, mean = face_box_diff(f.image, ref[f.index], box)
            if rate == 16000:
                assert level <= MAX_LEVEL and share < MAX_OFF_SHARE, (f.index, level, share)
            else:
                assert mean <= MAX_MEAN_24K, (f.index, mean)
            stats["worst_level"] = max(stats["worst_level"], level)
            stats["worst_mean"] = max(stats["worst_mean"], mean)
        else:
            assert np.array_equal(f.image, template_jpeg(ls, f.index)), f"idle frame {f.index} is not its template"
        stats["speech" if f.speech else "idle"] += 1
    return stats


# ------------------------------------------------------------------------------------------------ timeline

def test_lookahead_is_the_recipes_need_plus_the_resamplers_hold_back(ls):
    """L frames: frame k reads 16 kHz samples up to samples_needed(k); with slots 0..k+L in (less the resampler's
    hold-back) that is always there, and L is the least such."""
    for rate in (16000, 22050, 24000, 32000, 44100, 48000, 8000):
        with ls.live(rate=rate) as live:
            hold = live.hold
            L = live.lookahead
        need = max(R.samples_needed(k) - 640 * k for k in range(200))
        assert (L + 1) * 640 - hold >= need > L * 640 - hold, (rate, L, hold)
    assert ls.live(rate=16000).lookahead == 11


@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_conversation_16k_audio_images_and_idle(ls):
    """Idle, an utterance pushed in one burst faster than real time, silence, a second utterance: every sample
    plays once in order, speech frames are frames() of the timeline, idle ones the template, and an idle frame
    of frames() on the timeline equals frames() on silence (the receptive field misses nothing)."""
    a, b = make_speech(0.61, 16000, seed=1), make_speech(0.405, 16000, seed=2)   # ends part-way through a slot
    frames, tl, live = run(ls, [("next", 6), ("push", a), ("next", 55), ("push", b), ("next", 35)])
    stats = check_frames(ls, frames, tl)
    assert [f.speech for f in frames] == speech_flags_16k(tl, len(frames))
    assert stats["speech"] > 40 and stats["idle"] > 25, stats
    # audio pushed while idle plays L frames later: a's first sample is in slot 6 + L
    assert np.flatnonzero(np.concatenate([f.audio for f in frames]))[0] // 640 == 6 + live.lookahead
    played = tl.played(extra_slots=2 * tl.L)
    idle = [f.index for f in frames if not f.speech]
    silent = dict(ls.frames(np.zeros_like(played), rate=16000, frames=idle))
    timeline = dict(ls.frames(played, rate=16000, frames=idle))
    order = ls.avatar.order(len(frames))
    for f in frames:
        if not f.speech:
            level, share, _ = face_box_diff(timeline[f.index], silent[f.index], ls.avatar.boxes[order[f.index]])
            assert level <= MAX_LEVEL and share < MAX_OFF_SHARE, (f.index, level, share)


@pytest.mark.parametrize("rate", [24000, 44100, pytest.param(22050, marks=pytest.mark.slow)])
@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_conversation_at_other_rates_is_close_and_audio_exact(ls, rate):
    """Through the stream resampler: audio sample-exact, images within the stream's tolerance, a barge-in too."""
    a = make_speech(0.7, rate, seed=3)
    frames, tl, _ = run(ls, [("next", 3), ("push", a), ("next", 25), ("interrupt",), ("next", 25)], rate=rate,
                        seed=1)
    stats = check_frames(ls, frames, tl, rate=rate)
    assert stats["speech"] > 15 and stats["idle"] > 2, stats


@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_barge_in_drops_unplayed_audio_and_remakes_frames(ls):
    """2 s pushed at once, 20 frames played (frames after them made ahead), interrupt, silence, a new utterance:
    no returned frame carries a dropped sample; images are frames() of the audio actually played, and return to
    the template once the field clears."""
    a, b = make_speech(2.0, 16000, seed=4), make_speech(0.4, 16000, seed=5)
    frames, tl, live = run(ls, [("next", 2), ("push", a), ("next", 20), ("interrupt",), ("next", 30),
                                ("push", b), ("next", 30)], seed=2)
    check_frames(ls, frames, tl)
    played = np.concatenate([f.audio for f in frames])
    k = 2 + live.lookahead                                    # slot a started in
    assert np.array_equal(played[k * 640:22 * 640], a[:(22 - k) * 640])   # played up to the interruption
    assert not played[22 * 640:(22 + 30) * 640].any()         # then silence until b
    assert [f.speech for f in frames] == speech_flags_16k(tl, len(frames))
    assert not frames[22 + 20].speech                         # back to idle once the field cleared
    assert live.stats["interrupts"] == 1


@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_idle_generate_makes_every_frame(ls):
    a = make_speech(0.4, 16000, seed=6)
    frames, tl, _ = run(ls, [("push", a), ("next", 30)], idle="generate", seed=3)
    check_frames(ls, frames, tl, idle="generate")


# ------------------------------------------------------------------------------------------------ cost

@pytest.mark.parametrize("idle, barge", [("template", False), ("template", True),
                                         pytest.param("generate", False, marks=pytest.mark.slow)])
@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_generator_frames_at_most_speech_frames(runner, ls, idle, barge):
    """Generator frames <= speech frames + batch padding (3 at batch 4), + at most live.AHEAD per interrupt() (the
    frames made ahead from audio it dropped)."""
    from lipsync_trt.live import AHEAD

    counting = CountingRunner(runner)
    lsc = api.LipSync(ls.avatar, counting, batch_size=4)
    try:
        a = make_speech(1.2 if barge else 0.6, 16000, seed=7)
        script = [("next", 20), ("push", a), ("next", 60)]
        if barge:
            script = [("next", 20), ("push", a), ("next", 20), ("interrupt",), ("next", 40)]
        frames, tl, _ = run(lsc, script, idle=idle)
    finally:
        lsc.close()
    speech = sum(f.speech for f in frames)
    if idle == "template":
        assert counting.generated <= speech + 3 + AHEAD * barge, (counting.generated, speech)
        assert speech < len(frames) - 30
    else:
        assert counting.generated >= len(frames)


# ------------------------------------------------------------------------------------------------ late frames

class GatedRunner(CountingRunner):
    """The real runner whose generator waits until the test opens the gate."""

    def __init__(self, runner):
        super().__init__(runner)
        self.gate = threading.Event()

    def generate(self, images, audio):
        self.gate.wait(30)
        return super().generate(images, audio)


def test_late_frames_are_not_made_after_they_were_returned(runner, ls):
    """10 frames returned late while the generator is held; once it runs again, the frames returned late are not
    generated (only the batch already inside the generator is), and push() never waited for the model."""
    gated = GatedRunner(runner)
    lsg = api.LipSync(ls.avatar, gated, batch_size=4)
    a = make_speech(1.0, 16000, seed=11)
    try:
        with lsg.live() as live:
            live.push(a[:8000])
            late = [live.next(timeout=0.01) for _ in range(10)]
            pusher = threading.Thread(target=live.push, args=(a[8000:],))
            pusher.start()
            pusher.join(10)
            assert not pusher.is_alive(), "push() waited for the (held) generator"
            assert all(f.late and f.speech for f in late)
            gated.gate.set()
            rest = [live.next() for _ in range(15)]
            assert not any(f.late for f in rest)
            made = gated.generated
        assert made <= sum(f.speech for f in rest) + 4 + 3, made   # + the batch held in the gate + padding
    finally:
        gated.gate.set()
        lsg.close()


def test_next_with_timeout_returns_a_late_frame_with_its_audio(runner, ls):
    gated = GatedRunner(runner)
    lsg = api.LipSync(ls.avatar, gated, batch_size=4)
    a = make_speech(0.5, 16000, seed=8)
    try:
        with lsg.live() as live:
            live.push(a)
            f = live.next(timeout=0.05)
            assert f.late and f.speech and np.array_equal(f.image, template_jpeg(ls, 0))
            assert np.array_equal(f.audio, a[:640])
            gated.gate.set()
            g = live.next()
            assert g.index == 1 and not g.late and np.array_equal(g.audio, a[640:1280])
            assert live.stats["late"] == 1
    finally:
        gated.gate.set()
        lsg.close()


# ------------------------------------------------------------------------------------------------ errors, threads

@pytest.mark.parametrize("chunk, match", [
    (np.full(100, np.nan, np.float32), "NaN"),
    (np.zeros((10, 2), np.float32), "1-D|mono|shape"),
    (np.zeros(10, np.complex64), "dtype|complex"),
    ([0.0, 0.1], "numpy array"),
])
def test_bad_chunks_raise_and_the_stream_stays_usable(ls, chunk, match):
    with ls.live() as live:
        with pytest.raises(AudioError, match=match):
            live.push(chunk)
        live.push(np.zeros(640, np.float32))
        assert live.next().index == 0


def test_bad_options_and_calls_after_close(ls):
    for rate in (16001, 8018, True, 0, -16000, 16000.0):
        with pytest.raises(AudioError):
            ls.live(rate=rate)
    for kw, match in (({"idle": "black"}, "idle"), ({"start_frame": "1"}, "start_frame"),
                      ({"as_tensor": "yes"}, "as_tensor"), ({"batcher": "x"}, "batcher")):
        with pytest.raises(UsageError, match=match):
            ls.live(**kw)
    live = ls.live()
    for bad in (float("nan"), -1, "1", True, float("inf")):
        with pytest.raises(UsageError, match="timeout"):
            live.next(timeout=bad)
    live.close()
    for call in (lambda: live.push(np.zeros(10, np.float32)), lambda: live.push("abc"), live.next, live.interrupt):
        with pytest.raises(StreamError, match="after close"):
            call()
    with pytest.raises(TypeError, match="next"):
        iter(ls.live())


@pytest.mark.slow
def test_live_streams_from_threads_do_not_mix(ls):
    """Three live streams on one LipSync (one batcher), each driven from its own thread with its own speech: each
    gets its own timeline's frames."""
    audios = [make_speech(0.4 + 0.1 * k, 16000, seed=30 + k) for k in range(3)]
    results: list = [None] * 3
    errors: list = []

    def drive(k: int) -> None:
        try:
            results[k] = run(ls, [("next", 2 + k), ("push", audios[k]), ("next", 35)], seed=k)
        except Exception as exc:   # reported below
            errors.append(exc)

    threads = [threading.Thread(target=drive, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    for frames, tl, _ in results:
        check_frames(ls, frames, tl)


def test_interrupt_from_another_thread_while_next_waits(runner, ls):
    """next() waits for a speech frame (the generator is held); interrupt() from another thread drops all the audio:
    the waiting next() returns frame 0 as idle (its field is silence now) with silent audio, without waiting."""
    gated = GatedRunner(runner)
    lsg = api.LipSync(ls.avatar, gated, batch_size=4)
    try:
        with lsg.live() as live:
            live.push(make_speech(0.5, 16000, seed=9))
            got: list = []
            t = threading.Thread(target=lambda: got.append(live.next()))
            t.start()
            t.join(0.5)
            assert t.is_alive()                                   # waiting for the held generator
            live.interrupt()
            t.join(10)
            assert not t.is_alive() and got, "next() kept waiting after interrupt()"
            f = got[0]
            assert f.index == 0 and not f.speech and not f.late and not f.audio.any()
            assert np.array_equal(f.image, template_jpeg(ls, 0))
    finally:
        gated.gate.set()
        lsg.close()


@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_as_tensor_blend_and_start_frame(ls):
    """as_tensor=True gives uint8 tensors on the backend's device; blend= and start_frame= reach speech frames
    (equal to frames() with the same options) and idle frames (the template of the shifted order)."""
    a = make_speech(0.3, 16000, seed=10)
    start = 2
    other = api.LipSync(ls.avatar, ls.runner, batch_size=4, start_frame=start)
    with ls.live(as_tensor=True, blend="feather:8", start_frame=start) as live:
        live.push(a)
        frames = [live.next() for _ in range(30)]
    audio = np.concatenate([f.audio for f in frames])
    timeline = np.concatenate([audio, np.zeros(2 * live.lookahead * 640, np.float32)])
    want = [f.index for f in frames if f.speech]
    ref = dict(other.frames(timeline, rate=16000, frames=want, blend="feather:8"))
    order = ls.avatar.order(30, start)
    assert want and len(want) < 30
    for f in frames:
        assert f.image.dtype == torch.uint8 and f.image.device == ls.runner.device
        img = f.image.cpu().numpy()
        if f.speech:
            level, share, _ = face_box_diff(img, ref[f.index], ls.avatar.boxes[order[f.index]])
            assert level <= MAX_LEVEL and share < MAX_OFF_SHARE, (f.index, level, share)
        else:
            expect = cv2.imread(str(ls.avatar.frame_path(int(order[f.index]))), cv2.IMREAD_COLOR)
            assert np.array_equal(img, expect), f.index


def test_a_second_consumer_gets_a_clear_error_after_its_timeout(runner, ls):
    gated = GatedRunner(runner)
    lsg = api.LipSync(ls.avatar, gated, batch_size=4)
    try:
        with lsg.live() as live:
            live.push(make_speech(0.5, 16000, seed=12))
            first = threading.Thread(target=live.next)
            first.start()
            first.join(0.3)
            assert first.is_alive()
            with pytest.raises(StreamError, match="one consumer"):
                live.next(timeout=0.2)
            gated.gate.set()
            first.join(30)
    finally:
        gated.gate.set()
        lsg.close()
