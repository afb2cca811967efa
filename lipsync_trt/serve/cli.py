"""`python -m lipsync_trt serve`: the streaming server (see docs/PROTOCOL.md)."""
from __future__ import annotations

import argparse
import sys
import tempfile

from ..cli_args import add_backend_args, add_blend_arg
from ..errors import UsageError
from .protocol import MAX_MESSAGE_BYTES
from .scheduler import POLICIES


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "serve", help="real-time streaming server: WebSocket protocol + browser client",
        description="Serve live lip sync: clients send 40 ms chunks of 24 kHz audio over a binary WebSocket at "
                    "ws://HOST:PORT/ and get each video frame's mouth region back (docs/PROTOCOL.md); the browser "
                    "client is at http://HOST:PORT/.")
    p.add_argument("--avatar", action="append", default=[], metavar="NAME=DIR",
                   help="an avatar folder (full_body_img/N.jpg + landmarks/N.lms) served under NAME, the model "
                        "name clients send; NAME is 1-64 letters, digits, '_', '.', '-'. Repeat for several")
    p.add_argument("--generator", action="append", default=[], metavar="[NAME=]G.pth",
                   help="generator checkpoint for avatar NAME, or a bare path for every avatar without its own")
    p.add_argument("--audio-encoder", metavar="A.pth",
                   help="the audio encoder checkpoint (audio_visual_encoder.pth), shared by all avatars")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8084, help="port (default 8084; 0 = any free port, printed at start)")
    add_backend_args(p)
    add_blend_arg(p)
    p.add_argument("--max-batch", type=int, default=None, metavar="N",
                   help="most frames per generator call, taken across all streams that share a generator (default: "
                        "1 on a CPU, where the generator is fastest one frame at a time; 8 on CUDA)")
    p.add_argument("--max-wait-ms", type=float, default=10.0, metavar="MS",
                   help="longest a ready frame waits for a fuller batch (default 10 ms)")
    p.add_argument("--max-streams", type=int, default=64, metavar="N",
                   help="concurrent streams on the whole server; a new stream beyond it is answered OVERLOADED "
                        "(default 64)")
    p.add_argument("--max-queue", type=int, default=50, metavar="N",
                   help="frames of one stream in flight (queued or being made) before the overload policy applies "
                        "to its next frames (default 50 = 2 s of video)")
    p.add_argument("--max-delay-ms", type=float, default=1000.0, metavar="MS",
                   help="deadline of a frame, counted from the arrival of the last chunk it needs (so on top of the "
                        "algorithmic delay): a frame that has waited longer when the scheduler takes it is not "
                        "generated but gets the overload policy. Bounds the wait in time whatever the number of "
                        "streams (--max-queue alone allows streams x max-queue frames). Default 1000; 0 = none")
    p.add_argument("--policy", default="reject", choices=POLICIES,
                   help="when a stream's queue is full or a frame is past --max-delay-ms: reject (answer OVERLOADED "
                        "for the frame) or skip (send the last mouth again, marked reused)")
    p.add_argument("--jpeg-quality", type=int, default=95, metavar="Q",
                   help="JPEG quality 1-100 of the returned mouth (default 95)")
    p.add_argument("--max-message", type=int, default=MAX_MESSAGE_BYTES, metavar="BYTES",
                   help=f"largest request answered normally; larger ones get MALFORMED (default {MAX_MESSAGE_BYTES}; "
                        "WebSocket messages over 1 MiB close the connection)")
    p.add_argument("--stream-idle-s", type=float, default=10.0, metavar="S",
                   help="a stream that gets no audio chunk for this long is ended by the server as if the client had "
                        "ended it: its last frames are made, then END (whose error.txt says why), and its "
                        "--max-streams slot is free again; the next chunk starts a new stream (ids from 0). "
                        "Default 10; 0 = never")
    p.add_argument("--http-idle-s", type=float, default=15.0, metavar="S",
                   help="an HTTP connection that goes this long without a complete request (request line and "
                        "headers) is closed: counted from its opening (a client that sends nothing or half a header) "
                        "or from its last response (an idle keep-alive connection). WebSockets are not affected once "
                        "open. Default 15")
    p.add_argument("--ws-idle-s", type=float, default=120.0, metavar="S",
                   help="a WebSocket with no stream open or being answered that receives no message for this long is "
                        "closed (code 1000); the browser client reconnects. Default 120; 0 = never")
    p.add_argument("--demo", action="store_true",
                   help="also serve the synthetic avatar 'demo' with seeded UNTRAINED weights (no files needed)")
    p.add_argument("--webrtc", action="store_true",
                   help="also serve WebRTC on the same port (needs the extra [webrtc]: aiortc): POST /offer with "
                        '{"sdp", "type": "offer", "model": NAME} answers {"sdp", "type": "answer"}; the page is '
                        "/webrtc.html. Each peer is one live stream (microphone in, the avatar's video and voice out "
                        "at 25 fps), counted in --max-streams (docs/LIVE.md)")
    p.add_argument("--webrtc-size", metavar="WxH",
                   help="scale the WebRTC video to WxH (even numbers; default: the avatar's own size)")
    p.add_argument("--webrtc-wait-ms", type=float, default=30.0, metavar="MS",
                   help="a WebRTC frame not made this long after its 40 ms tick goes out on time as the template "
                        "frame (counted late) instead of stalling the video (default 30)")
    p.add_argument("--webrtc-silence-db", type=float, default=-50.0, metavar="DB",
                   help="incoming WebRTC audio quieter than this (dBFS) for 0.5 s is silence: not pushed, so the "
                        "avatar shows idle frames (the template, no generator call) (default -50)")
    p.set_defaults(handler=run_serve)   # (the top-level CLI adds --ray and its handler: lipsync_trt.__main__)
    return p


