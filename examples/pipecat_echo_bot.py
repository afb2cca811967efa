#!/usr/bin/env python
"""Echo bot: your microphone echoed back through a lip-synced avatar in the browser, over Pipecat's SmallWebRTC
transport. No API key, no LLM, no TTS service: the "TTS" is your own voice (above a level gate), so the avatar
mouths what you say about half a second later (the live stream's lookahead) with your voice played back in sync.

    pip install -e '.[pipecat,webrtc]'      # Pipecat + aiortc (this project's [webrtc] extra, no OpenCV pin)
    python examples/pipecat_echo_bot.py --demo                  # synthetic avatar and checkpoints, CPU
    python examples/pipecat_echo_bot.py --avatar DIR --generator G.pth --audio-encoder E.pth [--backend tensorrt]
    python examples/pipecat_echo_bot.py --remote ws://gpu-box:8084/ --model NAME     # mouths made by `serve`

then open http://localhost:7860/ (Chrome or Firefox; localhost counts as a secure origin for the microphone) and
press Start. Use headphones, or leave the browser's echo cancellation on (it is, by default).

The pipeline is the one a voice agent uses, with the echo gate in place of STT -> LLM -> TTS:
    transport.input() -> MicEcho -> LipSyncVideoService -> transport.output()
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

import numpy as np

try:
    from aiohttp import web
    from pipecat.frames.frames import InputAudioRawFrame, TTSAudioRawFrame
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
    from pipecat.transports.base_transport import TransportParams
    from pipecat.transports.smallwebrtc.connection import SmallWebRTCConnection
    from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport
except ImportError as exc:
    sys.exit(f"error: this example needs Pipecat and aiortc: pip install -e '.[pipecat,webrtc]' ({exc})")

try:                                     # Pipecat >= 1.3 names; older ones keep the task/runner names
    from pipecat.pipeline.worker import PipelineParams
    from pipecat.pipeline.worker import PipelineWorker as PipelineTask
    from pipecat.workers.runner import WorkerRunner as PipelineRunner
except ImportError:                      # pragma: no cover
    from pipecat.pipeline.runner import PipelineRunner
    from pipecat.pipeline.task import PipelineParams, PipelineTask

from lipsync_trt.pipecat import LipSyncVideoService

RATE_IN, RATE_OUT = 16000, 24000         # microphone in; the avatar's audio out (both divisible by 25)


class MicEcho(FrameProcessor):
    """The user's microphone as the bot's TTS: audio above `gate_db` dBFS (and `hang_s` after it) goes on as
    TTSAudioRawFrame; silence is not sent, so the avatar shows idle frames (the template, no model call)."""

    def __init__(self, gate_db: float = -45.0, hang_s: float = 0.4):
        super().__init__()
        self.gate = 10 ** (gate_db / 20) * 32768
        self.hang_s = hang_s
        self._open_until = 0.0

    async def process_frame(self, frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            x = np.frombuffer(frame.audio, np.int16).astype(np.float32)
            now = asyncio.get_running_loop().time()
            if len(x) and float(np.sqrt(np.mean(x * x))) >= self.gate:
                self._open_until = now + self.hang_s
            if now < self._open_until:
                await self.push_frame(TTSAudioRawFrame(audio=frame.audio, sample_rate=frame.sample_rate,
                                                       num_channels=frame.num_channels))
        else:
            await self.push_frame(frame, direction)


async def run_bot(connection: SmallWebRTCConnection, make_service, size: tuple[int, int]) -> None:
    h, w = size
    transport = SmallWebRTCTransport(webrtc_connection=connection, params=TransportParams(
        audio_in_enabled=True, audio_in_sample_rate=RATE_IN, audio_out_enabled=True, audio_out_sample_rate=RATE_OUT,
        # not "live": the service marks each image sync_with_audio, so the transport makes it the shown image when
        # the audio before it has been sent (lips with the voice); its video task sends the shown image at 25 fps
        video_out_enabled=True, video_out_is_live=False, video_out_width=w, video_out_height=h,
        video_out_framerate=25))
    service = make_service()
    task = PipelineTask(Pipeline([transport.input(), MicEcho(), service, transport.output()]),
                        params=PipelineParams(audio_in_sample_rate=RATE_IN, audio_out_sample_rate=RATE_OUT),
                        idle_timeout_secs=None)

    @transport.event_handler("on_client_disconnected")
    async def on_client_disconnected(transport, client):
        await task.cancel()

    await PipelineRunner(handle_sigint=False).run(task)
    print(f"session ended: {dict(service.stats)}", flush=True)


PAGE = """<!doctype html><meta charset="utf-8"><title>lipsync_trt echo bot</title>
<body style="font-family:sans-serif;background:#111;color:#ddd;text-align:center">
<h3>lipsync_trt echo bot (Pipecat SmallWebRTC)</h3>
<video id="v" autoplay playsinline style="max-width:90vw;background:#000"></video><br>
<button id="b">Start</button> <span id="s">press Start and allow the microphone; then speak</span>
<script>
const v = document.getElementById('v'), s = document.getElementById('s');
document.getElementById('b').onclick = async () => {
  const mic = await navigator.mediaDevices.getUserMedia({audio: {echoCancellation: true}});
  const pc = new RTCPeerConnection();
  const out = new MediaStream();
  pc.ontrack = (e) => { out.addTrack(e.track); v.srcObject = out; };
  pc.addTransceiver(mic.getAudioTracks()[0], {direction: 'sendrecv'});   // index 0: audio (Pipecat's order)
  pc.addTransceiver('video', {direction: 'recvonly'});                     // index 1: the avatar
  pc.createDataChannel('signalling');
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((ok) => { if (pc.iceGatheringState === 'complete') ok();
    else pc.onicegatheringstatechange = () => pc.iceGatheringState === 'complete' && ok(); });
  const r = await fetch('/api/offer', {method: 'POST', headers: {'Content-Type': 'application/json'},
    body: JSON.stringify({sdp: pc.localDescription.sdp, type: pc.localDescription.type})});
  if (!r.ok) { s.textContent = 'error: ' + await r.text(); return; }
  await pc.setRemoteDescription(await r.json());
  pc.onconnectionstatechange = () => { s.textContent = 'connection: ' + pc.connectionState; };
};
</script>"""


def build(args):
    """(make_service, (height, width)): one LipSync loaded for all sessions, or the remote `serve` box."""
    if args.remote:                      # the video size from the server's avatar (as its browser client reads it)
        import json
        import urllib.request

        from lipsync_trt.pipecat.remote import http_base

        with urllib.request.urlopen(f"{http_base(args.remote)}/avatar/{args.model}/meta.json", timeout=30) as r:
            meta = json.load(r)
        return (lambda: LipSyncVideoService.remote(args.remote, args.model)), (int(meta["height"]), int(meta["width"]))
    import lipsync_trt

    if args.demo:
        from lipsync_trt.demo import make_demo

        d = make_demo(Path(tempfile.gettempdir()) / "lipsync_trt_echo_demo")
        args.avatar, args.generator, args.audio_encoder = d["avatar"], d["generator"], d["audio_encoder"]
    if not (args.avatar and args.generator and args.audio_encoder):
        sys.exit("error: give --demo, or --avatar, --generator and --audio-encoder (or --remote URL --model NAME)")
    ls = lipsync_trt.load(args.avatar, args.generator, args.audio_encoder, backend=args.backend)
    return (lambda: LipSyncVideoService(ls)), (ls.avatar.height, ls.avatar.width)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--demo", action="store_true", help="the synthetic demo avatar and checkpoints (CPU is enough)")
    p.add_argument("--avatar", help="avatar folder (full_body_img/, landmarks/)")
    p.add_argument("--generator", help="generator checkpoint (.pth)")
    p.add_argument("--audio-encoder", help="audio encoder checkpoint (.pth)")
    p.add_argument("--backend", default="auto", help="auto, tensorrt, onnxruntime, torch (default: auto)")
    p.add_argument("--remote", metavar="URL", help="make the mouths on `python -m lipsync_trt serve` at URL (ws://...)")
    p.add_argument("--model", default="default", help="the server's avatar name with --remote")
    p.add_argument("--host", default="localhost")
    p.add_argument("--port", type=int, default=7860)
    args = p.parse_args(argv)
    make_service, size = build(args)
    sessions: set[asyncio.Task] = set()

    async def page(request):
        return web.Response(text=PAGE, content_type="text/html")

    async def offer(request):
        try:
            body = await request.json()
            sdp, kind = body["sdp"], body["type"]
        except Exception:
            return web.json_response({"error": "expected JSON {sdp, type}"}, status=400)
        connection = SmallWebRTCConnection()
        try:
            await connection.initialize(sdp=sdp, type=kind)
        except Exception as exc:
            return web.json_response({"error": f"bad offer: {exc}"}, status=400)
        t = asyncio.ensure_future(run_bot(connection, make_service, size))
        sessions.add(t)
        t.add_done_callback(sessions.discard)
        return web.json_response(connection.get_answer())

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_post("/api/offer", offer)
    print(f"open http://{args.host}:{args.port}/ and press Start (Ctrl-C to stop)", flush=True)
    web.run_app(app, host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
