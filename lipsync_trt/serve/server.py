"""The aiohttp app: the WebSocket at ws://HOST:PORT/ and the browser client at http://HOST:PORT/ (same path,
told apart by the Upgrade header), static files, the avatars' template frames and metadata for the page,
and /stats. Model names are keys of the registry built at start-up, never paths.
"""
from __future__ import annotations

import asyncio
import functools
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import recipe as R
from ..errors import AudioError, UsageError
from .protocol import (MAX_GAP_CHUNKS, MAX_MESSAGE_BYTES, WS_MAX_MESSAGE_BYTES, ProtocolError, Status,
                       decode_request, error_response)
from .scheduler import POLICIES, ModelEntry, Scheduler
from .session import END, Stream, ready_chunk, ready_chunk_period

STATIC = Path(__file__).resolve().parent / "static"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass
class ServeConfig:
    avatars: dict[str, str]                    # NAME -> avatar folder
    generators: dict[str | None, str]          # NAME -> G.pth; None -> the default for all other avatars
    audio_encoder: str
    backend: str = "auto"
    device: str = "auto"
    precision: str = "fp32"
    host: str = "127.0.0.1"
    port: int = 8084
    max_batch: int = 8
    max_wait_ms: float = 10.0
    max_streams: int = 64
    max_queue: int = 50                        # frames in flight per stream before the overload policy applies
    max_delay_ms: float = 1000.0               # a frame not started this long after its last chunk arrived gets
                                               # the overload policy instead of the generator; 0 = no deadline
    policy: str = "reject"
    jpeg_quality: int = 95
    max_message: int = MAX_MESSAGE_BYTES
    max_gap: int = MAX_GAP_CHUNKS
    encode_threads: int = 2
    slow_client_s: float = 5.0                 # outgoing queue over its limit this long = client too slow (1008)
    options: dict = field(default_factory=dict)   # passed to backends.load (e.g. engines)

    def check(self) -> None:
        if not self.avatars:
            raise UsageError("serve needs at least one --avatar NAME=DIR (or --demo)")
        for name in self.avatars:
            if not NAME_RE.match(name):
                raise UsageError(f"--avatar {name!r}: a name is 1-64 letters, digits, '_', '.' or '-'")
        for name in self.generators:
            if name is not None and name not in self.avatars:
                raise UsageError(f"--generator {name}=...: no --avatar named {name!r}")
        missing = [n for n in self.avatars if n not in self.generators and None not in self.generators]
        if missing:
            raise UsageError(f"no generator for avatar(s) {', '.join(missing)}: give --generator NAME=G.pth or a bare "
                             "--generator G.pth for all")
        if self.policy not in POLICIES:
            raise UsageError(f"--policy must be one of {', '.join(POLICIES)}")
        for key, lo in (("max_batch", 1), ("max_streams", 1), ("max_queue", 1)):
            if getattr(self, key) < lo:
                raise UsageError(f"--{key.replace('_', '-')} must be at least {lo}")
        if self.max_wait_ms < 0:
            raise UsageError("--max-wait-ms must not be negative")
        if not self.max_delay_ms >= 0:
            raise UsageError("--max-delay-ms must not be negative (0: no deadline)")
        if not 1 <= self.jpeg_quality <= 100:
            raise UsageError("--jpeg-quality must be within 1..100")


def load_models(cfg: ServeConfig) -> tuple[dict[str, ModelEntry], object]:
    """Load every avatar and one runner per distinct generator checkpoint (all with the shared audio encoder)."""
    from .. import avatar as avatar_mod
    from .. import backends

    cfg.check()
    runners: dict[str, object] = {}
    entries = {}
    for name, folder in cfg.avatars.items():
        gen = str(cfg.generators.get(name, cfg.generators.get(None)))
        if gen not in runners:
            runners[gen] = backends.load(cfg.backend, gen, cfg.audio_encoder, cfg.device, cfg.precision, **cfg.options)
        entries[name] = ModelEntry(name=name, avatar=avatar_mod.load(folder), runner=runners[gen])
    return entries, next(iter(runners.values()))


@functools.lru_cache(maxsize=1)
def ready_rule() -> dict:
    """meta.json's readiness rule: frame i is made once chunk i + offsets[i % period] has arrived (one period)."""
    period = ready_chunk_period()
    return {"ready_chunk_offsets": [ready_chunk(i) - i for i in range(period or 64)],
            "ready_chunk_period": period,
            "ready_chunk_note": "video frame i is made once chunk i + ready_chunk_offsets[i % ready_chunk_period] "
                                "has arrived" if period else "the first 64 frames only; after them 12 at most"}


