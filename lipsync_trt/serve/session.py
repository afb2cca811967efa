"""Per-stream state: 24 kHz chunks -> incremental 16 kHz resampling -> incremental mel -> encoder windows ->
per-frame feature windows, equal to the offline recipe (RECIPE §1-4) on the same audio.

Two halves with one owner thread each:
  `AudioFront`  (event loop): chunk ids, gaps (silence) and repeats (ignored), soxr ResampleStream (HQ),
                pre-emphasis + STFT + mel for frames whose samples have all arrived, mel windows.
  `FeatureBack` (model worker): encoder features in window order -> which video frames are ready -> their
                (32, 16, 16) feature windows and template ids.
Nothing here is shared between streams except the read-only avatar data the caller passes in.

Delay. soxr's HQ stream filter holds back 97..585 samples at 16 kHz (it emits in blocks, so the lag
depends on the phase), so video frame i (which needs 16 kHz samples up to 200 floor(3.2 (i + 6)) + 3399 <= 640 i + 7239, RECIPE §3) is
ready once chunk i + 11 (86 % of frames) or chunk i + 12 (14 %) has arrived; `ready_chunk(i)` gives the
exact chunk, and the pattern repeats every `ready_chunk_period()` frames (1,835). The mel has no global normalisation, so mel frames computed as their samples arrive equal the
offline ones; the last few (which read the zero padding past the end) are computed at end of stream, and
the frames after that are made exactly as the offline recipe makes the end of a file.
"""
from __future__ import annotations

import functools
import math
import threading

import numpy as np
import torch

from .. import audio as A
from .. import recipe as R
from .protocol import CHUNK_SAMPLES, MAX_GAP_CHUNKS, STREAM_RATE, ProtocolError, Status

RESAMPLE_QUALITY = "HQ"


def new_resampler():
    import soxr

    return soxr.ResampleStream(STREAM_RATE, R.SAMPLE_RATE, 1, dtype="float32", quality=RESAMPLE_QUALITY)


class _Counts:
    """Cumulative 16 kHz output counts of one stream resampler fed whole chunks, extended on demand (the
    resampler is kept, so growing the table costs only the new chunks: ~8 us each)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.resampler = None
        self.table = np.zeros(0, np.int64)

    def get(self, chunks: int) -> np.ndarray:
        with self.lock:
            have = len(self.table)
            if have < chunks:
                if self.resampler is None:
                    self.resampler = new_resampler()
                zeros, total = np.zeros(CHUNK_SAMPLES, np.float32), int(self.table[-1]) if have else 0
                more = np.empty(max(chunks, 2 * have) - have, np.int64)
                for k in range(len(more)):
                    total += len(self.resampler.resample_chunk(zeros))
                    more[k] = total
                self.table = np.concatenate([self.table, more])
            return self.table


_COUNTS = _Counts()


def _output_counts(chunks: int) -> np.ndarray:
    """16 kHz samples out of the stream resampler after chunks 0..c (cumulative; at least `chunks` entries);
    independent of the content."""
    return _COUNTS.get(chunks)


def ready_chunk(frame: int) -> int:
    """The chunk id whose arrival makes video frame `frame` ready mid-stream: frame + 11 or frame + 12."""
    counts = _output_counts(max(3000, frame + 20))
    return int(np.searchsorted(counts, samples_needed(frame)))


@functools.lru_cache(maxsize=None)
def ready_chunk_period() -> int | None:
    """P with ready_chunk(i + P) = ready_chunk(i) + P for every frame i (None if not found). The resampler's
    hold-back after chunk c (640 (c + 1) minus its cumulative output) repeats with a period of its own (367 chunks
    for soxr HQ fed 960-sample chunks at 3:2, found here on 12,000 chunks), and samples_needed(i + 5) =
    samples_needed(i) + 5 x 640 (5 video frames = 16 mel frames), so P = lcm(5, that period) = 1,835 frames."""
    chunks = 12000
    per_chunk = CHUNK_SAMPLES * R.SAMPLE_RATE // STREAM_RATE                 # 640
    hold = per_chunk * np.arange(1, chunks + 1) - _output_counts(chunks)[:chunks]
    cycle = int(R.FPS) // math.gcd(int(R.MEL_FPS), int(R.FPS))               # 5: window_start(k + 5) = ... + 16
    for p in range(1, chunks // 4):
        if np.array_equal(hold[p:], hold[:-p]):
            return math.lcm(cycle, p)
    return None


def samples_needed(frame: int) -> int:
    """16 kHz samples that make video frame `frame` ready: its last window (i + 6) must have all 16 mel frames,
    and mel frame m is final with 200 m + 400 samples. At most audio.samples_needed(frame) = 640 i + 7240."""
    return R.HOP_LENGTH * (window_start(frame + 6) + R.MEL_WINDOW - 1) + R.WIN_LENGTH // 2


def template_for(frame: int, count: int) -> int:
    """Template image of video frame `frame` in the ping-pong order (RECIPE §4; = avatar.frame_order)."""
    period = 2 * (count - 1)
    p = (frame + 1) % period
    return p if p <= count - 1 else period - p


class IncrementalMel:
    """16 kHz samples in, final normalised mel frames out (the same ops as audio.mel, frame by frame)."""

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
        last = (self.total - R.WIN_LENGTH // 2) // R.HOP_LENGTH   # frames m with 200 m + 400 <= total
        return self._frames(last + 1)

    def finish(self) -> tuple[torch.Tensor, int]:
        """The last frames (reading the zero padding past the end) and T = 1 + len // 200."""
        t = 1 + self.total // R.HOP_LENGTH
        return self._frames(t), t

    def _frames(self, stop: int) -> torch.Tensor:
        m0 = self.n_mel
        if stop <= m0:
            return torch.zeros(R.N_MELS, 0)
        half = R.WIN_LENGTH // 2
        lo, hi = R.HOP_LENGTH * m0 - half, R.HOP_LENGTH * (stop - 1) + half
        seg = self.y[max(lo - self.y_base, 0):max(hi - self.y_base, 0)]
        pad_l = max(self.y_base - lo, 0)
        pad_r = (hi - lo) - pad_l - seg.numel()
        seg = torch.nn.functional.pad(seg, (pad_l, pad_r))
        spec = torch.stft(seg, n_fft=R.N_FFT, hop_length=R.HOP_LENGTH, win_length=R.WIN_LENGTH,
                          window=A._window(seg.device), center=False, return_complex=True).abs()
        m = A._filterbank(seg.device) @ spec
        s = 20.0 * torch.log10(torch.clamp(m, min=R.AMP_FLOOR)) - R.REF_LEVEL_DB
        scale = 2 * R.MAX_ABS_VALUE / -R.MIN_LEVEL_DB
        out = torch.clamp(scale * (s - R.MIN_LEVEL_DB) - R.MAX_ABS_VALUE, -R.MAX_ABS_VALUE, R.MAX_ABS_VALUE)
        self.n_mel = stop
        keep = R.HOP_LENGTH * stop - half            # the next frame's first sample
        if keep > self.y_base:
            self.y = self.y[keep - self.y_base:]
            self.y_base = keep
        return out


