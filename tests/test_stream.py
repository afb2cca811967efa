"""LipSync.stream (issue #14): audio pushed in pieces gives the frames of the whole-file path.

The oracle is `LipSync.frames` on the same samples: one-shot resampling, whole-file mel, features encoded in one
batch, frames generated in batches of 4 and pasted by the offline pipeline. The stream shares none of that path
but the networks and compose (incremental resampler and mel, encoder windows in other batches, ready-frame rule,
batcher). Checkpoints: the demo's with sharp output logits (as tests/test_serve.py), so that audio sent to the
wrong frame or stream moves the mouth far beyond the tolerances.

Tolerances (float32, any x86 CPU): the two paths sum in other orders (encoder and generator batch compositions,
per-frame against whole-signal STFT), so a generator output may round to the other side of a uint8 step: at most
1 level anywhere, on under 0.1 % of the face box's pixels. A 24 kHz stream goes through soxr's stream filter
instead of its one-shot resampling, which differs in the last bits near chunk edges: within 0.5 level mean.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from lipsync_trt import api, backends
from lipsync_trt import avatar as AV
from lipsync_trt.batcher import Batcher
from lipsync_trt.demo import demo_checkpoints, make_speech
from lipsync_trt.errors import AudioError, AvatarError, LipsyncError, StreamError

BACKEND = "onnxruntime" if backends.available()["onnxruntime"].usable else "torch"
MAX_LEVEL = 1               # levels, anywhere
MAX_OFF_SHARE = 0.001       # of the face box's pixels
MAX_MEAN_24K = 0.5          # levels, mean over the face box, 24 kHz stream vs whole-file resampling


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    ckpt = demo_checkpoints(tmp_path_factory.mktemp("stream_ckpt"), output_gain=0.25)
    return backends.load(BACKEND, *ckpt, device="cpu")


@pytest.fixture(scope="module")
def ls(runner, demo):
    return api.LipSync(AV.load(demo["avatar"]), runner, batch_size=4)


@pytest.fixture(scope="module")
def offline(ls):
    """frames(samples, rate) -> {i: BGR frame} from the whole-file path, cached."""
    cache: dict = {}

    def run(x: np.ndarray, rate: int = 16000, start_frame: int | None = None, blend: str | None = None
            ) -> dict[int, np.ndarray]:
        key = (x.tobytes(), rate, start_frame, blend)
        if key not in cache:
            src = ls if start_frame is None else api.LipSync(ls.avatar, ls.runner, batch_size=4,
                                                             start_frame=start_frame)
            cache[key] = dict(src.frames(x, rate=rate, blend=blend))
        return cache[key]

    return run


def chunked(x: np.ndarray, sizes) -> list[np.ndarray]:
    out, pos = [], 0
    for n in sizes:
        if pos >= len(x):
            break
        out.append(x[pos:pos + n])
        pos += n
    if pos < len(x):
        out.append(x[pos:])
    return out


def stream_all(ls, pieces, **kw) -> tuple[list, list[int]]:
    """Push every piece, then close: (all (i, ...) items in the order returned, frames returned per push)."""
    got, per_push = [], []
    with ls.stream(**kw) as s:
        for p in pieces:
            out = s.push(p)
            per_push.append(len(out))
            got += out
        got += s.close()
    return got, per_push


def face_box_diff(a: np.ndarray, b: np.ndarray, box) -> tuple[int, float, float]:
    """(max level difference, share of the box's pixels that differ, mean difference) inside box."""
    x1, y1, x2, y2 = (int(v) for v in box)
    d = np.abs(a[y1:y2, x1:x2].astype(np.int16) - b[y1:y2, x1:x2].astype(np.int16))
    return int(d.max()), float((d > 0).any(axis=2).mean()), float(d.mean())


def check_equal(got: list, ref: dict, avatar, start: int = 0) -> dict:
    """Every frame once, in order; outside the face box identical, inside it within float rounding."""
    assert [item[0] for item in got] == list(range(len(ref)))
    order = avatar.order(len(ref), start)
    worst_level, worst_share = 0, 0.0
    for i, frame in got:
        box = avatar.boxes[order[i]]
        x1, y1, x2, y2 = (int(v) for v in box)
        outside = frame.copy()
        outside[y1:y2, x1:x2] = ref[i][y1:y2, x1:x2]
        assert np.array_equal(outside, ref[i]), f"frame {i}: pixels outside the face box differ"
        level, share, _ = face_box_diff(frame, ref[i], box)
        assert level <= MAX_LEVEL and share < MAX_OFF_SHARE, (i, level, share)
        worst_level, worst_share = max(worst_level, level), max(worst_share, share)
    return {"max_level": worst_level, "max_share": worst_share}


def speech16(seconds: float, seed: int) -> np.ndarray:
    return make_speech(seconds, 16000, seed=seed)


# ------------------------------------------------------------------------------------------------ equality

@pytest.mark.parametrize("chunking", ["one-sample", "random", "over-1s", "int16", "start-frame", "feather"])
@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_stream_equals_whole_file_frames(ls, offline, chunking):
    x = speech16(1.2, seed=1)
    rng = np.random.default_rng(7)
    kw: dict = {"rate": 16000}
    start = blend = None
    if chunking == "one-sample":
        pieces = chunked(x, [1] * len(x))
    elif chunking == "random":
        pieces = chunked(x, rng.integers(1, 4000, size=len(x)))
    elif chunking == "over-1s":
        pieces = chunked(x, [17_000])                      # > 1 s, then the rest
    elif chunking == "int16":
        pcm = np.round(x * 32767).astype(np.int16)
        x = pcm.astype(np.float32) / 32768                  # what the stream must make of the PCM
        pieces = chunked(pcm, rng.integers(1, 2000, size=len(x)))
    elif chunking == "start-frame":
        start = kw["start_frame"] = 3
        pieces = chunked(x, rng.integers(500, 3000, size=len(x)))
    else:                                                   # the box edge blended as `--blend feather`
        blend = kw["blend"] = "feather"
        pieces = chunked(x, rng.integers(500, 3000, size=len(x)))
    got, _ = stream_all(ls, pieces, **kw)
    print(chunking, check_equal(got, offline(x, start_frame=start, blend=blend), ls.avatar, start or 0))


@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_stream_frames_leave_as_soon_as_their_audio_has_arrived(ls, offline):
    """Frame i comes out of the push that brings 16 kHz sample s(i) = 200 (floor(3.2 (i + 6)) + 15) + 400 (RECIPE
    §3: its last window's last mel frame reads samples up to there), not earlier and not later; the rest at close."""
    x = speech16(1.2, seed=2)
    need = [200 * (int(80 * ((i + 6) / 25)) + 15) + 400 for i in range(len(offline(x)))]
    cuts = sorted({n for n in need if n < len(x)} | {n - 1 for n in need if n <= len(x)})
    pieces = np.split(x, cuts)
    got, per_push = stream_all(ls, pieces, rate=16000)
    check_equal(got, offline(x), ls.avatar)
    arrived = np.cumsum([len(p) for p in pieces])
    expected = [sum(1 for n in need if n <= a) - sum(1 for n in need if n <= a - len(p))
                for a, p in zip(arrived, pieces)]
    assert per_push == expected
    assert len(got) - sum(per_push) == sum(1 for n in need if n > len(x)) > 0    # the end of the audio at close


@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_stream_at_24khz_is_close_to_whole_file(ls, offline):
    x = make_speech(1.2, 24000, seed=3)
    rng = np.random.default_rng(5)
    got, _ = stream_all(ls, chunked(x, rng.integers(1, 6000, size=len(x))), rate=24000)
    ref = offline(x, rate=24000)
    assert [i for i, _ in got] == list(range(len(ref)))
    order = ls.avatar.order(len(ref))
    means = [face_box_diff(f, ref[i], ls.avatar.boxes[order[i]])[2] for i, f in got]
    print(f"24 kHz: face box mean diff max {max(means):.3f}, mean {np.mean(means):.3f} levels")
    assert max(means) <= MAX_MEAN_24K, means


@pytest.mark.parametrize("blend", ["none", "feather:8"])
def test_as_tensor_and_mouths(ls, offline, blend):
    x = speech16(0.5, seed=4)
    ref = offline(x, blend=blend)
    got, _ = stream_all(ls, chunked(x, [3000] * 10), rate=16000, mouths=True, as_tensor=True, blend=blend)
    assert [i for i, *_ in got] == list(range(len(ref)))
    order = ls.avatar.order(len(ref))
    for i, box, crop in got:
        assert isinstance(crop, torch.Tensor) and crop.device == ls.runner.device and crop.dtype == torch.uint8
        assert box == tuple(int(v) for v in ls.avatar.boxes[order[i]])
        x1, y1, x2, y2 = box
        full = ref[i].copy()
        full[y1:y2, x1:x2] = crop.numpy()
        level, share, _ = face_box_diff(full, ref[i], box)
        assert level <= MAX_LEVEL and share < MAX_OFF_SHARE, (i, level, share)


# ------------------------------------------------------------------------------------------------ threads

@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_streams_from_several_threads_do_not_mix_and_share_batches(ls, offline):
    """4 streams with different speech, pushed from 4 threads at once through one batcher: each gets its own
    frames (equal to its own whole-file frames), and the generator ran fewer batches than frames."""
    audios = [speech16(0.5 + 0.08 * k, seed=20 + k) for k in range(4)]
    refs = [offline(a) for a in audios]
    # the streams' audio really differs where it matters: frame 5's face box, stream 0 against each other one
    box = ls.avatar.boxes[ls.avatar.order(6)[5]]
    for k in range(1, 4):
        assert face_box_diff(refs[0][5], refs[k][5], box)[2] > 10 * MAX_MEAN_24K, k
    results: list = [None] * 4
    errors: list = []
    batcher = Batcher(ls.runner, max_batch=4, max_wait=0.05)
    barrier = threading.Barrier(4)

    def run(k: int) -> None:
        try:
            barrier.wait()
            results[k] = stream_all(ls, chunked(audios[k], [1600] * 100), rate=16000, batcher=batcher)[0]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    with batcher:
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
    assert not errors, errors
    for k in range(4):
        check_equal(results[k], refs[k], ls.avatar)
    assert batcher.stats["frames"] == sum(len(r) for r in refs)
    assert batcher.stats["batches"] < batcher.stats["frames"], dict(batcher.stats)


# ------------------------------------------------------------------------------------------------ end, errors

def test_end_of_stream(ls, offline):
    x = speech16(0.5, seed=6)
    s = ls.stream(rate=16000)
    mid = s.push(x)
    rest = s.close()
    assert len(mid) + len(rest) == len(offline(x)) == s.frames_total and len(rest) > 0
    with pytest.raises(StreamError, match="push after close"):
        s.push(x[:10])
    with pytest.raises(StreamError):
        s.close()
    with ls.stream(rate=16000) as short:      # 2,999 samples: not one mel window (RECIPE §2)
        assert short.push(x[:2999]) == []
        with pytest.raises(AudioError, match="too short"):
            short.close()
    with ls.stream(rate=16000) as empty:
        with pytest.raises(AudioError, match="too short"):
            empty.close()


@pytest.mark.parametrize("chunk, match", [
    (np.array([0.1, np.nan, 0.2], np.float32), "NaN"),
    (np.array([0.1, np.inf], np.float32), "NaN or infinite"),
    (np.array([0.5, 1e9], np.float32), "exceed"),
    (np.zeros(10, np.int32), "dtype int32"),
    (np.zeros(10, np.uint8), "dtype uint8"),
    (np.zeros((10, 2), np.float32), "mono 1-D"),
    ([0.0, 0.1], "numpy array"),
])
def test_bad_chunks_raise_a_clear_error(ls, chunk, match):
    with ls.stream(rate=16000) as s:
        s.push(np.zeros(100, np.float32))
        with pytest.raises(AudioError, match=match):
            s.push(chunk)
        assert s.push(np.zeros(100, np.float32)) == []      # the stream is still usable


def test_bad_stream_options(ls):
    with pytest.raises(AudioError, match="sample rate"):
        ls.stream(rate=0)
    with pytest.raises(AudioError, match="sample rate"):
        ls.stream(rate=16000.5)
    with pytest.raises(AvatarError, match="start frame"):
        ls.stream(start_frame=ls.avatar.count)
    assert issubclass(StreamError, LipsyncError)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_generator_inputs_from_crops_equal_prepare(ls, dtype):
    """The batcher derives generator inputs from cached uint8 crops; they must be prepare's, bit for bit (every
    uint8 value occurs in the crops: v / 255 in float32 against prepare's float64 table)."""
    from lipsync_trt import compose

    frames = [torch.from_numpy(ls.avatar.frame(t).copy()) for t in range(ls.avatar.count)]
    frames[0][:16, :16] = torch.arange(256, dtype=torch.uint8).reshape(16, 16, 1)
    boxes = [(0, 0, 64, 64)] + [ls.avatar.boxes[t] for t in range(1, ls.avatar.count)]
    inputs, crops = compose.prepare(frames, boxes, dtype)
    assert len(torch.unique(crops)) == 256
    assert torch.equal(compose.generator_inputs(crops, dtype), inputs)


def test_a_stopped_batcher_is_a_clear_error(ls):
    batcher = Batcher(ls.runner).start()
    batcher.stop()
    with ls.stream(rate=16000, batcher=batcher) as s:
        with pytest.raises(StreamError, match="stopped"):
            s.push(np.zeros(8000, np.float32))


def test_a_generator_failure_is_a_clear_error(ls):
    class Broken:
        """The real runner, whose generator fails."""

        def __init__(self, inner):
            self.inner, self.device, self.dtype = inner, inner.device, inner.dtype

        def encode_audio(self, windows):
            return self.inner.encode_audio(windows)

        def generate(self, images, audio):
            raise RuntimeError("out of device memory")

    broken = api.LipSync(ls.avatar, Broken(ls.runner), batch_size=4)
    with broken.stream(rate=16000) as s:
        with pytest.raises(StreamError, match="generator failed: out of device memory"):
            s.push(speech16(0.6, seed=9))
