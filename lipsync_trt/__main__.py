"""Command line: python -m lipsync_trt generate | features | info | serve | batch  (also installed as `lipsync-trt`)."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from .cli_args import Parser, add_backend_args, add_blend_arg
from .errors import OutputError, UsageError, run_command   # (imports nothing heavy: see main)


def _add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--generator", metavar="G.pth", required=required,
                   help="SyncTalk_2D generator checkpoint (a state_dict of Model(6, 'ave'))")
    p.add_argument("--audio-encoder", metavar="A.pth", required=required,
                   help="SyncTalk audio encoder checkpoint (audio_visual_encoder.pth, with or without the "
                        "'audio_encoder.' key prefix)")


def build_parser() -> argparse.ArgumentParser:
    from . import video as V

    parser = Parser(
        prog="lipsync-trt",
        description="SyncTalk_2D lip-sync inference: turn speech audio into a talking-head video of a trained avatar.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser("generate", help="render a WAV into an MP4 (and/or PNG frames)",
                       description="Render speech into a lip-synced video of the avatar: N+2 frames at 25 fps "
                                   "with the input audio muxed as AAC. Output files are written atomically.")
    g.add_argument("--avatar", metavar="DIR", help="avatar folder: full_body_img/N.jpg and landmarks/N.lms")
    g.add_argument("--audio", metavar="WAV", help="speech audio (any rate, mono or stereo, 16/24/32-bit or float)")
    _add_model_args(g, required=False)
    g.add_argument("--out", metavar="OUT.mp4", help="output video (default <audio stem>.mp4 in the current folder, "
                                                    "unless --frames-dir is given)")
    g.add_argument("--frames", metavar="LIST", help="render only these video frames, e.g. 0,1,2,100-139 (inclusive)")
    g.add_argument("--frames-dir", metavar="DIR", help="also write each rendered frame as DIR/{i:06d}.png (RGB PNG)")
    add_backend_args(g)
    g.add_argument("--batch-size", type=int, default=None, help="frames per model call (default 1 on CPU, where it measured fastest; 32 on CUDA)")
    g.add_argument("--start-frame", type=int, default=0, metavar="K",
                   help="ping-pong over template frames K..count-1 only (default 0)")
    g.add_argument("--crf", type=int, default=V.DEFAULT_CRF, help="H.264 quality, 0-51, lower is better (default 20)")
    g.add_argument("--codec", default="libx264", help="video encoder known to PyAV (default libx264; e.g. h264_nvenc)")
    g.add_argument("--preset", default=V.DEFAULT_PRESET, choices=V.X264_PRESETS,
                   help=f"libx264 speed/size trade-off (default {V.DEFAULT_PRESET}: about 3x faster than the "
                        f"reference's {V.REFERENCE_PRESET} on a CPU; the frames are the same, only the encoding differs)")
    g.add_argument("--compile", metavar="MODE", default=None,
                   help="torch backend only: torch.compile the generator with this mode (default, reduce-overhead = "
                        "CUDA graphs per batch size, max-autotune); the first batches then take longer")
    g.add_argument("--demo", action="store_true",
                   help="use a built-in synthetic avatar, seeded UNTRAINED weights and a synthetic clip; "
                        "needs no files (other inputs you give override the demo's)")
    add_blend_arg(g)
    g.add_argument("--quiet", action="store_true", help="no progress bar")

    f = sub.add_parser("features", help="write the mel spectrogram (and encoder features) of a WAV to .npz",
                       description="Write the recipe's mel spectrogram of a WAV ('mel', 80 x T, float32) and, with an "
                                   "audio encoder, the per-window features ('features', N x 512) to an .npz file, "
                                   "written atomically.")
    f.add_argument("--audio", metavar="WAV", required=True,
                   help="speech audio (any rate, mono or stereo; resampled to 16 kHz mono as generate does)")
    f.add_argument("--audio-encoder", metavar="A.pth", help="when given, also write 'features' (N x 512)")
    f.add_argument("--out", metavar="F.npz", required=True, help="output .npz file")
    f.add_argument("--device", default="auto", help="auto, cpu, cuda")

    sub.add_parser("info", help="versions, devices and which backends are usable here (and why not)")

    from .compare import add_parser as add_compare
    add_compare(sub)

    try:
        from .serve.cli import add_parser as add_serve
    except ImportError:
        add_serve = None
    from .distributed.cli import add_parser as add_batch, cmd_serve   # imports no Ray (--ray does)
    from .distributed.serve_options import add_serve_ray_args
    if add_serve is not None:   # serve's --ray lives here, where serve and distributed are both known
        serve = add_serve(sub)
        add_serve_ray_args(serve)
        serve.set_defaults(handler=cmd_serve)
    add_batch(sub)
    return parser


def cmd_generate(args: argparse.Namespace) -> int:
    from . import api
    from .demo import UNTRAINED_NOTE, make_demo

    tmp = None
    try:
        if args.demo:
            tmp = tempfile.TemporaryDirectory(prefix="lipsync_demo_")
            demo = make_demo(tmp.name)
            args.avatar = args.avatar or demo["avatar"]
            args.audio = args.audio or demo["audio"]
            args.generator = args.generator or demo["generator"]
            args.audio_encoder = args.audio_encoder or demo["audio_encoder"]
            print(UNTRAINED_NOTE, file=sys.stderr)
        missing = [f"--{n.replace('_', '-')}" for n in ("avatar", "audio", "generator", "audio_encoder")
                   if not getattr(args, n)]
        if missing:
            raise UsageError(f"generate needs {', '.join(missing)} (or --demo)")
        if args.batch_size is not None and args.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
        if not 0 <= args.crf <= 51:
            raise UsageError(f"--crf must be within 0..51, got {args.crf}")
        out = args.out
        if out is None and args.frames_dir is None:
            out = Path(args.audio).stem + ".mp4"
        from .avatar import avatar_inputs
        from .inputs import check_outputs

        check_outputs([("--out", out), ("--frames-dir", args.frames_dir)],   # before anything loads
                      [("--audio", args.audio), ("--generator", args.generator),
                       ("--audio-encoder", args.audio_encoder), *(("--avatar", p) for p in avatar_inputs(args.avatar))])
        options = {"engines": args.engines} if args.engines else {}
        if args.compile:
            if args.backend != "torch":
                raise UsageError(f"--compile needs --backend torch (got --backend {args.backend})")
            options["compile"] = args.compile
        ls = api.load(args.avatar, args.generator, args.audio_encoder, backend=args.backend, device=args.device,
                      precision=args.precision, batch_size=args.batch_size, start_frame=args.start_frame,
                      blend=args.blend, **options)
        summary = ls.generate(args.audio, out, frames_dir=args.frames_dir, frames=args.frames, crf=args.crf, preset=args.preset,
                              codec=args.codec, progress=not args.quiet)
        print(summary.line())
        return 0
    finally:
        if tmp is not None:
            tmp.cleanup()


def cmd_features(args: argparse.Namespace) -> int:
    import numpy as np

    from . import audio as A
    from . import backends, pipeline
    from .models import load_audio_encoder
    from .inputs import check_outputs
    from .video import check_writable, io_reason

    check_outputs([("--out", args.out)], [("--audio", args.audio), ("--audio-encoder", args.audio_encoder)])
    out = check_writable(args.out)
    wav = A.load_16k(args.audio)
    device = backends.resolve_device(args.device)
    arrays = {}
    if args.audio_encoder:
        from .backends.pytorch import TorchRunner
        from .models import Generator

        runner = TorchRunner(Generator(), load_audio_encoder(args.audio_encoder), device)
        feats = pipeline.encode_features(runner, wav)
        arrays = {"mel": feats.mel.cpu().numpy(), "features": feats.features.cpu().numpy()}
    else:
        import torch
        arrays = {"mel": A.mel(torch.from_numpy(wav).to(device)).cpu().numpy()}
    tmp = out.with_name(f".{out.name}.part.npz")
    try:
        np.savez(tmp, **{k: v.astype(np.float32) for k, v in arrays.items()})
        os.replace(tmp, out)
    except OSError as exc:
        raise OutputError(f"{out}: cannot write ({io_reason(exc)})") from None
    finally:
        tmp.unlink(missing_ok=True)
    print(f"{out}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in arrays.items()))
    return 0


def cmd_info(_: argparse.Namespace) -> int:
    import platform

    import torch

    from . import backends
    from .version import __version__

    print(f"lipsync_trt {__version__}, Python {platform.python_version()}, {platform.system()} {platform.machine()}")
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"cuda:{i} {torch.cuda.get_device_name(i)}")
    else:
        print("CUDA: not available")
    for name, a in backends.available().items():
        print(f"backend {name:12s} {'usable' if a.usable else 'unusable: ' + a.reason}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse and run a command, all inside `run_command`: a signal during the imports and option checks ends the
    command as one at any later moment (one line, 130/143/129)."""
    return run_command(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    handler = {"generate": cmd_generate, "features": cmd_features, "info": cmd_info}.get(args.command,
                                                                                         getattr(args, "handler", None))
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
