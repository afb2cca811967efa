"""Audio stages of the recipe (RECIPE §1-3): load -> 16 kHz mono -> mel -> mel windows -> feature windows.

Every tensor function runs on the device its input is on (the mel runs on the GPU when the audio is there).
"""
from __future__ import annotations

import functools
import os

import numpy as np
import torch

from . import recipe as R
from .errors import AudioError


def load(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Read an audio file as float32 (samples, channels) at its own rate; errors name the file."""
    import soundfile as sf

    from .inputs import MAX_AUDIO_BYTES, check_file

    path = check_file(path, "audio file", AudioError, MAX_AUDIO_BYTES)   # a regular file, bounded: never a FIFO
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:
        raise AudioError(f"{path}: not a readable audio file ({str(exc).strip()[:200]})") from None
    return data, int(rate)


MAX_ABS_SAMPLE = 64.0   # largest |sample| accepted: 36 dB over full scale, far beyond any real (even clipped) audio

# Sample rates accepted at every entry point (files, arrays, streams, live): an int number of Hz. 8 kHz is telephone
# speech, the lowest real speech rate; 384 kHz the highest WAV rate in use (DXD 352.8 kHz fits). Outside them soxr
# either spins for minutes designing a filter (2**53 Hz) or upsamples into gigabytes (1 Hz: 48,000 samples -> 768 M).
MIN_RATE, MAX_RATE = 8_000, 384_000
ACCEPTED = "float32/float64 samples in [-1, 1], or int16 PCM (scaled by 1/32768)"


def check_rate(rate, what: str = "audio") -> int:
    """`rate` as an int when it is an integer number of Hz (not a bool, not a float) in MIN_RATE..MAX_RATE; else
    AudioError naming `what`, the value and the range."""
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)):
        raise AudioError(f"{what}: sample rate {rate!r} is not an integer number of Hz; expected an int in "
                         f"{MIN_RATE}..{MAX_RATE}")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise AudioError(f"{what}: sample rate {rate} Hz is outside {MIN_RATE}..{MAX_RATE} Hz")
    return int(rate)


def check_samples(data: np.ndarray, source: str = "audio") -> None:
    """Reject NaN/infinite samples and finite but absurd ones (|x| > MAX_ABS_SAMPLE, e.g. 3e38, which overflow
    the float32 mel); values a little over full scale, as clipped TTS output has, pass unchanged. Checked on the
    values as given (float64 ones before any cast to float32, which would overflow with a warning)."""
    finite = np.isfinite(data)
    if not finite.all():
        bad = int((~finite).sum())
        raise AudioError(f"{source}: {bad} samples are NaN or infinite; expected {ACCEPTED}")
    peak = float(np.abs(data).max()) if data.size else 0.0
    if peak > MAX_ABS_SAMPLE:
        bad = int((np.abs(data) > MAX_ABS_SAMPLE).sum())
        raise AudioError(f"{source}: {bad} samples exceed +-{MAX_ABS_SAMPLE:g} (peak {peak:.3g}); expected "
                         f"{ACCEPTED}")


def pcm_samples(data, source: str = "audio") -> np.ndarray:
    """Samples as float32 by the one rule of every entry point (frames, generate, features, stream, live): float32
    or float64 as they are (nominally [-1, 1]; NaN, infinite or absurd ones refused by `check_samples`), int16 PCM
    scaled by 1/32768; any other dtype (int32, uint8, bool, object...) is an AudioError saying what is accepted."""
    if not isinstance(data, np.ndarray):
        try:
            data = np.asarray(data)
        except (ValueError, TypeError) as exc:
            raise AudioError(f"{source}: not an array of samples ({exc}); expected {ACCEPTED}") from None
    if data.dtype == np.int16:
        return data.astype(np.float32) * np.float32(1 / 32768)
    if data.dtype not in (np.float32, np.float64):
        raise AudioError(f"{source}: dtype {data.dtype} is not supported; expected {ACCEPTED}")
    check_samples(data, source)
    return np.asarray(data, dtype=np.float32)


def to_16k_mono(data: np.ndarray, rate: int, source: str = "audio") -> np.ndarray:
    """Average channels to mono and resample to 16 kHz with soxr 'HQ'; reject empty, short or non-finite input."""
    import soxr

    data = pcm_samples(data, source)
    rate = check_rate(rate, source)
    if data.ndim == 2:
        data = data.mean(axis=1, dtype=np.float32)
    elif data.ndim != 1:
        raise AudioError(f"{source}: expected a 1-D (samples) or 2-D (samples, channels) array, got shape {data.shape}")
    if data.size == 0:
        raise AudioError(f"{source}: the audio is empty (0 samples)")
    if rate != R.SAMPLE_RATE:
        data = soxr.resample(data, rate, R.SAMPLE_RATE, quality="HQ").astype(np.float32, copy=False)
    if data.size < R.MIN_SAMPLES:
        raise AudioError(
            f"{source}: too short: {data.size / R.SAMPLE_RATE * 1000:.0f} ms at 16 kHz; at least "
            f"{R.MIN_SAMPLES} samples ({R.MIN_SAMPLES / R.SAMPLE_RATE * 1000:.0f} ms) are needed for one mel window")
    return np.ascontiguousarray(data)


def load_16k(path: str | os.PathLike) -> np.ndarray:
    """A WAV (any rate, mono or stereo, int or float) as 16 kHz mono float32."""
    data, rate = load(path)
    return to_16k_mono(data, rate, source=str(path))


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney mel scale (linear below 1 kHz, log above), as librosa's htk=False."""
    f = np.asarray(f, dtype=np.float64)
    f_sp = 200.0 / 3
    mels = f / f_sp
    min_log_hz, logstep = 1000.0, np.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, mels)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp = 200.0 / 3
    min_log_hz, logstep = 1000.0, np.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filterbank_np() -> np.ndarray:
    """(80, 401) Slaney-scale, Slaney-normalised filterbank: librosa.filters.mel(sr=16000, n_fft=800, 80, 55, 7600)."""
    fft_freqs = np.linspace(0, R.SAMPLE_RATE / 2, 1 + R.N_FFT // 2)
    mel_pts = _mel_to_hz(np.linspace(_hz_to_mel(R.FMIN), _hz_to_mel(R.FMAX), R.N_MELS + 2))
    fdiff = np.diff(mel_pts)
    ramps = mel_pts[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_pts[2:R.N_MELS + 2] - mel_pts[:R.N_MELS]))[:, None]
    return weights.astype(np.float32)