def window_start(k: int) -> int:
    return int(R.MEL_FPS * (k / R.FPS))


class AudioFront:
    """Chunks in (ids, gaps, repeats), encoder input windows out. Owned by the event loop."""

    def __init__(self, max_gap: int = MAX_GAP_CHUNKS):
        self.resampler = new_resampler()
        self.mel_inc = IncrementalMel()
        self.next_chunk = 0
        self.max_gap = max_gap
        self.mel = torch.zeros(R.N_MELS, 0)          # mel frames from mel_base
        self.mel_base = 0
        self.next_window = 0
        self.ended = False
        self.samples16: list[np.ndarray] | None = None   # kept only when record=True (tests)

    def push(self, chunk_id: int, audio: np.ndarray) -> tuple[int, torch.Tensor] | None:
        """A 960-sample chunk: (first window index, new windows (K, 1, 80, 16)), or None for a repeat
        (ignored). A gap before it is filled with silence; a gap larger than max_gap is a ProtocolError."""
        if chunk_id < self.next_chunk:
            return None
        gap = chunk_id - self.next_chunk
        if gap > self.max_gap:
            raise ProtocolError(Status.MALFORMED, f"frame id {chunk_id} jumps {gap} chunks ahead of "
                                f"{self.next_chunk} (at most {self.max_gap} missing chunks are filled with silence)",
                                chunk_id)
        x = audio if not gap else np.concatenate([np.zeros(gap * CHUNK_SAMPLES, np.float32), audio])
        self.next_chunk = chunk_id + 1
        return self._windows(self.mel_inc.push(self._resample(x)))

    def finish(self) -> tuple[int, torch.Tensor, int]:
        """End of stream: (first window index, the remaining windows, N = total windows).
        AudioError (from audio.num_windows) when the stream was too short for one window."""
        self.ended = True
        x = self.resampler.resample_chunk(np.zeros(0, np.float32), last=True)
        self._record(x)
        first, mid = self._windows(self.mel_inc.push(x))   # frames whose samples are all there now
        _, tail, n = self._finish_windows()                # the rest read the zero padding
        return first, torch.cat([mid, tail]), n

    # -- internals
    def _resample(self, x: np.ndarray) -> np.ndarray:
        y = self.resampler.resample_chunk(x)
        self._record(y)
        return y

    def _record(self, y: np.ndarray) -> None:
        if self.samples16 is not None:
            self.samples16.append(np.array(y, np.float32))

    def _append_mel(self, frames: torch.Tensor) -> None:
        if frames.shape[1]:
            self.mel = torch.cat([self.mel, frames], dim=1)

    def _windows(self, new_frames: torch.Tensor) -> tuple[int, torch.Tensor]:
        self._append_mel(new_frames)
        n_mel = self.mel_base + self.mel.shape[1]
        first, starts = self.next_window, []
        while window_start(self.next_window) + R.MEL_WINDOW <= n_mel:
            starts.append(window_start(self.next_window))
            self.next_window += 1
        return first, self._cut(starts, n_mel)

    def _cut(self, starts: list[int], n_mel: int) -> torch.Tensor:
        if not starts:
            return torch.zeros(0, 1, R.N_MELS, R.MEL_WINDOW)
        idx = torch.tensor(starts)[:, None] - self.mel_base + torch.arange(R.MEL_WINDOW)[None, :]
        out = self.mel[:, idx].permute(1, 0, 2).unsqueeze(1).contiguous()
        keep = max(0, min(window_start(self.next_window), n_mel - R.MEL_WINDOW))
        if keep > self.mel_base:
            self.mel = self.mel[:, keep - self.mel_base:]
            self.mel_base = keep
        return out

    def _finish_windows(self) -> tuple[int, torch.Tensor, int]:
        # the pushes above made every frame whose samples are complete; now the zero-padded tail
        tail, t = self.mel_inc.finish()
        self._append_mel(tail)
        n = A.num_windows(t)
        first = self.next_window
        starts = [min(window_start(k), t - R.MEL_WINDOW) for k in range(first, n)]
        self.next_window = n
        return first, self._cut(starts, t), n