class Connection:
    """One WebSocket: its streams one after another (a new stream may start after the previous one's end),
    their responses in order, a bounded outgoing queue."""

    def __init__(self, server: "Server", ws):
        self.server, self.ws = server, ws
        self.out: asyncio.Queue = asyncio.Queue()
        self.streams: list[Stream] = []           # the first is the one whose responses go out now
        self.current: Stream | None = None        # the stream taking audio
        self.pending: dict[int, list[bytes]] = {}
        self.closed = False
        self.over_since: float | None = None      # when the outgoing queue last reached out_limit

    def send(self, msg: bytes) -> None:
        """Queue a response. A client is too slow (closed with 1008) when its queue has stayed at or above
        out_limit for slow_client_s: a burst (many in-order answers released at once) drains in milliseconds
        and is not a slow client."""
        if self.closed:
            return
        if self.out.qsize() >= self.server.out_limit:
            now = time.monotonic()
            if self.over_since is None:
                self.over_since = now
            elif now - self.over_since > self.server.cfg.slow_client_s:
                self.closed = True
                self.server.stats["slow_clients"] += 1
                asyncio.ensure_future(self.ws.close(code=1008, message=b"client too slow: responses not read"))
                return
        self.out.put_nowait(msg)

    def emit(self, stream: Stream, msg: bytes) -> None:
        if self.streams and stream is self.streams[0]:
            self.send(msg)
        else:
            self.pending.setdefault(id(stream), []).append(msg)

    def stream_done(self, stream: Stream) -> None:
        self.server.active.discard(stream)
        if stream in self.streams:
            self.streams.remove(stream)
        if self.current is stream:
            self.current = None
        while self.streams:                       # the next stream's held responses go out now
            nxt = self.streams[0]
            for msg in self.pending.pop(id(nxt), []):
                self.send(msg)
            if not nxt.done:
                break

    async def writer(self) -> None:
        while True:
            msg = await self.out.get()
            if msg is None or self.ws.closed:
                return
            await self.ws.send_bytes(msg)
            if self.over_since is not None and self.out.qsize() < self.server.out_limit:
                self.over_since = None

    def on_message(self, data: bytes) -> None:
        srv = self.server
        srv.stats["requests"] += 1
        try:
            req = decode_request(data, srv.cfg.max_message)
        except ProtocolError as exc:
            srv.stats[f"error_{exc.status.name.lower()}"] += 1
            self.send(error_response(exc.status, exc.frame_id, exc.reason))
            return
        entry = srv.entries.get(req.model)
        if entry is None:
            srv.stats["error_unknown_model"] += 1
            self.send(error_response(Status.UNKNOWN_MODEL, req.frame_id, f"unknown model {req.model[:64]!r}; "
                                     f"this server has: {', '.join(sorted(srv.entries))}"))
            return
        stream = self.current
        if stream is not None and stream.model != req.model:
            srv.stats["error_malformed"] += 1
            self.send(error_response(Status.MALFORMED, req.frame_id, f"model changed from {stream.model!r} to "
                                     f"{req.model!r} mid-stream; end the stream (audio length 0) first"))
            return
        if stream is None:
            if len(srv.active) >= srv.cfg.max_streams:
                srv.stats["error_overloaded"] += 1
                self.send(error_response(Status.OVERLOADED, req.frame_id,
                                         f"server overloaded: {srv.cfg.max_streams} streams already open"))
                return
            stream = Stream(req.model, entry, asyncio.get_running_loop(), self.emit, srv.cfg.max_gap)
            stream.on_done = self.stream_done
            self.current = stream
            self.streams.append(stream)
            srv.active.add(stream)
            srv.stats["streams"] += 1
        if req.end:
            self.current = None
            try:
                first, windows, n = stream.front.finish()
            except AudioError as exc:
                stream.deliver(0, (END, error_response(Status.END, 0, f"stream too short for a frame: {exc}"),
                                   None, None))
                return
            srv.scheduler.submit(stream, first, windows, n)
            return
        try:
            got = stream.front.push(req.frame_id, req.audio)
        except ProtocolError as exc:
            srv.stats["error_malformed"] += 1
            self.send(error_response(exc.status, exc.frame_id, exc.reason))
            return
        if got is not None and len(got[1]):
            srv.scheduler.submit(stream, got[0], got[1])

    def close(self) -> None:
        self.closed = True
        for s in self.streams + ([self.current] if self.current else []):
            s.closed = True
            s.done = True
            self.server.active.discard(s)
        self.streams.clear()
        self.current = None
        self.out.put_nowait(None)


