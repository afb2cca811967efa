"""python -m lipsync_trt.bench pipecat: the Pipecat video service (lipsync_trt.pipecat) in a real Pipecat pipeline on
the demo avatar (docs/BENCHMARKS.md, Pipecat).

A source processor plays a TTS: --utterances bursts of demo speech, each pushed at once as 20 ms TTSAudioRawFrames
(as a streaming TTS delivers faster than real time), --gap seconds apart; the service runs on its own 25 fps clock
with its default late rule (late_after=0: a speech frame not made by its due time goes out as the template, its
audio on time). Stamped with one wall clock:
- onset -> its frame: from the push of an utterance's first TTS frame to the push downstream of the video+audio
  frame carrying its first sample (the live lookahead L frames plus the wait for the next frame slot);
- onset -> first mouth: to the first generated (speech, not late) image of that utterance, which may come before
  its sound (the recipe's receptive field reaches ahead), or never, when every frame came late;
- late share: late speech frames / speech frames (the service's counts); idle frames are the template, never late;
- clock: the spacing of frames pushed downstream (p50/p99 |spacing - 40 ms|);
- with --idle-services N: the CPU (this process, all threads) of N services idle side by side, minus the same
  pipelines with a pass-through in the service's place, per service (no transport: its video encoding is extra).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..cli_args import Parser

BENCHMARK = ("pipecat", "LipSyncVideoService in a Pipecat pipeline: TTS onset -> its frame, late-frame share, clock")


def _pct(x, q):
    return float(np.percentile(np.asarray(x, np.float64), q)) if len(x) else None


async def _run(ls, rate: int, utterances: int, seconds: float, gap: float, late_after, backend: str) -> dict:
    from pipecat.frames.frames import EndFrame, StartFrame, TTSAudioRawFrame, TTSStoppedFrame
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.processors.frame_processor import FrameProcessor
    from pipecat.tests.utils import run_test

    try:
        from pipecat.pipeline.worker import PipelineParams
    except ImportError:                                      # pragma: no cover
        from pipecat.pipeline.task import PipelineParams

    from ..demo import make_speech
    from ..pipecat import LipSyncVideoService

    service = LipSyncVideoService(ls, late_after=late_after)
    frames: list[tuple[float, int, bool, bool, bool]] = []   # (pushed at, index, speech, late, carries sound)
    service.on_frame = lambda step, t: frames.append(
        (t, step.index, step.speech, step.late, step.pcm.count(0) < len(step.pcm)))
    pushes: list[float] = []
    n = int(seconds * 25) * (rate // 25)
    speech = [np.rint(make_speech(n / rate + 0.01, rate, seed=s)[:n] * 32767).astype(np.int16)
              for s in range(utterances)]
    for x in speech:                                         # no silent first slot: the onset is the first sample
        x[0] = x[0] or 1

    class TTS(FrameProcessor):
        async def process_frame(self, frame, direction):
            await super().process_frame(frame, direction)
            if isinstance(frame, StartFrame):
                await self.push_frame(frame, direction)
                self.task = asyncio.ensure_future(self.play())
                return
            if isinstance(frame, EndFrame):
                await self.task
            await self.push_frame(frame, direction)

        async def play(self):
            step = rate // 50
            await asyncio.sleep(gap)
            for x in speech:
                pushes.append(time.perf_counter())
                for i in range(0, len(x), step):
                    await self.push_frame(TTSAudioRawFrame(audio=x[i:i + step].tobytes(), sample_rate=rate,
                                                           num_channels=1))
                await self.push_frame(TTSStoppedFrame())
                await asyncio.sleep(seconds + gap)

    await run_test(Pipeline([TTS(), service]), frames_to_send=[],
                   pipeline_params=PipelineParams(audio_out_sample_rate=rate), start_timeout=60.0)
    onset_frame, onset_mouth = [], []
    for u, t0 in enumerate(pushes):
        t_end = pushes[u + 1] if u + 1 < len(pushes) else float("inf")
        sound = [f for f in frames if f[0] >= t0 and f[4]]
        if sound:
            onset_frame.append(sound[0][0] - t0)
        mouth = [f for f in frames if t0 <= f[0] < t_end and f[2] and not f[3]]
        onset_mouth.append(mouth[0][0] - t0 if mouth else None)
    times = np.array([f[0] for f in frames])
    jitter = np.abs(np.diff(times) - 0.04) * 1000 if len(times) > 1 else np.zeros(0)
    st = service.stats
    return {
        "backend": backend, "rate": rate, "late_after_s": late_after, "utterances": utterances,
        "utterance_s": seconds, "gap_s": gap, "lookahead_frames": service._source.lookahead,
        "frames": st["frames"], "speech_frames": st["speech"], "idle_frames": st["idle"], "late_frames": st["late"],
        "late_share_of_speech": st["late"] / st["speech"] if st["speech"] else None,
        "onset_to_frame_ms": [round(1000 * v, 1) for v in onset_frame],
        "onset_to_first_mouth_ms": [None if v is None else round(1000 * v, 1) for v in onset_mouth],
        "clock_jitter_ms_p50": _pct(jitter, 50), "clock_jitter_ms_p99": _pct(jitter, 99),
        "fps_out": (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else None,
    }


async def _idle(ls, rate: int, services: int, seconds: float) -> dict:
    """CPU time of this process (all threads) while `services` services run idle side by side for `seconds`, minus
    the same pipelines with a pass-through processor in the service's place, per service."""
    from pipecat.processors.frame_processor import FrameProcessor
    from pipecat.tests.utils import SleepFrame, run_test

    try:
        from pipecat.pipeline.worker import PipelineParams
    except ImportError:                                      # pragma: no cover
        from pipecat.pipeline.task import PipelineParams

    from ..pipecat import LipSyncVideoService

    class PassThrough(FrameProcessor):
        async def process_frame(self, frame, direction):
            await super().process_frame(frame, direction)
            await self.push_frame(frame, direction)

    async def measure(make):
        procs = [make() for _ in range(services)]
        c0, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*[run_test(p, frames_to_send=[SleepFrame(seconds)], start_timeout=60.0,
                                        pipeline_params=PipelineParams(audio_out_sample_rate=rate)) for p in procs])
        return time.process_time() - c0, time.perf_counter() - t0, procs

    base_cpu, base_wall, _ = await measure(PassThrough)
    cpu, wall, procs = await measure(lambda: LipSyncVideoService(ls))
    frames = sum(p.stats["frames"] for p in procs)
    per = (cpu / wall - base_cpu / base_wall) / services
    return {"idle_services": services, "idle_seconds": seconds, "idle_run_frames": frames,
            "idle_run_speech_frames": sum(p.stats["speech"] for p in procs),
            "idle_cpu_cores_per_service": round(per, 4), "idle_cpu_cores_baseline": round(base_cpu / base_wall, 4)}


