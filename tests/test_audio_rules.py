"""One rule for sample rates and sample types at every entry point (#20 §4a, §6): frames, generate, features, stream,
live. A rate is an int number of Hz in audio.MIN_RATE..MAX_RATE (a bool, a float, 1 Hz or 2**53 Hz is an AudioError
at once, never a spin in the resampler or gigabytes of upsampled audio); int16 samples are PCM scaled by 1/32768, so
every entry point gives exactly what the float32 array x / 32768 gives (oracle: the float path on the scaled array,
computed here); other dtypes are refused with a message naming what is accepted; huge float64 samples are refused
without a NumPy overflow warning (warnings are errors here)."""
from __future__ import annotations

import os
import tempfile
import time
import warnings

import cv2
import numpy as np
import pytest

from lipsync_trt import api
from lipsync_trt import audio as A
from lipsync_trt.demo import make_speech
from lipsync_trt.errors import AudioError

NEVER = os.path.join(tempfile.gettempdir(), "lipsync_audio_rules_never_written")   # generate's frames_dir: refused first
BAD_RATES = [2**53, True, 1, 0, -16000, 16000.0, 7999, 384001, "16000"]


@pytest.fixture(scope="module")
def ls(demo):
    return api.load(demo["avatar"], demo["generator"], demo["audio_encoder"], backend="torch", device="cpu",
                    batch_size=4)


@pytest.fixture(scope="module")
def pcm() -> np.ndarray:
    """0.4 s of speech at 16 kHz as full-scale int16 PCM (peaks at +-32767: 'samples exceed +-64' before the rule)."""
    x = make_speech(0.4, 16000, seed=3)
    return np.rint(x / np.abs(x).max() * 32767).astype(np.int16)


def as_float(pcm: np.ndarray) -> np.ndarray:
    return pcm.astype(np.float32) / np.float32(32768)


ENTRY = {
    "features": lambda ls, x, rate: ls.features(x, rate),
    "frames": lambda ls, x, rate: next(iter(ls.frames(x, rate, frames="0"))),
    "generate": lambda ls, x, rate: ls.generate(x, rate=rate, out=None, frames_dir=NEVER),
    "stream": lambda ls, x, rate: ls.stream(rate=rate).push(x),
    "live": lambda ls, x, rate: ls.live(rate=rate).push(x),
}


@pytest.mark.parametrize("entry", list(ENTRY))
@pytest.mark.parametrize("rate", BAD_RATES)
def test_a_bad_rate_is_refused_at_once_at_every_entry_point(ls, entry, rate):
    x = np.zeros(48000, np.float32)
    t = time.perf_counter()
    with pytest.raises(AudioError) as info:
        ENTRY[entry](ls, x, rate)
    assert time.perf_counter() - t < 5
    text = str(info.value)
    assert len(text.splitlines()) == 1 and "sample rate" in text and "8000..384000" in text, text
    assert not os.path.exists(NEVER)


@pytest.mark.parametrize("rate", [8000, 384000, 44100])
def test_the_rates_at_the_bounds_are_accepted(rate):
    assert A.check_rate(rate, "x") == rate and type(A.check_rate(np.int32(rate), "x")) is int
    y = A.to_16k_mono(np.zeros(rate // 2, np.float32), rate)
    assert abs(len(y) - 8000) <= 1


def test_a_wav_file_with_an_absurd_rate_is_refused(tmp_path):
    import soundfile as sf

    path = tmp_path / "one_hz.wav"
    sf.write(path, np.zeros(48000, np.float32), 1000, subtype="FLOAT")   # soundfile refuses to write 1 Hz; patch it
    data = bytearray(path.read_bytes())
    data[24:28] = (1).to_bytes(4, "little")                                 # RIFF fmt: sample rate 1 Hz
    path.write_bytes(bytes(data))
    with pytest.raises(AudioError, match=r"sample rate 1 Hz is outside 8000\.\.384000"):
        A.load_16k(path)


# ------------------------------------------------------------------------------------------------ int16

def test_int16_features_equal_the_float_equivalent(ls, pcm):
    a, b = ls.features(pcm, 16000), ls.features(as_float(pcm), 16000)
    assert np.array_equal(a.samples, b.samples)
    assert np.array_equal(a.mel.numpy(), b.mel.numpy()) and np.array_equal(a.features.numpy(), b.features.numpy())


@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_int16_frames_equal_the_float_equivalent(ls, pcm):
    a = dict(ls.frames(pcm, 16000, frames="0-3"))
    b = dict(ls.frames(as_float(pcm), 16000, frames="0-3"))
    assert a.keys() == b.keys() == {0, 1, 2, 3}
    assert all(np.array_equal(a[i], b[i]) for i in a)


@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_int16_generate_equals_the_float_equivalent(ls, pcm, tmp_path):
    for name, x in (("int16", pcm), ("float", as_float(pcm))):
        ls.generate(x, rate=16000, out=None, frames_dir=tmp_path / name, frames="0-3")
    names = sorted(p.name for p in (tmp_path / "int16").iterdir())
    assert names == [f"{i:06d}.png" for i in range(4)]
    for n in names:
        assert np.array_equal(cv2.imread(str(tmp_path / "int16" / n)), cv2.imread(str(tmp_path / "float" / n)))


@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_int16_stream_equals_the_float_equivalent(ls, pcm):
    def run(x):
        with ls.stream(rate=16000) as s:
            got = s.push(x[:3000]) + s.push(x[3000:]) + s.close()
        return {r[0]: r[1] for r in got}
    a, b = run(pcm), run(as_float(pcm))
    assert len(a) > 5 and a.keys() == b.keys()
    assert all(np.array_equal(a[i], b[i]) for i in a)


@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_int16_live_equals_the_float_equivalent(ls, pcm):
    def run(x):
        with ls.live(rate=16000) as live:
            live.push(x)
            return [live.next() for _ in range(25)]
    a, b = run(pcm), run(as_float(pcm))
    assert any(f.speech for f in a)
    for fa, fb in zip(a, b):
        assert fa.speech == fb.speech and np.array_equal(fa.audio, fb.audio) and np.array_equal(fa.image, fb.image)


@pytest.mark.parametrize("entry", list(ENTRY))
@pytest.mark.parametrize("dtype", [np.int32, np.uint8, np.int64, bool])
def test_other_integer_dtypes_are_refused_naming_what_is_accepted(ls, entry, dtype):
    with pytest.raises(AudioError) as info:
        ENTRY[entry](ls, np.zeros(8000, dtype), 16000)
    text = str(info.value)
    assert f"dtype {np.dtype(dtype)} is not supported" in text and "int16 PCM (scaled by 1/32768)" in text, text


@pytest.mark.parametrize("entry", list(ENTRY))
def test_huge_float64_samples_are_refused_without_an_overflow_warning(ls, entry):
    x = np.zeros(8000, np.float64)
    x[100] = 1e300                       # cast to float32 first, this was inf with "overflow encountered in cast"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AudioError, match=r"exceed \+-64 .*int16 PCM"):
            ENTRY[entry](ls, x, 16000)