class Server:
    def __init__(self, cfg: ServeConfig, entries: dict[str, ModelEntry], encoder):
        self.cfg, self.entries = cfg, entries
        self.scheduler = Scheduler(encoder, cfg.max_batch, cfg.max_wait_ms / 1000, cfg.max_queue, cfg.policy,
                                   cfg.jpeg_quality, cfg.encode_threads, max_delay=cfg.max_delay_ms / 1000)
        self.active: set[Stream] = set()
        self.sockets: set = set()                 # open WebSockets, closed with 1001 (going away) at shutdown
        self.stats = self.scheduler.stats
        self.out_limit = 4 * cfg.max_queue + 64
        self.started = time.time()

    def app(self):
        from aiohttp import web

        app = web.Application(client_max_size=1 << 16)
        app.router.add_get("/", self.root)
        app.router.add_get("/stats", self.get_stats)
        app.router.add_get("/avatars.json", self.get_avatars)
        app.router.add_get("/avatar/{name}/meta.json", self.get_meta)
        app.router.add_get(r"/avatar/{name}/frame/{n:\d{1,7}}.jpg", self.get_frame)
        app.router.add_static("/static/", STATIC, show_index=False, follow_symlinks=False)
        app.on_startup.append(self._startup)
        app.on_shutdown.append(self._shutdown)
        return app

    async def _startup(self, _app) -> None:
        self.scheduler.start()

    async def _shutdown(self, _app) -> None:
        # without this the handlers of connected clients would keep aiohttp's shutdown waiting for its timeout
        from aiohttp import WSCloseCode

        await asyncio.gather(*[ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")
                               for ws in list(self.sockets)], return_exceptions=True)
        await asyncio.get_running_loop().run_in_executor(None, self.scheduler.stop)

    async def root(self, request):
        from aiohttp import web

        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self.websocket(request)
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def websocket(self, request):
        from aiohttp import WSMsgType, web

        ws = web.WebSocketResponse(max_msg_size=WS_MAX_MESSAGE_BYTES, compress=False, heartbeat=30)
        await ws.prepare(request)
        conn = Connection(self, ws)
        writer = asyncio.ensure_future(conn.writer())
        self.stats["connections"] += 1
        self.sockets.add(ws)
        try:
            async for msg in ws:
                if msg.type == WSMsgType.BINARY:
                    try:
                        conn.on_message(msg.data)
                    except Exception as exc:   # a bug must not take the connection (or the server) down
                        self.stats["error_internal"] += 1
                        conn.send(error_response(Status.INTERNAL, 0, f"internal error: {exc}"[:200]))
                elif msg.type == WSMsgType.TEXT:
                    self.stats["error_malformed"] += 1
                    conn.send(error_response(Status.MALFORMED, 0, "text message; the protocol is binary"))
                else:
                    break
                if conn.closed:
                    break
        finally:
            self.sockets.discard(ws)
            conn.close()
            try:
                await asyncio.wait_for(writer, timeout=5)
            except (asyncio.TimeoutError, Exception):
                writer.cancel()
        return ws

    def _entry(self, request) -> ModelEntry:
        from aiohttp import web

        entry = self.entries.get(request.match_info["name"])
        if entry is None:
            raise web.HTTPNotFound(text="unknown avatar")
        return entry

    async def get_avatars(self, request):
        from aiohttp import web

        return web.json_response({"avatars": sorted(self.entries), "chunk_samples": 960, "rate": 24000})

    async def get_meta(self, request):
        from aiohttp import web

        e = self._entry(request)
        a = e.avatar
        period = 2 * (a.count - 1)
        return web.json_response({
            "name": e.name, "width": a.width, "height": a.height, "count": a.count, "fps": R.FPS,
            "boxes": a.boxes.tolist(), "order": [int(v) for v in a.order(period)],
            "order_note": "video frame i uses template order[i % len(order)]",
            **ready_rule(),
        })

    async def get_frame(self, request):
        from aiohttp import web

        e = self._entry(request)
        n = int(request.match_info["n"])
        if not 0 <= n < e.avatar.count:
            raise web.HTTPNotFound(text="no such frame")
        return web.FileResponse(e.avatar.frame_path(n), headers={"Cache-Control": "max-age=3600"})

    async def get_stats(self, request):
        from aiohttp import web

        lat = np.asarray(self.scheduler.latency, np.float64) * 1000
        pct = {f"p{q}": round(float(np.percentile(lat, q)), 2) for q in (50, 90, 99)} if lat.size else {}
        return web.json_response({"active_streams": len(self.active), "queued_frames": self.scheduler.queued(),
                                  "counters": dict(self.stats), "ready_to_zip_ms": pct,
                                  "uptime_s": round(time.time() - self.started, 1)})


async def start(cfg: ServeConfig, entries=None, encoder=None):
    """Start serving on the running loop; returns (aiohttp AppRunner, Server, bound port)."""
    from aiohttp import web

    if entries is None:
        entries, encoder = load_models(cfg)
    server = Server(cfg, entries, encoder)
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, server, port


class ServerThread:
    """The server on its own event loop in a background thread (tests, benchmarks): .url, .port, .stop()."""

    def __init__(self, cfg: ServeConfig, entries=None, encoder=None):
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._args = (cfg, entries, encoder)
        self.thread = threading.Thread(target=self._main, name="lipsync-serve", daemon=True)
        self.thread.start()
        self._ready.wait(600)
        if self._error:
            raise self._error

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.runner, self.server, self.port = self.loop.run_until_complete(start(*self._args))
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self.host = self._args[0].host
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.runner.cleanup())
        self.loop.close()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/"

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=60)


def run(cfg: ServeConfig) -> None:
    """Serve until Ctrl-C (the CLI)."""
    import sys

    async def main():
        runner, server, port = await start(cfg)
        print(f"serving {', '.join(sorted(server.entries))} on http://{cfg.host}:{port}/ (WebSocket ws://{cfg.host}:"
              f"{port}/), backend {next(iter(server.entries.values())).runner.name}", file=sys.stderr, flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    asyncio.run(main())