@functools.lru_cache(maxsize=8)
def _filterbank(device: torch.device) -> torch.Tensor:
    return torch.from_numpy(mel_filterbank_np()).to(device)


@functools.lru_cache(maxsize=8)
def _window(device: torch.device) -> torch.Tensor:
    return torch.hann_window(R.WIN_LENGTH, periodic=True, dtype=torch.float32, device=device)


def normalise(mel_amp: torch.Tensor) -> torch.Tensor:
    """Mel amplitudes -> the recipe's levels: clip(8 (20 log10(max(1e-5, m)) - 20 + 100) / 100 - 4, -4, 4) (RECIPE §1).
    The one normalisation of the whole-file `mel` and the incremental `IncrementalMel`."""
    s = 20.0 * torch.log10(torch.clamp(mel_amp, min=R.AMP_FLOOR)) - R.REF_LEVEL_DB
    scale = 2 * R.MAX_ABS_VALUE / -R.MIN_LEVEL_DB
    return torch.clamp(scale * (s - R.MIN_LEVEL_DB) - R.MAX_ABS_VALUE, -R.MAX_ABS_VALUE, R.MAX_ABS_VALUE)


def _mel_levels(y: torch.Tensor, center: bool) -> torch.Tensor:
    """Pre-emphasised samples -> normalised mel (80, T): |STFT| (zero padding when centred), filterbank, levels.
    The filterbank sums run in float64, then round to float32: a float32 GEMM's summation order depends on T, so
    a frame would differ in its last bit between the whole file and a stream; in float64 both round the same."""
    spec = torch.stft(y, n_fft=R.N_FFT, hop_length=R.HOP_LENGTH, win_length=R.WIN_LENGTH, window=_window(y.device),
                      center=center, pad_mode="constant", return_complex=True).abs()
    where = spec.device if spec.device.type != "mps" else torch.device("cpu")   # MPS has no float64
    amp = _filterbank(where).double() @ spec.to(where, torch.float64)
    return normalise(amp.to(spec.device, torch.float32))


