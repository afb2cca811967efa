"""Audio stages vs independent oracles: librosa for resampling and the mel (lipsync_trt.bench.reference, the
SyncTalk_2D reference's steps in float64 here), the recipe's own formulas."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from lipsync_trt import audio as A
from lipsync_trt.bench import reference
from lipsync_trt.errors import AudioError

librosa = pytest.importorskip("librosa")


def test_filterbank_matches_librosa():
    ref = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600)
    assert np.abs(A.mel_filterbank_np() - ref).max() < 1e-7


def test_mel_matches_librosa_on_talk_hb(sanders):
    wav = A.load_16k(sanders / "talk_hb.wav")
    ref_wav, _ = librosa.load(sanders / "talk_hb.wav", sr=None, mono=True)
    assert np.array_equal(wav, ref_wav.astype(np.float32))
    ref = reference.melspectrogram(ref_wav.astype(np.float64))
    ours = A.mel(torch.from_numpy(wav)).numpy()
    assert ours.shape == ref.shape == (80, 1 + len(wav) // 200)
    assert np.abs(ours - ref).max() <= 1e-3


def test_mel_matches_librosa_on_22k_stereo(tmp_path):
    rate = 22050
    t = np.arange(int(1.7 * rate)) / rate
    left = 0.4 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 2 * t)
    right = 0.3 * np.sin(2 * np.pi * 330 * t + 1) + 0.02 * np.random.default_rng(0).standard_normal(t.size)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), rate, subtype="PCM_16")
    ours = A.mel(torch.from_numpy(A.load_16k(path))).numpy()
    mono, _ = librosa.load(path, sr=16000, mono=True)          # librosa's default resampler is soxr_hq
    ref = reference.melspectrogram(mono.astype(np.float64))
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-3


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24", "PCM_32", "FLOAT"])
def test_load_bit_depths_agree(tmp_path, subtype):
    rng = np.random.default_rng(1)
    x = (0.5 * rng.uniform(-1, 1, 8000)).astype(np.float32)
    path = tmp_path / f"{subtype}.wav"
    sf.write(path, x, 16000, subtype=subtype)
    got = A.load_16k(path)
    tol = {"PCM_16": 1 / 32768, "PCM_24": 1 / 2**23, "PCM_32": 1 / 2**31, "FLOAT": 0}[subtype]
    assert got.dtype == np.float32 and got.shape == x.shape
    assert np.abs(got - x).max() <= tol + 1e-7


def test_num_windows_float_rounding():
    assert A.num_windows(384) == 116          # RECIPE §2: exact arithmetic would give 117
    assert A.num_windows(16) == 2


@pytest.mark.parametrize("frames", [16, 17, 100, 384, 1000, 3591])
def test_mel_windows_match_reference_loop(frames):
    mel = torch.randn(80, frames)
    ours = A.mel_windows(mel).numpy()
    ref = np.stack(reference.mel_windows(mel.numpy().T))
    assert ours.shape == ref.shape and np.array_equal(ours, ref)


def test_feature_windows_match_reference():
    feats = torch.randn(20, 512)
    padded = A.pad_features(feats)
    assert torch.equal(padded[0], feats[0]) and torch.equal(padded[-1], feats[-1]) and len(padded) == 22
    idx = list(range(len(padded)))
    ours = A.feature_windows(padded, idx).numpy()
    for i in idx:
        assert np.array_equal(ours[i], reference.feature_window(padded.numpy(), i))


def test_samples_needed_matches_recipe():
    # RECIPE §3: frame i reads window i+6 up to mel frame floor(3.2(i+6))+15, mel frame m reads samples up to 200m+399,
    # so it needs samples 0..last_sample: at most 640 i + 7240 of them
    from lipsync_trt import recipe as R

    for i in range(0, 200):
        last_sample = 200 * (int(80 * ((i + 6) / 25)) + 15) + 399
        assert R.samples_needed(i) == last_sample + 1 <= 640 * i + 7240


def test_too_short_audio_is_rejected():
    with pytest.raises(AudioError, match="too short"):
        A.to_16k_mono(np.zeros(2999, np.float32), 16000)
    A.to_16k_mono(np.zeros(3000, np.float32), 16000)


@pytest.mark.parametrize("bad,match", [(np.zeros(0, np.float32), "empty"),
                                       (np.array([0.1] * 4000 + [np.nan], np.float32), "NaN"),
                                       (np.array([0.1] * 4000 + [np.inf], np.float32), "NaN or infinite")])
def test_bad_samples_are_rejected(bad, match):
    with pytest.raises(AudioError, match=match):
        A.to_16k_mono(bad, 16000)


def test_unreadable_file_names_the_file(tmp_path):
    path = tmp_path / "not_audio.wav"
    path.write_bytes(b"RIFF garbage that is not a wave file")
    with pytest.raises(AudioError, match="not_audio.wav"):
        A.load_16k(path)
