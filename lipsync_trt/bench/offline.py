"""Offline runs: every configuration (backend x device x precision x batch) and the baseline loaded once, then
sampled metric by metric in interleaved rounds (see bench/README.md for what each metric times)."""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from .. import audio as A
from .. import recipe as R
from .baseline import Baseline
from .configs import Config, backend_names, configurations, devices, runner_options
from .inputs import Inputs
from .measure import Memory, Stopwatch, in_worker, log
from .report import jsonable


class Bench:
    """The configurations of one run, their loaded runners, and the samples taken so far (`results`)."""

    def __init__(self, args: argparse.Namespace, inputs: Inputs, tmp: Path):
        from .. import avatar as avatar_mod
        from .. import backends

        self.args, self.inputs, self.tmp = args, inputs, tmp
        self.mem = Memory()
        self.avatar = avatar_mod.load(inputs.avatar_dir)
        avail = backends.available()
        names = backend_names(args.backends, avail)
        self.availability = {n: {"usable": a.usable, "reason": a.reason} for n, a in avail.items()}
        self.devices = devices(args.devices)
        self.configs, self.skipped = configurations(args, names, avail, self.devices)
        self.runners: dict[tuple, object] = {}
        self.loads: dict[str, dict] = {}
        self.results: dict[str, dict] = {}
        self._last_frames: dict[str, np.ndarray] = {}   # the last end-to-end frame of each configuration

    def setup(self, bar) -> None:
        """Load every runner once (load time), time its first call at each batch size, warm up; configurations
        that cannot run are moved to `skipped` with the reason."""
        from .. import backends, pipeline

        keep = []
        for cfg in self.configs:
            dev = torch.device(cfg.device)
            rk = (cfg.backend, cfg.device, cfg.precision)
            res = self.results.setdefault(cfg.key, {"config": cfg.__dict__ | {"key": cfg.key}, "samples": {},
                                                    "memory": [], "stages": []})
            if rk not in self.runners:
                bar.set_postfix_str(f"load {cfg.backend}/{cfg.device}/{cfg.precision}")
                try:
                    with Stopwatch(dev) as sw:
                        if cfg.is_baseline:
                            runner = Baseline(self.inputs.generator, self.inputs.audio_encoder, dev)
                        else:
                            name, opts = runner_options(cfg.backend, self.args.engines)
                            runner = backends.load(name, self.inputs.generator, self.inputs.audio_encoder,
                                                   device=dev, precision=cfg.precision, **opts)
                    self.runners[rk] = runner
                    self.loads["/".join(rk)] = {"load_s": sw.seconds, "info": jsonable(getattr(runner, "info", {}))}
                except Exception as exc:   # a backend that cannot run this device/precision: recorded, not fatal
                    self.runners[rk] = None
                    self.loads["/".join(rk)] = {"error": _err(exc)}
            runner = self.runners[rk]
            if runner is None:
                self.skipped.append({"backend": cfg.backend, "device": cfg.device, "precision": cfg.precision,
                                     "batch": cfg.batch, "reason": self.loads["/".join(rk)]["error"]})
                self.results.pop(cfg.key, None)
                bar.update(1)
                continue
            res["load_s"] = self.loads["/".join(rk)]["load_s"]
            res["info"] = self.loads["/".join(rk)]["info"]
            try:
                bar.set_postfix_str(f"first call {cfg.key}")
                imgs, aud = self._gen_inputs(cfg.batch, dev)
                if cfg.is_baseline:
                    with Stopwatch(dev) as sw, torch.no_grad():
                        runner.net(imgs, aud).cpu()
                    res["first_call_s"] = sw.seconds
                    if self.args.warmup:
                        runner.run(self.inputs.avatar_dir, self.inputs.e2e_wav, 1)
                else:
                    with Stopwatch(dev) as sw:
                        runner.generate(imgs, aud)
                    res["first_call_s"] = sw.seconds
                    for _ in range(self.args.warmup):
                        runner.generate(imgs, aud)
                    if self.args.warmup:
                        feats = pipeline.encode_features(runner, A.load_16k(self.inputs.e2e_wav))
                        for _ in pipeline.iter_frames(runner, self._fresh_avatar(), feats,
                                                      list(range(min(cfg.batch, feats.num_frames))),
                                                      batch_size=cfg.batch):
                            pass
                keep.append(cfg)
            except Exception as exc:
                self.skipped.append({**cfg.__dict__, "reason": _err(exc)})
                self.results.pop(cfg.key, None)
            bar.update(1)
        self.configs = keep

    def _gen_inputs(self, batch: int, dev: torch.device):
        g = torch.Generator().manual_seed(batch)
        imgs = torch.rand(batch, 6, R.ROI_SIZE, R.ROI_SIZE, generator=g).to(dev)
        aud = (torch.randn(batch, *R.FEATURE_SHAPE, generator=g) * 0.5).to(dev)
        return imgs, aud

    def _fresh_avatar(self):
        """The loaded avatar with an empty frame cache: every sample decodes its JPEGs, like the baseline."""
        from ..avatar import Avatar

        a = self.avatar
        return Avatar(root=a.root, height=a.height, width=a.width, boxes=a.boxes, landmarks=a.landmarks,
                      cache_size=a.cache_size)

    def sample(self, kind: str, cfg: Config) -> None:
        """One sample of metric `kind` (a `_s_<kind>` method) for cfg, with the peak memory of taking it."""
        res = self.results[cfg.key]
        runner = self.runners[(cfg.backend, cfg.device, cfg.precision)]
        dev = torch.device(cfg.device)
        fn = getattr(self, f"_s_{kind}")
        mem: dict = {}
        try:
            with self.mem.track(dev, mem):
                value, extra = fn(cfg, runner, dev)
        except Exception as exc:
            res.setdefault("errors", []).append({"metric": kind, "error": _err(exc)})
            log(f"bench: {cfg.key} {kind}: {_err(exc)}")
            if self.args.debug:
                traceback.print_exc()
            return
        for name, v in value.items():
            res["samples"].setdefault(name, []).append(v)
        res["memory"].append({"metric": kind, **mem})
        if extra:
            res["stages"].append({"metric": kind, **extra})

    def _s_generator(self, cfg, runner, dev):
        n = self.inputs.frames
        batches = max(1, math.ceil(n / cfg.batch))
        imgs, aud = self._gen_inputs(cfg.batch, dev)

        def timed():
            with Stopwatch(dev, events=True) as sw:
                for _ in range(batches):
                    runner.generate(imgs, aud)
            return sw

        sw = in_worker(timed)   # the thread the pipeline's generator stage runs in
        return {"generator_fps": batches * cfg.batch / sw.best}, {"seconds": sw.best, "frames": batches * cfg.batch}

    def _s_e2e_memory(self, cfg, runner, dev):
        from .. import pipeline

        n = self.inputs.frames
        if cfg.is_baseline:
            stages: dict = {}
            with Stopwatch(dev) as sw:
                last = runner.run(self.inputs.avatar_dir, self.inputs.e2e_wav, n, stages=stages)
            self._last_frames[cfg.key] = last
            # the baseline's model call is timed inside its loop (sequential, batch 1): its generator-only figure
            return ({"e2e_memory_fps": n / sw.seconds, "generator_fps": n / stages["model"],
                     "prepare_ms": 1000 * stages["prepare"] / n, "paste_ms": 1000 * stages["paste"] / n},
                    {"seconds": sw.seconds, "frames": n, **{k: v / n for k, v in stages.items()}})
        avatar = self._fresh_avatar()
        timings: dict = {}
        last = None
        count = 0
        with Stopwatch(dev) as sw:
            data, rate = A.load(self.inputs.e2e_wav)
            feats = pipeline.encode_features(runner, A.to_16k_mono(data, rate))
            for _, frame in pipeline.iter_frames(runner, avatar, feats, self.inputs.indices, 0, cfg.batch, timings):
                last = frame.cpu().numpy()
                count += 1
        self._last_frames[cfg.key] = last
        return {"e2e_memory_fps": count / sw.seconds}, {"seconds": sw.seconds, "frames": count,
                                                         **{k: v / count for k, v in timings.items()}}

    def _s_e2e_mp4(self, cfg, runner, dev):
        from .. import pipeline

        n = self.inputs.frames
        out = self.tmp / f"out_{cfg.key.replace('/', '_')}.mp4"
        if cfg.is_baseline:
            stages: dict = {}
            with Stopwatch(dev) as sw:
                runner.run(self.inputs.avatar_dir, self.inputs.e2e_wav, n, mp4=out, stages=stages)
            size = out.stat().st_size
            out.unlink(missing_ok=True)
            return {"e2e_mp4_fps": n / sw.seconds}, {"seconds": sw.seconds, "frames": n, "bytes": size,
                                                      **{k: v / n for k, v in stages.items()}}
        avatar = self._fresh_avatar()
        with Stopwatch(dev) as sw:
            data, rate = A.load(self.inputs.e2e_wav)
            summary = pipeline.generate(runner, avatar, data, rate, out=out, frames=self.inputs.indices,
                                        batch_size=cfg.batch, progress=False, source=str(self.inputs.e2e_wav))
        size = out.stat().st_size
        out.unlink(missing_ok=True)
        return ({"e2e_mp4_fps": summary.frames / sw.seconds},
                {"seconds": sw.seconds, "frames": summary.frames, "bytes": size,
                 **{k: v / summary.frames for k, v in (summary.timings or {}).items()}})

    def _s_audio(self, cfg, runner, dev):
        from .. import pipeline

        secs = self.inputs.audio_seconds
        if cfg.is_baseline:
            with Stopwatch(dev) as sw:
                runner.features(self.inputs.audio_wav)
        else:
            with Stopwatch(dev) as sw:
                data, rate = A.load(self.inputs.audio_wav)
                pipeline.encode_features(runner, A.to_16k_mono(data, rate))
        return {"audio_ms_per_s": 1000 * sw.seconds / secs}, {"seconds": sw.seconds, "audio_seconds": secs}

    def _s_compose(self, cfg, runner, dev):
        from .. import compose

        n = self.inputs.frames
        order = self.avatar.order(max(n, 2))
        ids = [int(order[i]) for i in range(n)]
        host = [self.avatar.frame(t) for t in ids]
        prep = paste = 0.0
        for i in range(0, n, cfg.batch):
            chunk = ids[i:i + cfg.batch]
            frames = [torch.from_numpy(host[i + j].copy()).to(dev) for j in range(len(chunk))]
            boxes = [self.avatar.boxes[t] for t in chunk]

            def timed_prepare():   # in a worker thread, as the pipeline's decode/prepare stage
                with Stopwatch(dev) as sw:
                    got = compose.prepare(frames, boxes, runner.dtype)
                return sw, got

            sw, (inputs, crops) = in_worker(timed_prepare)
            prep += sw.seconds
            pred = inputs[:, :3]
            with Stopwatch(dev) as sw:   # in the calling thread, as the pipeline's paste
                compose.paste(frames, crops, pred, boxes)
            paste += sw.seconds
        return {"prepare_ms": 1000 * prep / n, "paste_ms": 1000 * paste / n}, None

    def plan(self) -> list[tuple[int, str, Config]]:
        """(round, metric, config) in run order: per round, per metric, every config in a rotating order."""
        steps = []
        seen_audio, seen_compose = set(), set()
        units: dict[str, list[Config]] = {"generator": [], "e2e_memory": [], "e2e_mp4": [], "audio": [],
                                          "compose": []}
        for cfg in self.configs:
            if not cfg.is_baseline:
                units["generator"].append(cfg)
            units["e2e_memory"].append(cfg)
            units["e2e_mp4"].append(cfg)
            rk = (cfg.backend, cfg.device, cfg.precision)
            if rk not in seen_audio:
                seen_audio.add(rk)
                units["audio"].append(cfg)
            if not cfg.is_baseline:
                runner = self.runners[rk]
                ck = (cfg.device, str(runner.dtype), cfg.batch)
                if ck not in seen_compose:
                    seen_compose.add(ck)
                    units["compose"].append(cfg)
        for r in range(self.args.repeat):
            for kind, cfgs in units.items():
                if not cfgs:
                    continue
                k = r % len(cfgs)
                for cfg in cfgs[k:] + cfgs[:k]:
                    steps.append((r, kind, cfg))
        return steps

    def run(self) -> dict:
        """Set up, then take every sample of `plan`; returns the seconds spent measuring."""
        from tqdm import tqdm

        with tqdm(total=len(self.configs), desc="bench setup", unit="config", file=sys.stderr,
                  disable=self.args.no_progress) as bar:
            self.setup(bar)
        steps = self.plan()
        t0 = time.perf_counter()
        with tqdm(total=len(steps), desc="bench", unit="sample", file=sys.stderr,
                  disable=self.args.no_progress) as bar:
            for r, kind, cfg in steps:
                bar.set_postfix_str(f"round {r + 1}/{self.args.repeat} {kind} {cfg.key}")
                self.sample(kind, cfg)
                bar.update(1)
        measured_s = time.perf_counter() - t0
        self._share()
        return {"measure_seconds": measured_s}

    def _share(self) -> None:
        """Audio-path samples belong to every batch size of a runner; compose samples to every config with
        the same device, input dtype and batch size (each was measured once per round for all of them)."""
        by_runner, by_compose = {}, {}
        for cfg in self.configs:
            rk = (cfg.backend, cfg.device, cfg.precision)
            s = self.results[cfg.key]["samples"]
            if "audio_ms_per_s" in s:
                by_runner.setdefault(rk, (cfg.key, s["audio_ms_per_s"]))
            if not cfg.is_baseline and "prepare_ms" in s:
                ck = (cfg.device, str(self.runners[rk].dtype), cfg.batch)
                by_compose.setdefault(ck, (cfg.key, s["prepare_ms"], s["paste_ms"]))
        for cfg in self.configs:
            rk = (cfg.backend, cfg.device, cfg.precision)
            res = self.results[cfg.key]
            s = res["samples"]
            if "audio_ms_per_s" not in s and rk in by_runner:
                s["audio_ms_per_s"] = list(by_runner[rk][1])
                res.setdefault("shared", {})["audio_ms_per_s"] = by_runner[rk][0]
            if not cfg.is_baseline and "prepare_ms" not in s:
                ck = (cfg.device, str(self.runners[rk].dtype), cfg.batch)
                if ck in by_compose:
                    src, p, q = by_compose[ck]
                    s["prepare_ms"], s["paste_ms"] = list(p), list(q)
                    res.setdefault("shared", {})["prepare_ms"] = src
                    res["shared"]["paste_ms"] = src

    def defaults(self) -> dict[str, dict]:
        """Per device, what `auto` picks: the backend and its default batch size (the targets' configuration)."""
        from .. import backends, pipeline

        out = {}
        for dev in self.devices:
            name, d = backends.select("auto", dev, self.args.engines, generator=self.inputs.generator,
                                      audio_encoder=self.inputs.audio_encoder)
            out[str(dev)] = {"backend": name, "batch": pipeline.default_batch_size(d)}
        return out

    def agreement(self) -> dict[str, dict]:
        """Pixel agreement of each configuration's last end-to-end frame with the baseline's on its device:
        a check that every configuration did the same work."""
        agree = {}
        for key, frame in self._last_frames.items():
            base = self._last_frames.get(f"baseline/{key.split('/')[1]}/fp32/b1")
            if frame is not None and base is not None and frame.shape == base.shape and not key.startswith("baseline"):
                d = np.abs(frame.astype(np.int16) - base.astype(np.int16))
                agree[key] = {"identical": float((d == 0).mean()), "within_2": float((d <= 2).mean()),
                              "max_abs": int(d.max())}
        return agree

    def close(self) -> None:
        for r in self.runners.values():
            with contextlib.suppress(Exception):
                if r is not None and hasattr(r, "close"):
                    r.close()


def _err(exc: BaseException) -> str:
    """An exception as one short line for the report."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"