def mel(wav: torch.Tensor | np.ndarray) -> torch.Tensor:
    """16 kHz mono samples -> normalised log-mel (80, T), T = 1 + len // 200, on the input's device (RECIPE §1)."""
    x = torch.as_tensor(wav, dtype=torch.float32)
    if x.ndim != 1:
        raise AudioError(f"mel: expected 1-D 16 kHz mono samples, got shape {tuple(x.shape)}")
    return _mel_levels(torch.cat([x[:1], x[1:] - R.PREEMPHASIS * x[:-1]]), center=True)


num_windows = R.num_windows        # re-exported: the recipe's arithmetic lives in recipe.py
window_starts = R.window_starts


def mel_windows(m: torch.Tensor) -> torch.Tensor:
    """(80, T) mel -> (N, 1, 80, 16) encoder inputs, on the mel's device."""
    starts = torch.tensor(window_starts(m.shape[1]), device=m.device)
    idx = starts[:, None] + torch.arange(R.MEL_WINDOW, device=m.device)[None, :]
    return m[:, idx].permute(1, 0, 2).unsqueeze(1).contiguous()


def pad_features(features: torch.Tensor) -> torch.Tensor:
    """(N, 512) encoder outputs -> (N + 2, 512), one row per video frame: row r is window recipe.window_of_row(r, N)
    (the first and the last window repeated once, RECIPE §2)."""
    n = features.shape[0]
    rows = [R.window_of_row(r, n) for r in range(R.num_video_frames(n))]
    return features[torch.as_tensor(rows, dtype=torch.long, device=features.device)]


def feature_windows(padded: torch.Tensor, frames: torch.Tensor | list[int] | range) -> torch.Tensor:
    """Feature windows (len(frames), 32, 16, 16) for the given video frames: the padded features' rows
    recipe.feature_rows(i), zeros for rows outside them (RECIPE §3)."""
    n = padded.shape[0]
    idx = frames.tolist() if isinstance(frames, torch.Tensor) else list(frames)
    rows = torch.as_tensor([list(R.feature_rows(int(i))) for i in idx], dtype=torch.long,
                           device=padded.device).reshape(len(idx), len(R.feature_rows(0)))
    valid = (rows >= 0) & (rows < n)
    out = padded[rows.clamp(0, n - 1)] * valid[..., None].to(padded.dtype)
    return out.reshape(len(idx), *R.FEATURE_SHAPE)


RESAMPLE_QUALITY = "HQ"   # soxr quality of the incremental resampler (what to_16k_mono uses for whole files)


def stream_samples(chunk: np.ndarray, source: str = "stream chunk") -> np.ndarray:
    """A pushed chunk as 1-D float32 by `pcm_samples`' rule (float32/float64 in [-1, 1], or int16 PCM scaled by
    1/32768); AudioError naming what was wrong for any other type, dtype or shape, NaN/infinite or absurd samples."""
    if not isinstance(chunk, np.ndarray):
        raise AudioError(f"{source}: expected a numpy array of samples, got {type(chunk).__name__}")
    if chunk.ndim != 1:
        raise AudioError(f"{source}: expected mono 1-D samples, got shape {chunk.shape}")
    return np.ascontiguousarray(pcm_samples(chunk, source))


