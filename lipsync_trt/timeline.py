"""The live timeline's rules, as plain bookkeeping (no model, no threads): a row of slots of rate/25 samples, one
video frame's audio each. Pushed audio queues at the end of what is committed; committing slot s fixes it (a partial
slot is padded with silence, a slot no audio reached is silence); frame i is a speech frame when its receptive field
(`recipe.receptive_field`, widened by the resampler's reach) holds a pushed sample. `live.Live` and the Pipecat
service's remote source each keep one, so both follow the same rules.
"""
from __future__ import annotations

import functools
from collections import deque

import numpy as np

from . import audio as A
from . import recipe as R
from . import stream as core
from .errors import AudioError

HOLD_BACK_PROBE = 400       # slots over which a rate's resampler hold-back is measured (many of its periods)


def exact_slot(rate) -> int:
    """Samples per video frame at `rate`; AudioError unless the rate is a valid one divisible by 25."""
    rate = A.check_rate(rate, "live stream")
    if rate % int(R.FPS):
        raise AudioError(f"live stream: sample rate {rate} Hz is not divisible by {int(R.FPS)}: a frame's audio must "
                         f"be whole samples (16000, 24000, 44100, 48000 are)")
    return int(rate) // int(R.FPS)


@functools.lru_cache(maxsize=32)
def hold_back(rate: int) -> int:
    """The most 16 kHz samples the stream resampler holds back after a whole slot (rate/25 samples) of input: 0 at
    16 kHz. It also bounds how far (in 16 kHz samples) one input sample reaches either way through its filter."""
    if rate == R.SAMPLE_RATE:
        return 0
    slot = exact_slot(rate)
    counts = core.output_counts(rate, slot, HOLD_BACK_PROBE)
    return int((R.SAMPLES_PER_FRAME * np.arange(1, HOLD_BACK_PROBE + 1) - counts).max())


def lookahead(rate: int) -> int:
    """L at this input rate: frame k is made once slots 0..k+L are committed (12 at 24 kHz, 11 at 16 kHz)."""
    return R.live_lookahead(hold_back(rate))


class Timeline:
    """Slots [0, returned) returned, [returned, committed) committed, [committed, planned) planned from full slots of
    pushed audio; the pushed samples not in a slot yet wait in a queue (cut into slots only as they are needed, so a
    long push costs no more than a short one). `pushed[s]`: the (start, end) of slot s holding pushed samples, or
    None (silence)."""

    def __init__(self, rate: int):
        self.samples_per_frame = exact_slot(rate)
        self.rate = int(rate)
        self.hold = hold_back(self.rate)
        self.lookahead = R.live_lookahead(self.hold)
        self.reach = -(-self.hold // R.SAMPLES_PER_FRAME)   # slots one input sample reaches through the filter
        self.slots: dict[int, np.ndarray] = {}
        self.pushed: dict[int, tuple[int, int] | None] = {}
        self.returned = self.committed = self.planned = 0
        self._queue: deque = deque()
        self.queued = 0

    def push(self, x: np.ndarray) -> None:
        """Queue float32 samples at the end of the timeline."""
        if len(x):
            self._queue.append(np.array(x, np.float32))
            self.queued += len(x)

    def take(self, n: int) -> None:
        """Plan full slots from the queue, up to slot n."""
        while self.planned < n and self.queued >= self.samples_per_frame:
            self._plan_one()

    def commit(self, n: int) -> None:
        """Fix slots up to n: planned ones as they are, then what is queued (a partial slot padded with silence),
        then silence."""
        while self.committed < n:
            if self.planned == self.committed:
                self._plan_one()
            self.committed += 1

    def silence(self, keep: int) -> list[int]:
        """Barge-in: the queue is dropped, slots [returned, keep) become silence (they stay: committed, or already
        given to a server), later ones go; returns the slots that held pushed samples and were silenced."""
        self._queue.clear()
        self.queued = 0
        keep = min(max(keep, self.committed), self.planned)
        silenced = [s for s in range(self.returned, keep) if self.pushed[s] is not None]
        for s in range(self.returned, self.planned):
            if s < keep:
                self.slots[s], self.pushed[s] = np.zeros(self.samples_per_frame, np.float32), None
            else:
                del self.slots[s], self.pushed[s]
        self.planned = self.committed = keep
        return silenced

    def span(self, frame: int) -> range:
        """Slots whose samples can reach frame i's receptive field (through the resampler's filter: `hold` 16 kHz
        samples either way); its end is at most i + L + 1, what is committed for frame i."""
        lo, hi = R.receptive_field(frame)
        spf = R.SAMPLES_PER_FRAME
        return range(max((lo - self.hold) // spf, 0), (hi - 1 + self.hold) // spf + 1)

    def is_speech(self, frame: int) -> bool:
        """Whether a pushed sample lies in frame i's receptive field (widened by the resampler's reach)."""
        lo, hi = R.receptive_field(frame)
        lo, hi = lo - self.hold, hi + self.hold
        spf, scale = R.SAMPLES_PER_FRAME, R.SAMPLES_PER_FRAME / self.samples_per_frame
        for s in self.span(frame):
            p = self.pushed.get(s)
            if p is not None and s * spf + p[0] * scale < hi and s * spf + p[1] * scale > lo:
                return True
        return False

    def trim(self, keep: int) -> None:
        """Forget slots before `keep` (returned, and read by no later frame)."""
        for s in [s for s in self.slots if s < keep]:
            del self.slots[s], self.pushed[s]

    def _plan_one(self) -> None:
        """Cut the next slot from the queue: a full slot, or what is left padded with silence (none: silence)."""
        spf, parts, got = self.samples_per_frame, [], 0
        while self._queue and got < spf:
            x = self._queue[0]
            take = x[:spf - got]
            parts.append(take)
            got += len(take)
            if len(take) == len(x):
                self._queue.popleft()
            else:
                self._queue[0] = x[len(take):]
        self.queued -= got
        slot = np.zeros(spf, np.float32)
        if got:
            slot[:got] = np.concatenate(parts) if len(parts) > 1 else parts[0]
        self.slots[self.planned], self.pushed[self.planned] = slot, ((0, got) if got else None)
        self.planned += 1