def _late_after(text: str):
    if text.lower() == "none":
        return None
    v = float(text)
    if not (v >= 0 and np.isfinite(v)):
        raise argparse.ArgumentTypeError(f"{text!r}: expected seconds >= 0, or none")
    return v


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m lipsync_trt.bench pipecat", description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="auto")
    p.add_argument("--rate", type=int, default=24000, help="TTS / pipeline audio rate (default 24000)")
    p.add_argument("--utterances", type=int, default=3)
    p.add_argument("--seconds", type=float, default=1.2, help="length of each utterance")
    p.add_argument("--gap", type=float, default=2.0, help="silence before and between utterances (s)")
    p.add_argument("--late-after", type=_late_after, default=0.0,
                   help="the service's late_after: seconds past due (default 0), or 'none' to wait for every frame")
    p.add_argument("--idle-services", type=int, default=0,
                   help="also measure the CPU of this many idle services side by side (e.g. 8)")
    p.add_argument("--idle-seconds", type=float, default=10.0)
    p.add_argument("--json", help="write the result here too")
    args = p.parse_args(argv)
    try:
        import pipecat.frames.frames  # noqa: F401
    except ImportError:
        print("error: this benchmark needs Pipecat: pip install -e '.[pipecat]'", file=sys.stderr)
        return 2
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    from .. import api
    from ..demo import make_demo

    d = make_demo(Path(tempfile.gettempdir()) / "lipsync_trt_bench_pipecat")
    ls = api.load(d["avatar"], d["generator"], d["audio_encoder"], backend=args.backend)
    with ls:
        result = asyncio.run(_run(ls, args.rate, args.utterances, args.seconds, args.gap, args.late_after,
                                  ls.runner.name))
        if args.idle_services > 0:
            result.update(asyncio.run(_idle(ls, args.rate, args.idle_services, args.idle_seconds)))
    import os
    import subprocess

    result["load_average"] = os.getloadavg()
    result["cpus"] = os.cpu_count()
    result["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                   cwd=Path(__file__).resolve().parent).stdout.strip() or None
    result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(args.json)
    return 0
