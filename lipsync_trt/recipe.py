"""Every constant of the SyncTalk_2D "328"/"ave" inference recipe (RECIPE.md) and its pure index arithmetic
(windows, window starts, template of a frame, feature rows of a frame, samples a frame needs), in one place.

Derived values are written as their derivation, as whisper's audio.py does (`N_FRAMES = N_SAMPLES // HOP_LENGTH`).
"""
from __future__ import annotations

import math

import numpy as np

from .errors import AudioError


def exact_div(x: int, y: int) -> int:
    """x / y when it divides exactly (a recipe constant that would silently truncate is a bug)."""
    assert x % y == 0, (x, y)
    return x // y


# §1 audio -> mel
SAMPLE_RATE = 16000          # Hz, what the mel and the encoder expect
N_FFT = 800
HOP_LENGTH = 200
WIN_LENGTH = 800
N_MELS = 80
FMIN = 55.0
FMAX = 7600.0
PREEMPHASIS = 0.97
MIN_LEVEL_DB = -100.0
REF_LEVEL_DB = 20.0
AMP_FLOOR = 1e-5
MAX_ABS_VALUE = 4.0
MEL_FPS = SAMPLE_RATE / HOP_LENGTH              # 80.0 mel frames per second

# §2 mel windows -> audio features
FPS = 25.0                   # video frames per second
MEL_WINDOW = 16              # mel frames per encoder window
FEATURE_DIM = 512            # encoder output per window
MIN_SAMPLES = (MEL_WINDOW - 1) * HOP_LENGTH   # 3000: T = 1 + len // 200 must reach MEL_WINDOW

# §3 feature window per video frame (mode "ave")
FEATURE_CONTEXT = 8          # rows [i - 8, i + 8) of the padded features
FEATURE_SHAPE = (32, 16, 16)
SAMPLES_PER_FRAME = exact_div(SAMPLE_RATE, int(FPS))   # 640 16 kHz samples per video frame
WINDOW_CYCLE = exact_div(int(FPS), math.gcd(int(MEL_FPS), int(FPS)))   # 5 video frames = 16 mel frames:
                                                 # window_start(k + 5) = window_start(k) + 16

# §5 face box from landmarks
LANDMARK_COUNT = 110
LM_XMIN = 1                  # lm[1].x
LM_YMIN = 52                 # lm[52].y
LM_XMAX = 31                 # lm[31].x

# §6 generator input
CROP_SIZE = 328
ROI_SIZE = 320
ROI_OFFSET = 4               # roi = crop328[4:324, 4:324]
MASK_RECT = (5, 5, 310, 305)  # cv2.rectangle (x, y, w, h), filled black on the masked copy
CUBIC_A = -0.75              # OpenCV INTER_CUBIC

# §9 networks
GENERATOR_CHANNELS = (32, 64, 128, 256, 512)
GENERATOR_IN_CHANNELS = 6
BN_EPS = 1e-5

# -- index arithmetic (RECIPE §1-4): everyone calls these; nobody re-derives them

def mel_frames(samples: int) -> int:
    """Mel frames of `samples` 16 kHz samples: T = 1 + len // 200 (centred STFT, RECIPE §1)."""
    return 1 + samples // HOP_LENGTH


