"""python -m lipsync_trt.bench template-cache [--avatar DIR]: the template cache, bounded vs whole, side by side.

1. The server's per-mouth work outside the generator: the template cache (`TemplateCrops`) bounded to an LRU of 128
   templates, as the server's cache was before issue #14 (sanders' ping-pong period is 1,044 frames, so every frame
   misses it: JPEG decode + prepare), against all templates kept (the server's default). Inputs are derived from
   the crops (`compose.generator_inputs`), then `compose.mouths`. Mouths/s of that work alone, and with one measured
   generator call per batch of 8 added.
2. generate to memory (pipeline.iter_frames, onnxruntime, batch 1) on frames whose templates were used one ping-pong
   period earlier in the same run: template cache off (decode + prepare each frame) vs on (crops + decoded frames
   kept, inputs derived). A clip shorter than one period (sanders: 1,044 frames) never reuses a template.
Demo weights (speed does not depend on weight values); sanders from ../shared when present.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..cli_args import Parser
from .. import audio as A
from .. import avatar as AV
from .. import backends, compose, pipeline
from ..demo import demo_checkpoints, make_speech

BENCHMARK = ("template-cache", "the template cache: an LRU of 128 templates vs all kept (server mouths), "
                               "off vs on (generate)")
REPO = Path(__file__).resolve().parents[2]
OLD_LRU = 128   # templates the server's cache held before issue #14


def mouths_work(avatar, frames: int, batch: int, size: int | None) -> float:
    """Seconds for `frames` mouths (template side + compose.mouths) through a cache of `size` templates (None: all),
    generator output fixed."""
    order = avatar.order(frames)
    pred = torch.rand(batch, 3, 320, 320)
    cache = compose.TemplateCrops(avatar, "cpu", size=size)
    t0 = time.perf_counter()
    for s in range(0, frames, batch):
        ids = [int(t) for t in order[s:s + batch]]
        crops, boxes = cache.get(ids)
        x = compose.generator_inputs(crops)
        assert x.shape[0] == len(ids)
        compose.mouths(crops, pred[:len(ids)], boxes)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = Parser(prog="python -m lipsync_trt.bench template-cache",
                                 description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    ap.add_argument("--avatar", default=str(REPO.parent / "shared" / "datasets" / "sanders"),
                    help="avatar folder (default ../shared/datasets/sanders)")
    ap.add_argument("--frames", type=int, default=120, help="frames per generate run (half measured)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
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
    sizes = {f"LRU of {OLD_LRU}": OLD_LRU, "all templates": None}
    res: dict = {key: [] for key in sizes}
    for _ in range(args.rounds):       # two periods from a cold cache (the second one hits a whole cache); interleaved
        for key, size in sizes.items():
            frames = 2 * period
            secs = mouths_work(avatar, frames, 8, size)
            res[key].append(frames / secs)
    for key in res:
        m = np.median(res[key])
        with_gen = 1 / (1 / m + gen8 / 8)
        print(f"server mouths, {key}: {m:.1f} mouths/s outside the generator ({res[key]}), {with_gen:.2f} with it")
    old, new = (np.median(v) for v in res.values())
    print(f"ratio all/LRU outside the generator {new / old:.2f}")

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
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
