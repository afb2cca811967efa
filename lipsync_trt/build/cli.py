"""The command line of `python -m lipsync_trt.build`."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..errors import UsageError, run_command


def build_parser() -> argparse.ArgumentParser:
    from .builder import DEFAULT_BATCH, DEFAULT_OUT, PRECISIONS, TARGETS   # (torch: inside run_command, see main)

    p = argparse.ArgumentParser(
        prog="python -m lipsync_trt.build",
        description="Export the generator and audio encoder to ONNX, check them against PyTorch, and build "
                    "TensorRT engines or Core ML packages. Artifacts go to OUT/<target>-<precision>-<key>/ "
                    "with a manifest.json; an identical request reuses them.")
    p.add_argument("--generator", metavar="G.pth", help="SyncTalk_2D generator checkpoint (Model(6, 'ave') state_dict)")
    p.add_argument("--audio-encoder", metavar="A.pth", help="SyncTalk audio encoder checkpoint")
    p.add_argument("--demo", action="store_true",
                   help="use seeded random (untrained) checkpoints from lipsync_trt.demo instead of --generator/--audio-encoder")
    p.add_argument("--target", default="onnx", choices=TARGETS,
                   help="onnx (default); tensorrt (needs TensorRT and CUDA); coreml (needs coremltools; runs on macOS); "
                        "all (onnx + every engine kind this machine can build; the others are reported as skipped)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="generator precision of the engines (the audio encoder stays fp32); default fp32")
    p.add_argument("--batch", default=":".join(map(str, DEFAULT_BATCH)), metavar="MIN:OPT:MAX",
                   help="batch profile for TensorRT / Core ML (ONNX batch is always dynamic); default %(default)s")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help="output folder (default %(default)s/)")
    p.add_argument("--force", action="store_true", help="rebuild even when a matching build exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command; 0 on success, 2 with one `error: ...` line on stderr for bad input (`run_command`)."""
    return run_command(lambda: _build(build_parser().parse_args(argv)))


def _build(args: argparse.Namespace) -> int:
    from .builder import build, parse_batch

    parse_batch(args.batch)   # a bad --batch before the demo's checkpoints are made or anything loads
    if args.demo:
        if args.generator or args.audio_encoder:
            raise UsageError("--demo makes its own checkpoints; leave out --generator/--audio-encoder")
        from ..demo import demo_checkpoints

        args.generator, args.audio_encoder = demo_checkpoints(Path(args.out) / "demo-checkpoints")
    elif not (args.generator and args.audio_encoder):
        raise UsageError("give --generator G.pth and --audio-encoder A.pth (or --demo)")
    t0 = time.perf_counter()
    m = build(args.generator, args.audio_encoder, target=args.target, precision=args.precision, batch=args.batch,
              out=args.out, force=args.force, progress=not args.quiet)
    print(f"done in {time.perf_counter() - t0:.1f} s: {m['dir']}"
          + "".join(f"\n  {kind}: {', '.join(files.values())}" for kind, files in m["artifacts"].items())
          + "".join(f"\n  skipped {kind}: {why}" for kind, why in m.get("skipped", {}).items()))
    return 0