def final_mel_frames(samples: int) -> int:
    """Mel frames whose whole STFT window lies inside the first `samples` samples: frame m reads samples up to
    HOP_LENGTH * m + WIN_LENGTH // 2 - 1, so it is final (equal to the whole-file one) once those have arrived."""
    return max(0, (samples - WIN_LENGTH // 2) // HOP_LENGTH + 1)


def num_windows(mel_frames: int) -> int:
    """N = int((T - 16) / 80.0 * 25.0) + 2, in float64 in exactly this order (RECIPE §2: T = 384 gives 116)."""
    if mel_frames < MEL_WINDOW:
        raise AudioError(f"audio too short: {mel_frames} mel frames, at least {MEL_WINDOW} are needed")
    return int((mel_frames - MEL_WINDOW) / MEL_FPS * FPS) + 2


def window_start(k: int) -> int:
    """First mel frame of encoder window k before the end clamp: int(80 * (k / 25)) (RECIPE §2)."""
    return int(MEL_FPS * (k / FPS))


def window_starts(mel_frames: int) -> list[int]:
    """Start mel frame of each encoder window of a T-frame mel: window_start(k), moved back so the window fits."""
    last = mel_frames - MEL_WINDOW
    return [min(window_start(k), last) for k in range(num_windows(mel_frames))]


def num_video_frames(n_windows: int) -> int:
    """Video frames of N encoder windows: N + 2 (the features are padded by one row at each end, RECIPE §2)."""
    return n_windows + 2


def num_frames(samples: int) -> int:
    """Video frames made from `samples` 16 kHz samples: N + 2 (AudioError when there is not one window)."""
    return num_video_frames(num_windows(mel_frames(samples)))


def feature_rows(frame: int) -> range:
    """Rows of the padded features (N + 2 rows) that make video frame i's feature window: [i - 8, i + 8)."""
    return range(frame - FEATURE_CONTEXT, frame + FEATURE_CONTEXT)


def window_of_row(row: int, n_windows: int | None = None) -> int | None:
    """Encoder window of padded feature row r: r - 1, row 0 repeats window 0 and row N + 1 window N - 1; None
    for rows outside [0, N + 2) (zeros). With N unknown (mid-stream) only rows < 0 are outside."""
    if row < 0 or (n_windows is not None and row > n_windows + 1):
        return None
    if row == 0:
        return 0
    if n_windows is not None and row == n_windows + 1:
        return n_windows - 1
    return row - 1


def last_window(frame: int) -> int:
    """The last encoder window video frame i reads mid-stream (its last feature row is i + 7): i + 6."""
    return window_of_row(feature_rows(frame)[-1])


def first_window(frame: int) -> int:
    """The first encoder window video frame i reads (rows from i - 8): max(i - 9, 0)."""
    return window_of_row(max(feature_rows(frame)[0], 0))


def samples_needed(frame: int) -> int:
    """16 kHz samples (counted from the start) that must have arrived before video frame i can be made before
    the end of the audio: all MEL_WINDOW mel frames of its last window must be final. 640 i + 7240 at most."""
    return HOP_LENGTH * (window_start(last_window(frame)) + MEL_WINDOW - 1) + WIN_LENGTH // 2


def receptive_field(frame: int) -> tuple[int, int]:
    """16 kHz samples [lo, hi) that video frame i's feature window reads mid-stream: the STFT windows of the mel
    frames of its encoder windows first_window(i)..last_window(i), with the sample before each for the
    pre-emphasis (RECIPE §1-3). A frame whose field holds no audio depends on none."""
    lo = HOP_LENGTH * window_start(first_window(frame)) - WIN_LENGTH // 2 - 1
    return max(lo, 0), samples_needed(frame)


NEED_AHEAD = max(samples_needed(k) - SAMPLES_PER_FRAME * k for k in range(WINDOW_CYCLE))   # 7240: the most any
                                                 # frame i needs past its own first sample 640 i (repeats every cycle)


def live_lookahead(hold_back: int = 0) -> int:
    """L, the live timeline's lookahead in video frames: frame k can be made once audio slots 0..k+L (640 16 kHz
    samples each) are in, less the resampler's `hold_back` 16 kHz samples: (L + 1) 640 >= NEED_AHEAD + hold_back.
    11 at 16 kHz (no resampler)."""
    return -(-(NEED_AHEAD + hold_back) // SAMPLES_PER_FRAME) - 1


def template_period(count: int, start: int = 0) -> int:
    """Video frames after which the ping-pong template order over images start..count-1 repeats: 2 (m - 1)."""
    return 2 * (count - start - 1)


def template_of(frame, count: int, start: int = 0):
    """Template image of video frame i in the ping-pong order 1, 2, ..., count-1, count-2, ..., 0, 1, ... over
    images start..count-1 (RECIPE §4): p = (i + 1) mod 2(m - 1), image start + min(p, 2(m - 1) - p). An int for
    an int frame, an array for an array of frames."""
    period = template_period(count, start)
    p = (np.asarray(frame, dtype=np.int64) + 1) % period
    out = start + np.minimum(p, period - p)
    return int(out) if out.ndim == 0 else out
