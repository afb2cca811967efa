"""python -m lipsync_trt.bench [offline]: backends, batch sizes and stages side by side, against the SyncTalk_2D
baseline (the default benchmark; `python -m lipsync_trt.bench --help` also lists the others).

Every configuration (backend x device x precision x batch size) and the baseline (bench.baseline: the reference's
per-frame structure on the same inputs and device) are loaded once, then measured in rounds: each round takes
one sample of every metric for every configuration, in a rotating order, so that a noisy machine slows all of
them alike. Every figure is also given as a ratio to the baseline. bench/README.md says what each metric times;
docs/BENCHMARKS.md has the recorded numbers.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import tempfile
import time
from pathlib import Path

from ..cli_args import Parser
from .analysis import analyse
from .commands import listing
from .flops import count_flops, matmul_peak
from .inputs import make_inputs
from .machine import loadavg, machine
from .measure import log
from .offline import Bench
from .plot import plot
from .report import SCHEMA, compare, table, write_json

BENCHMARK = ("offline", "backends, batch sizes, precisions and stages against the SyncTalk_2D baseline")
QUICK = {"frames": 1, "repeat": 2, "warmup": 0, "audio_seconds": 1.0}
DEFAULTS = {"frames": 32, "repeat": 3, "warmup": 1, "audio_seconds": 5.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, with --quick or the defaults filled in where not given."""
    p = Parser(prog="python -m lipsync_trt.bench [offline]",
                                description="Compare backends, batch sizes and stages against the SyncTalk_2D "
                                            "baseline;\nwrites a table (stdout), a JSON and a PNG plot.",
                                epilog=listing(), formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("inputs")
    src.add_argument("--avatar", help="avatar folder (SyncTalk_2D layout: full_body_img/, landmarks/)")
    src.add_argument("--audio", help="speech WAV")
    src.add_argument("--generator", help="generator checkpoint (.pth); default: seeded demo weights")
    src.add_argument("--audio-encoder", help="audio encoder checkpoint (.pth); default: seeded demo weights")
    src.add_argument("--demo", action="store_true", help="synthetic avatar, speech and seeded weights")
    src.add_argument("--engines", help="folder of prebuilt ONNX/TensorRT artifacts passed to the backends")
    cfg = p.add_argument_group("configurations")
    cfg.add_argument("--backends", help="comma list (default: every available one); the baseline always runs; "
                     "torch:MODE is the torch backend with torch.compile(mode=MODE), e.g. torch:reduce-overhead "
                     "(CUDA graphs per batch size) or torch:max-autotune; onnxruntime:spin is onnxruntime with its idle "
                     "threads busy-waiting (spinning=True)")
    cfg.add_argument("--devices", help="comma list: cpu, cuda, cuda:1 (default: auto = cuda when present, else cpu)")
    cfg.add_argument("--batch-sizes", help="comma list (default: 1,4 on a CPU, 1,8,32,128 on CUDA)")
    cfg.add_argument("--precisions", help="comma list: fp32, fp16, bf16 (default: fp32 on a CPU, fp32,fp16 on CUDA)")
    run = p.add_argument_group("run")
    run.add_argument("--frames", type=int, help=f"the first N video frames of the audio (default {DEFAULTS['frames']})")
    run.add_argument("--audio-seconds", type=float,
                     help=f"seconds of audio for the audio-path metric (default {DEFAULTS['audio_seconds']:g})")
    run.add_argument("--warmup", type=int, help="untimed generator calls per config after the first (default 1)")
    run.add_argument("--repeat", type=int, help=f"interleaved rounds (default {DEFAULTS['repeat']})")
    run.add_argument("--quick", action="store_true", help="a short run: 1 frame, batch 1, 2 rounds, no warmup")
    out = p.add_argument_group("output")
    out.add_argument("--json", default="bench.json", help="results JSON (default ./bench.json)")
    out.add_argument("--plot", default="bench.png", help="PNG plot (default ./bench.png; 'none' to skip)")
    out.add_argument("--compare", help="an earlier results JSON to show the change against")
    out.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    out.add_argument("--debug", action="store_true", help="print tracebacks of failed samples")
    args = p.parse_args(argv)
    base = QUICK if args.quick else DEFAULTS
    for k in ("frames", "repeat", "warmup", "audio_seconds"):
        if getattr(args, k) is None:
            setattr(args, k, base[k])
    if args.frames < 1 or args.repeat < 1 or args.warmup < 0 or args.audio_seconds <= 0:
        p.error("--frames and --repeat must be >= 1, --warmup >= 0, --audio-seconds > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table (and the comparison), write the JSON and the plot."""
    args = parse_args(argv)
    started = time.perf_counter()
    created = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    info = machine()
    with tempfile.TemporaryDirectory(prefix="lipsync_bench_") as tmpdir:
        tmp = Path(tmpdir)
        inputs = make_inputs(args, tmp)
        for note in inputs.notes:
            log(f"note: {note}")
        bench = Bench(args, inputs, tmp)
        log(f"bench: {len(bench.configs)} configs ({', '.join(c.key for c in bench.configs)}), "
            f"{inputs.frames} frames, {args.repeat} rounds")
        flops = count_flops()
        peaks: dict = {}
        for dev in bench.devices:
            precs = sorted({c.precision for c in bench.configs if c.device == str(dev)}) if dev.type == "cuda" else ["fp32"]
            peaks[str(dev)] = {p: matmul_peak(dev, p, args.quick) for p in precs}
        try:
            timing = bench.run()
        finally:
            bench.close()
        for dev in bench.devices:   # again at the end: the better of the two
            for p in list(peaks[str(dev)]):
                peaks[str(dev)][p] = max(peaks[str(dev)][p], matmul_peak(dev, p, args.quick))
        info["loadavg_end"] = loadavg()
        report = {
            "schema": SCHEMA, "created": created, "command": " ".join([Path(sys.executable).name, "-m",
                                                                         "lipsync_trt.bench"] + sys.argv[1:]),
            "config": {k: v for k, v in vars(args).items()}, "machine": info,
            "inputs": {"avatar": str(inputs.avatar_dir), "audio": str(inputs.audio_src),
                       "generator": str(inputs.generator), "audio_encoder": str(inputs.audio_encoder),
                       "seeded_weights": inputs.seeded_weights, "demo": inputs.demo, "frames": inputs.frames,
                       "audio_seconds": inputs.audio_seconds, "width": bench.avatar.width,
                       "height": bench.avatar.height, "template_frames": bench.avatar.count, "notes": inputs.notes},
            "flops": flops, "peak_gflops": peaks, "memory_method": bench.mem.method,
            "availability": bench.availability, "loads": bench.loads, "defaults": bench.defaults(),
            "skipped": bench.skipped, "results": bench.results, "last_frame_vs_baseline": bench.agreement(),
            "measure_seconds": timing["measure_seconds"],
        }
        analyse(report)
        report["total_seconds"] = time.perf_counter() - started
    text = table(report)
    print(text)
    if args.compare:
        old = json.loads(Path(args.compare).read_text())
        ctext, rows = compare(report, old)
        report["compare"] = {"against": args.compare, "rows": rows}
        print()
        print(ctext)
    write_json(report, args.json)
    log(f"bench: wrote {args.json}")
    if args.plot and args.plot.lower() != "none":
        try:
            plot(report, Path(args.plot))
            log(f"bench: wrote {args.plot}")
        except ImportError:
            log("bench: matplotlib is not installed; no plot (pip install matplotlib)")
    log(f"bench: {report['total_seconds']:.1f} s in all")
    return 0
