"""python -m lipsync_trt.bench live: what the idle rule of `LipSync.live()` saves in a conversation, and what `push`
costs while the model is busy.

1. A conversation of --seconds (default 30) in which the avatar speaks --speech of the time (default 25 %): utterances
   of --utterance seconds, each pushed in one burst (a TTS faster than real time) when the timeline reaches it,
   silence between them. The same conversation runs with idle="template" and idle="generate", side by side, with
   next() called as fast as frames come (no pacing): generator frames (counted on the runner), speech and idle
   frames, wall time, and the generator frames per second of conversation.
2. push() of 40 ms chunks from a second thread while next() keeps the generator busy with speech: its latency
   (median, 99th percentile, max); push never waits for the model, so it stays far below a frame's 40 ms.
Demo weights (speed does not depend on weight values); the demo avatar, or --avatar DIR.
"""
from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from ..cli_args import Parser
from .. import api, backends
from .. import avatar as AV
from ..demo import demo_checkpoints, make_demo, make_speech
from .machine import machine
from .report import write_json

BENCHMARK = ("live", "LipSync.live(): generator frames of a conversation with vs without idle frames; push() time "
                     "while the model is busy")


class CountingRunner:
    """The runner, with the frames its generator made counted."""

    def __init__(self, runner):
        self._runner, self.generated = runner, 0

    def __getattr__(self, name):
        return getattr(self._runner, name)

    def generate(self, images, audio):
        self.generated += len(images)
        return self._runner.generate(images, audio)


def conversation(ls, seconds: float, speech: float, utterance: float, rate: int, idle: str) -> dict:
    """Drive one conversation through a live stream; counts and wall time."""
    frames = int(round(seconds * 25))
    n_utt = max(1, int(round(seconds * speech / utterance)))
    gap = (frames - n_utt * utterance * 25) / n_utt                  # idle frames between utterances
    starts = [int(round(k * (utterance * 25 + gap) + gap / 2)) for k in range(n_utt)]
    counting = ls.runner
    before = counting.generated
    stats = {"speech": 0, "idle": 0, "late": 0}
    t0 = time.perf_counter()
    with ls.live(rate=rate, idle=idle) as live:
        for k in range(frames):
            if starts and k == starts[0]:
                starts.pop(0)
                live.push(make_speech(utterance, rate, seed=k))
            f = live.next()
            stats["speech" if f.speech else "idle"] += 1
            stats["late"] += f.late
    wall = time.perf_counter() - t0
    gen = counting.generated - before
    return {"mode": idle, "frames": frames, "utterances": n_utt, **stats, "generated": gen,
            "generated_per_conversation_second": gen / seconds, "wall_s": wall,
            "realtime_factor": seconds / wall}


def push_latency(ls, rate: int, pushes: int) -> dict:
    """push() of 40 ms chunks from a thread while the main thread's next() keeps the generator busy."""
    chunk = rate // 25
    x = make_speech(pushes * chunk / rate + 1, rate, seed=99)
    times: list[float] = []
    with ls.live(rate=rate, idle="generate") as live:
        live.push(x[:rate])                                           # 1 s queued: the model is busy from here on
        stop = threading.Event()

        def pusher() -> None:
            for k in range(pushes):
                c = x[rate + k * chunk: rate + (k + 1) * chunk]
                t = time.perf_counter()
                live.push(c)
                times.append(time.perf_counter() - t)
                time.sleep(0.004)
            stop.set()

        th = threading.Thread(target=pusher)
        th.start()
        while not stop.is_set():
            live.next()
        th.join()
    us = np.array(times) * 1e6
    return {"pushes": len(us), "p50_us": float(np.median(us)), "p99_us": float(np.percentile(us, 99)),
            "max_us": float(us.max())}


def main(argv: list[str] | None = None) -> int:
    ap = Parser(prog="python -m lipsync_trt.bench live", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--avatar", default=None, help="avatar folder (default: the synthetic demo avatar)")
    ap.add_argument("--backend", default="onnxruntime" if backends.available()["onnxruntime"].usable else "torch")
    ap.add_argument("--batch-size", type=int, default=1, help="generator batch (default 1: fastest on a CPU)")
    ap.add_argument("--seconds", type=float, default=30.0, help="conversation length (default 30)")
    ap.add_argument("--speech", type=float, default=0.25, help="share of the conversation spoken (default 0.25)")
    ap.add_argument("--utterance", type=float, default=2.5, help="seconds per utterance (default 2.5)")
    ap.add_argument("--rate", type=int, default=24000, help="pushed audio's sample rate (default 24000, a TTS's)")
    ap.add_argument("--pushes", type=int, default=200, help="pushes timed in part 2 (default 200)")
    ap.add_argument("--json", default=None, help="write the report here too")
    args = ap.parse_args(argv)
    for name, lo, hi in (("--seconds", 1, 3600), ("--speech", 0.01, 1), ("--utterance", 0.2, 60)):
        v = getattr(args, name[2:])
        if not lo <= v <= hi:
            ap.error(f"{name} {v}: expected {lo}..{hi}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.avatar is None:
            demo = make_demo(Path(tmp))
            avatar, ckpt = demo["avatar"], (demo["generator"], demo["audio_encoder"])
        else:
            avatar, ckpt = args.avatar, demo_checkpoints(Path(tmp))
        runner = CountingRunner(backends.load(args.backend, *ckpt, device="cpu"))
        ls = api.LipSync(AV.load(avatar), runner, batch_size=args.batch_size)
        try:
            conversation(ls, 2, 0.5, 0.5, args.rate, "template")     # warm-up: both models, the template cache
            runs = [conversation(ls, args.seconds, args.speech, args.utterance, args.rate, idle)
                    for idle in ("template", "generate")]
            push = push_latency(ls, args.rate, args.pushes)
        finally:
            ls.close()
    t, g = runs
    print(f"conversation: {args.seconds:g} s, {args.speech:.0%} speech in {t['utterances']} utterances, "
          f"{args.backend} batch {args.batch_size}, {args.rate} Hz pushes")
    print(f"{'idle':>9} {'frames':>6} {'speech':>6} {'generated':>9} {'gen/s of talk':>13} {'wall s':>7} {'x real time':>11}")
    for r in runs:
        print(f"{r['mode']:>9} {r['frames']:>6} {r['speech']:>6} {r['generated']:>9} "
              f"{r['generated_per_conversation_second']:>13.1f} {r['wall_s']:>7.1f} {r['realtime_factor']:>11.2f}")
    print(f"generator frames: template/generate = {t['generated'] / max(g['generated'], 1):.2f}; "
          f"wall: {t['wall_s'] / g['wall_s']:.2f}")
    print(f"push() while the model is busy: p50 {push['p50_us']:.0f} us, p99 {push['p99_us']:.0f} us, "
          f"max {push['max_us']:.0f} us over {push['pushes']} pushes of 40 ms")
    if args.json:
        write_json({"schema": 1, "args": vars(args), "runs": runs, "push": push, "machine": machine()}, args.json)
    return 0