class StreamResampler:
    """Any rate -> 16 kHz, chunk by chunk (soxr's ResampleStream, the same filter as the whole-file `to_16k_mono`;
    it holds back a few hundred samples until `flush`). 16 kHz input passes through untouched."""

    def __init__(self, rate: int, quality: str = RESAMPLE_QUALITY, what: str = "stream"):
        self.rate = check_rate(rate, what)
        self._rs = None
        if self.rate != R.SAMPLE_RATE:
            import soxr

            self._rs = soxr.ResampleStream(self.rate, R.SAMPLE_RATE, 1, dtype="float32", quality=quality)

    def push(self, x: np.ndarray) -> np.ndarray:
        """float32 samples at `rate` -> the 16 kHz samples the resampler can give now."""
        if self._rs is None and self.rate != R.SAMPLE_RATE:
            raise AudioError("push after flush: this resampler has ended")
        return x if self._rs is None else self._rs.resample_chunk(x)

    def flush(self) -> np.ndarray:
        """End of input: the samples held back (the resampler is released: push no more)."""
        if self._rs is None:
            return np.zeros(0, np.float32)
        out, self._rs = self._rs.resample_chunk(np.zeros(0, np.float32), last=True), None
        return out


class IncrementalMel:
    """16 kHz samples in, final normalised mel frames out: the ops of `mel`, frame by frame, as their samples arrive
    (no global normalisation, so they equal the whole-file frames); `finish` makes the last ones, which read the
    zero padding past the end."""

    def __init__(self):
        self.total = 0                               # 16 kHz samples received
        self.prev = torch.zeros(1)                   # last sample (pre-emphasis); 0 before the first
        self.y = torch.zeros(0)                      # pre-emphasised samples from index y_base
        self.y_base = 0
        self.n_mel = 0                               # mel frames computed

    def push(self, x: np.ndarray) -> torch.Tensor:
        """Append samples; return the mel frames (80, k) that became final."""
        if x.size:
            xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
            xx = torch.cat([self.prev, xt])
            self.y = torch.cat([self.y, xx[1:] - R.PREEMPHASIS * xx[:-1]])
            self.prev = xt[-1:].clone()
            self.total += x.size
        return self._frames(R.final_mel_frames(self.total))

    def finish(self) -> tuple[torch.Tensor, int]:
        """The last frames and T (the whole-file mel's frame count)."""
        t = R.mel_frames(self.total)
        return self._frames(t), t

    def _frames(self, stop: int) -> torch.Tensor:
        m0 = self.n_mel
        if stop <= m0:
            return torch.zeros(R.N_MELS, 0)
        half = R.WIN_LENGTH // 2                     # the centred STFT's zero padding, here explicit
        lo, hi = R.HOP_LENGTH * m0 - half, R.HOP_LENGTH * (stop - 1) + half
        seg = self.y[max(lo - self.y_base, 0):max(hi - self.y_base, 0)]
        pad_l = max(self.y_base - lo, 0)
        pad_r = (hi - lo) - pad_l - seg.numel()
        out = _mel_levels(torch.nn.functional.pad(seg, (pad_l, pad_r)), center=False)
        self.n_mel = stop
        keep = R.HOP_LENGTH * stop - half            # the next frame's first sample
        if keep > self.y_base:
            self.y = self.y[keep - self.y_base:]
            self.y_base = keep
        return out


def mel_span(x: torch.Tensor, first: int, m0: int, m1: int) -> torch.Tensor:
    """Mel frames [m0, m1) (80, m1 - m0) of a 16 kHz signal of which `x` holds the samples from index `first` on:
    at least HOP*m0 - WIN/2 - 1 (the pre-emphasis reads one sample back) to HOP*(m1 - 1) + WIN/2; samples before
    0 are zeros. The same ops as `mel` and `IncrementalMel`, so the frames equal the whole-file ones."""
    half = R.WIN_LENGTH // 2
    lo, hi = R.HOP_LENGTH * m0 - half - 1, R.HOP_LENGTH * (m1 - 1) + half   # x samples [lo, hi) give y [lo+1, hi)
    seg = x[max(lo - first, 0):hi - first]
    if seg.numel() != hi - max(lo, first) or first > max(lo, 0):
        raise ValueError(f"mel_span: samples [{lo}, {hi}) are not all in x (from {first}, {x.numel()} samples)")
    xx = torch.nn.functional.pad(seg, (max(-lo, 0), 0))
    return _mel_levels(xx[1:] - R.PREEMPHASIS * xx[:-1], center=False)
