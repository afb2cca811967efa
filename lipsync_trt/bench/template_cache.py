"""Template cache, before/after, side by side in one run (issue #14.5): python bench/template_cache.py [--avatar DIR]

1. The server's per-mouth work outside the generator: before, the LRU of 128 prepared float inputs of
   serve/scheduler.py at ca517ff (sanders' ping-pong period is 1,044 frames, so every frame missed it: JPEG decode +
   prepare); after, avatar.TemplateCrops (all 328 crops) + compose.generator_inputs. Then compose.mouths for both.
   Mouths/s of that work alone, and with one measured generator call per batch of 8 added.
2. generate to memory (pipeline.iter_frames, onnxruntime, batch 1) on frames whose templates were used one ping-pong
   period earlier in the same run: template cache off (decode + prepare each frame) vs on (crops + decoded frames
   kept, inputs derived). A clip shorter than one period (sanders: 1,044 frames) never reuses a template.
Demo weights (speed does not depend on weight values); sanders from ../shared when present.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from lipsync_trt import audio as A
from lipsync_trt import avatar as AV
from lipsync_trt import backends, compose, pipeline
from lipsync_trt.demo import demo_checkpoints, make_speech

REPO = Path(__file__).resolve().parents[1]


def old_prepared(avatar, cache: OrderedDict, t: int, size: int = 128):
    """serve/scheduler.py ModelEntry.prepared at ca517ff: (input (6, 320, 320), crop328, box), LRU of `size`."""
    hit = cache.get(t)
    if hit is not None:
        cache.move_to_end(t)
        return hit
    x1, y1, x2, y2 = (int(v) for v in avatar.boxes[t])
    crop = torch.from_numpy(np.ascontiguousarray(avatar.frame(t)[y1:y2, x1:x2]))
    inputs, crop328 = compose.prepare([crop], [(0, 0, x2 - x1, y2 - y1)], torch.float32)
    cache[t] = value = (inputs[0], crop328[0], (x1, y1, x2, y2))
    while len(cache) > size:
        cache.popitem(last=False)
    return value


def mouths_work(avatar, frames: int, batch: int, new: bool) -> float:
    """Seconds for `frames` mouths (template side + compose.mouths), generator output fixed."""
    order = avatar.order(frames)
    pred = torch.rand(batch, 3, 320, 320)
    crops_cache, old_cache = AV.TemplateCrops(avatar, "cpu"), OrderedDict()
    t0 = time.perf_counter()
    for s in range(0, frames, batch):
        ids = [int(t) for t in order[s:s + batch]]
        if new:
            crops, boxes = crops_cache.get(ids)
            x = compose.generator_inputs(crops)
        else:
            prep = [old_prepared(avatar, old_cache, t) for t in ids]
            x = torch.stack([p[0] for p in prep])
            crops, boxes = torch.stack([p[1] for p in prep]), [p[2] for p in prep]
        assert x.shape[0] == len(ids)
        compose.mouths(crops, pred[:len(ids)], boxes)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--avatar", default=str(REPO.parent / "shared" / "datasets" / "sanders"))
    ap.add_argument("--frames", type=int, default=120, help="frames per generate run (half measured)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    import cv2

    cv2.setNumThreads(1)
    avatar = AV.load(args.avatar)
    period = 2 * (avatar.count - 1)
    runner = backends.load("onnxruntime", *demo_checkpoints(tempfile.mkdtemp()), device="cpu")
    x, a = torch.rand(8, 6, 320, 320), torch.rand(8, 32, 16, 16)
    runner.generate(x, a)
    t = time.perf_counter()
    runner.generate(x, a)
    gen8 = time.perf_counter() - t
    print(f"generator b8: {gen8 * 1000:.0f} ms")
    res: dict = {"old": [], "new": []}
    for _ in range(args.rounds):       # one warm period for the new cache, then 1 period measured; interleaved
        for key in ("old", "new"):
            frames = 2 * period
            secs = mouths_work(avatar, frames, 8, key == "new")
            res[key].append(frames / secs)
    for key in res:
        m = np.median(res[key])
        with_gen = 1 / (1 / m + gen8 / 8)
        print(f"server mouths, {key}: {m:.1f} mouths/s outside the generator ({res[key]}), {with_gen:.2f} with it")
    print(f"ratio new/old outside the generator {np.median(res['new']) / np.median(res['old']):.2f}")

    wav = A.load_16k(Path(args.avatar) / "talk_hb.wav") if (Path(args.avatar) / "talk_hb.wav").is_file() else \
        make_speech(50.0)
    feats = pipeline.encode_features(runner, wav)
    n = args.frames // 2          # frames 0..n-1, then the frames one ping-pong period later: the same templates
    idx = list(range(n)) + list(range(period, period + n))
    gen: dict = {False: [], True: []}
    for _ in range(args.rounds):
        for cache in (False, True):
            t = time.perf_counter()
            for i, _f in pipeline.iter_frames(runner, avatar, feats, idx, batch_size=1, cache=cache):
                if i == n - 1:
                    t_half = time.perf_counter()
            gen[cache].append(n / (time.perf_counter() - t_half))
    off, on = np.median(gen[False]), np.median(gen[True])
    print(f"generate to memory, b1, {n} frames whose templates were used a period before: cache off {off:.2f} f/s "
          f"{gen[False]}, on {on:.2f} f/s {gen[True]}, ratio {on / off:.2f}")


if __name__ == "__main__":
    main()