class FeatureBack:
    """Encoder features (in window order) in, ready video frames out. Owned by the model worker."""

    def __init__(self, template_count: int):
        self.count = template_count
        self.first = None                            # window 0's feature (row 0 of the padded features)
        self.feats: list[torch.Tensor] = []          # windows from base
        self.base = 0
        self.known = 0                               # windows received
        self.n_windows: int | None = None            # N, once the stream has ended
        self.next_frame = 0

    def add(self, first: int, feats: torch.Tensor, n_windows: int | None = None
            ) -> list[tuple[int, int, torch.Tensor]]:
        """Windows [first, first + len) -> [(frame id, template id, feature window (32, 16, 16))] now ready."""
        if first != self.known:
            raise RuntimeError(f"encoder windows out of order: got {first}, expected {self.known}")
        for f in feats:
            if self.known == 0:
                self.first = f
            self.feats.append(f)
            self.known += 1
        if n_windows is not None:
            if self.known != n_windows:
                raise RuntimeError(f"stream ended with {self.known} windows, expected {n_windows}")
            self.n_windows = n_windows
        last = (self.n_windows + 1) if self.n_windows is not None else self.known - 1 - 6
        out = []
        while self.next_frame <= last:
            i = self.next_frame
            out.append((i, template_for(i, self.count), self._window(i)))
            self.next_frame += 1
        drop = self.next_frame - 9 - self.base               # frame i reads windows from i - 9
        if drop > 0:
            del self.feats[:drop]
            self.base += drop
        return out

    @property
    def frames_total(self) -> int | None:
        """N + 2 once the stream has ended."""
        return None if self.n_windows is None else self.n_windows + 2

    def _row(self, r: int) -> torch.Tensor | None:
        n = self.n_windows
        if r < 0 or (n is not None and r > n + 1):
            return None
        if r == 0:
            return self.first
        k = (n - 1) if (n is not None and r == n + 1) else r - 1
        return self.feats[k - self.base]

    def _window(self, i: int) -> torch.Tensor:
        rows = [self._row(r) for r in range(i - R.FEATURE_CONTEXT, i + R.FEATURE_CONTEXT)]
        ref = next(r for r in rows if r is not None)
        return torch.stack([r if r is not None else torch.zeros_like(ref) for r in rows]).reshape(R.FEATURE_SHAPE)


# -- a whole stream: both halves, its queue bound and the in-order delivery of its responses

FRAME, REUSE, ERROR, END = "frame", "reuse", "error", "end"


class Stream:
    """One client stream. `front` is used on the event loop, `back` in the model worker; responses come back
    through `post` (any thread) and leave in frame-id order through `emit(stream, message)` on the loop."""

    def __init__(self, model: str, entry, loop, emit, max_gap: int = MAX_GAP_CHUNKS):
        self.model, self.entry, self.loop, self._emit = model, entry, loop, emit
        self.front = AudioFront(max_gap)
        self.back = FeatureBack(entry.avatar.count)
        self.lock = threading.Lock()
        self.inflight = 0            # frames handed to the generator and not yet delivered
        self.closed = False          # connection gone: the worker drops this stream's work
        self.done = False            # END delivered (or closed)
        self.next_out = 0
        self.held: dict[int, tuple] = {}
        self.last_mouth: tuple[int, bytes, tuple] | None = None   # (frame id, jpeg, box) last sent
        self.sent_at: dict[int, float] = {}
        self.on_done = None          # callback(stream) once END is delivered

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
            if kind == FRAME:
                with self.lock:
                    self.inflight -= 1
                if jpeg is not None:
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
        from .protocol import REUSED_FILE, error_response, encode_response, frame_zip
        if self.last_mouth is None:
            return error_response(Status.OVERLOADED, i, "server overloaded (policy skip): no earlier mouth to reuse")
        j, jpeg, box = self.last_mouth
        note = f"mouth of frame {j} reused: server overloaded (policy skip)".encode()
        return encode_response(Status.OK, i, frame_zip(jpeg, box, {REUSED_FILE: note}))