def _split(spec: str, flag: str) -> tuple[str | None, str]:
    name, sep, path = spec.partition("=")
    if not sep:
        return None, spec
    if not name or not path:
        raise UsageError(f"{flag} {spec!r}: expected NAME=PATH")
    return name, path


def config_from_args(args: argparse.Namespace, tmpdir: str | None = None):
    from .config import ServeConfig

    avatars: dict[str, str] = {}
    for spec in args.avatar:
        name, path = _split(spec, "--avatar")
        if name is None:
            raise UsageError(f"--avatar {spec!r}: expected NAME=DIR (NAME is the model name clients send)")
        if name in avatars:
            raise UsageError(f"--avatar {name!r} given twice")
        avatars[name] = path
    generators: dict[str | None, str] = {}
    for spec in args.generator:
        name, path = _split(spec, "--generator")
        if name in generators:
            raise UsageError(f"--generator for {name or 'all avatars'} given twice")
        generators[name] = path
    encoder = args.audio_encoder
    if args.demo:
        from ..demo import UNTRAINED_NOTE, demo_checkpoints, make_avatar

        if "demo" in avatars:
            raise UsageError("--demo serves the avatar 'demo'; choose another name for your --avatar")
        gen, enc = demo_checkpoints(tmpdir)
        avatars["demo"] = str(make_avatar(f"{tmpdir}/avatar"))
        generators.setdefault("demo", str(gen))
        encoder = encoder or str(enc)
        print(UNTRAINED_NOTE, file=sys.stderr)
    missing = [flag for flag, given in (("--avatar NAME=DIR", avatars), ("--generator [NAME=]G.pth", generators),
                                        ("--audio-encoder A.pth", encoder)) if not given]
    if missing:
        raise UsageError(f"serve needs {', '.join(missing)} (or --demo)")
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port must be within 0..65535 (0: any free port), got {args.port}")
    return ServeConfig(avatars=avatars, generators=generators, audio_encoder=encoder, backend=args.backend,
                       device=args.device, precision=args.precision, host=args.host, port=args.port,
                       max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_streams=args.max_streams,
                       max_queue=args.max_queue, max_delay_ms=args.max_delay_ms, policy=args.policy,
                       jpeg_quality=args.jpeg_quality, max_message=args.max_message,
                       stream_idle_s=args.stream_idle_s, http_idle_s=args.http_idle_s, ws_idle_s=args.ws_idle_s,
                       blend=args.blend, webrtc=args.webrtc, webrtc_size=args.webrtc_size,
                       webrtc_wait_ms=args.webrtc_wait_ms, webrtc_silence_db=args.webrtc_silence_db,
                       options={"engines": args.engines} if args.engines else {})


def run_serve(args: argparse.Namespace) -> int:
    """The plain server, one process (`serve --ray` goes to lipsync_trt.distributed.cli.cmd_serve first)."""
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise UsageError("serve needs aiohttp: pip install 'lipsync_trt[serve]'") from None
    if args.webrtc:
        from .webrtc import missing

        if missing():
            raise UsageError(missing())
    from .server import run

    with tempfile.TemporaryDirectory(prefix="lipsync_serve_") as tmp:
        cfg = config_from_args(args, tmp)
        cfg.check()
        try:
            run(cfg)
        except OSError as exc:
            raise UsageError(f"cannot listen on {cfg.host}:{cfg.port}: {exc.strerror or exc}") from None
    return 0
