"""The server a serving benchmark measures (`python -m lipsync_trt.bench serve`, `webrtc`): `python -m lipsync_trt
serve` started in a subprocess with the benchmark's options (`server_command`, `ServerProcess`), its JSON routes, and
the generator alone at the server's batch (`generator_only`), the ceiling its mouths per second are compared with.
"""
from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from .measure import log


class ServerProcess:
    """`python -m lipsync_trt serve ... --port 0` in a subprocess; .url, .backend, .stop()."""

    LINE = re.compile(r"serving .* on http://([^/:]+):(\d+)/ .*backend (\S+)")

    def __init__(self, cmd: list[str], timeout: float = 900.0):
        self.cmd = cmd
        self.lines: list[str] = []
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self._found = threading.Event()
        self.host = self.port = self.backend = None
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not self._found.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the server did not start:\n" + "".join(self.lines[-30:]))

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            m = self.LINE.search(line)
            if m and not self._found.is_set():
                self.host, self.port, self.backend = m.group(1), int(m.group(2)), m.group(3).rstrip(",")
                self._found.set()

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}/"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


async def get_json(http_url: str, path: str) -> dict:
    import aiohttp

    async with aiohttp.ClientSession() as s:
        async with s.get(http_url + path) as r:
            return await r.json()


def http_of(ws_url: str) -> str:
    return "http" + ws_url[2:] if ws_url.startswith("ws") else ws_url


def generator_only(args, tmp: Path, batch: int, seconds: float) -> dict:
    """Frames per second of the generator alone (no audio encoder, compositing, JPEG or network): the server's
    backend, device and precision, `batch` frames a call, as many calls as fit `seconds` after one warm-up call.
    What the server's mouths/s are compared with; measured in this process before the server starts, so the two do
    not compete for the machine."""
    import torch

    from .. import backends
    from ..demo import demo_checkpoints

    gen, enc = args.generator, args.audio_encoder
    if not (gen and enc) or args.demo:
        g, e = demo_checkpoints(tmp / "generator_only")      # the speed does not depend on the weights
        gen, enc = (gen if not args.demo and gen else str(g)), (enc if not args.demo and enc else str(e))
    options = {"engines": args.engines} if args.engines else {}
    runner = backends.load(args.backend, gen, enc, args.device, args.precision, **options)
    images = torch.rand(batch, 6, 320, 320).to(runner.device, runner.dtype)
    audio = torch.rand(batch, 32, 16, 16).to(runner.device, runner.dtype)
    runner.generate(images, audio)
    calls, t0 = 0, time.perf_counter()
    while calls == 0 or time.perf_counter() - t0 < seconds:
        runner.generate(images, audio)
        calls += 1
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
    wall = time.perf_counter() - t0
    return {"backend": runner.name, "device": str(runner.device), "batch": batch, "calls": calls,
            "seconds": round(wall, 3), "fps": round(calls * batch / wall, 2)}


def server_command(args, tmp: Path, max_k: int) -> tuple[list[str], dict]:
    cmd = [sys.executable, "-m", "lipsync_trt", "serve", "--host", "127.0.0.1", "--port", "0",
           "--backend", args.backend, "--device", args.device, "--precision", args.precision,
           "--max-streams", str(max(64, max_k + 1))]
    for flag in ("max_batch", "max_wait_ms", "max_queue", "max_delay_ms", "policy"):
        v = getattr(args, flag)
        if v is not None:
            cmd += ["--" + flag.replace("_", "-"), str(v)]
    if args.engines:
        cmd += ["--engines", args.engines]
    info = {"seeded_weights": False}
    if args.demo:
        cmd += ["--demo"]
        info.update(name="demo", avatar="demo (synthetic, 256x192, 8 templates)", seeded_weights=True)
        return cmd, info
    gen, enc = args.generator, args.audio_encoder
    if not (gen and enc):
        from ..demo import demo_checkpoints

        g, e = demo_checkpoints(tmp)
        gen, enc = gen or str(g), enc or str(e)
        info["seeded_weights"] = True
        log("note: seeded demo weights (speed does not depend on weight values)")
    cmd += ["--avatar", f"{args.name}={args.avatar}", "--generator", gen, "--audio-encoder", enc]
    info.update(name=args.name, avatar=str(args.avatar), generator=gen, audio_encoder=enc)
    return cmd, info
