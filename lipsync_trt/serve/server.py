"""The aiohttp app: the WebSocket at ws://HOST:PORT/ and the browser client at http://HOST:PORT/ (same path,
told apart by the Upgrade header), static files, the avatars' template frames and metadata for the page,
and /stats. Model names are keys of the registry built at start-up, never paths.
"""
from __future__ import annotations

import asyncio
import functools
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import compose
from .. import recipe as R
from ..errors import AudioError, UsageError
from .protocol import (CHUNK_SAMPLES, HEADER, HEADER_BYTES, MAX_GAP_CHUNKS, MAX_MESSAGE_BYTES, STREAM_RATE,
                       WS_MAX_MESSAGE_BYTES, ProtocolError, Status, decode_request, error_response)
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
    stream_idle_s: float = 10.0                # a stream with no chunk this long is ended by the server; 0 = never
    http_idle_s: float = 15.0                  # an HTTP connection this long without a complete request is closed
    ws_idle_s: float = 120.0                   # a WebSocket with no stream nor message this long is closed; 0 = never
    blend: str = "none"                        # --blend: the mouths' box edge, none or feather[:PX] (compose.parse_blend)
    webrtc: bool = False                       # --webrtc: POST /offer and /webrtc.html (serve/webrtc.py)
    webrtc_size: str | None = None             # --webrtc-size WxH of the sent video (None: the avatar's)
    webrtc_wait_ms: float = 30.0               # --webrtc-wait-ms: a frame not made by then goes out late (template)
    webrtc_silence_db: float = -50.0           # --webrtc-silence-db: quieter incoming audio is not pushed (idle)
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
        compose.parse_blend(self.blend)
        for key, lo in (("max_batch", 1), ("max_streams", 1), ("max_queue", 1)):
            if getattr(self, key) < lo:
                raise UsageError(f"--{key.replace('_', '-')} must be at least {lo}")
        if self.max_wait_ms < 0:
            raise UsageError("--max-wait-ms must not be negative")
        if not self.max_delay_ms >= 0:
            raise UsageError("--max-delay-ms must not be negative (0: no deadline)")
        if not 1 <= self.jpeg_quality <= 100:
            raise UsageError("--jpeg-quality must be within 1..100")
        for key in ("stream_idle_s", "ws_idle_s"):
            if not 0 <= getattr(self, key) < float("inf"):
                raise UsageError(f"--{key.replace('_', '-')} must be a number of seconds >= 0 (0: never)")
        if not 0 < self.http_idle_s < float("inf"):
            raise UsageError("--http-idle-s must be a positive number of seconds")
        if self.webrtc:
            from .webrtc import check_options
            check_options(self)


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

    def __init__(self, server: "Server", ws, transport=None):
        self.server, self.ws, self.transport = server, ws, transport
        self.out: asyncio.Queue = asyncio.Queue()
        self.streams: list[Stream] = []           # the first is the one whose responses go out now
        self.current: Stream | None = None        # the stream taking audio
        self.pending: dict[int, list[bytes]] = {}
        self.closed = False
        self.over_since: float | None = None      # when the outgoing queue last reached out_limit
        self.last_msg = self.last_audio = time.monotonic()   # last message; last chunk for the current stream
        self.notes: dict[Stream, str] = {}        # streams the server ended: the reason their END carries

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
                self.too_slow()
                return
        self.out.put_nowait(msg)

    def too_slow(self) -> None:
        self.closed = True
        self.server.stats["slow_clients"] += 1
        asyncio.ensure_future(self.drop())

    async def drop(self) -> None:
        """Disconnect a client too slow to read its answers (1008) and free its buffers now: the queued answers,
        then the socket, reset rather than left to drain into a peer that does not read."""
        self.closed = True
        while not self.out.empty():
            self.out.get_nowait()
        self.out.put_nowait(None)
        try:       # the close frame, if the socket takes it; not waiting long for the peer's reply
            await asyncio.wait_for(self.ws.close(code=1008, message=b"client too slow: responses not read",
                                                 drain=False), 1.0)
        except Exception:
            pass
        reset(self.transport)

    def emit(self, stream: Stream, msg: bytes) -> None:
        if self.notes and len(msg) == HEADER_BYTES and stream in self.notes:
            status, frame_id, _, _ = HEADER.unpack(msg)
            if status == Status.END:              # a stream the server ended: its END says why
                msg = error_response(Status.END, frame_id, self.notes[stream])
        if self.streams and stream is self.streams[0]:
            self.send(msg)
        else:
            self.pending.setdefault(id(stream), []).append(msg)

    def stream_done(self, stream: Stream) -> None:
        self.server.active.discard(stream)
        self.notes.pop(stream, None)
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
            stream = Stream(req.model, entry, asyncio.get_running_loop(), self.emit, srv.scheduler, srv.cfg.max_gap,
                            feather=compose.parse_blend(srv.cfg.blend))
            stream.on_done = self.stream_done
            self.current = stream
            self.streams.append(stream)
            srv.active.add(stream)
            srv.stats["streams"] += 1
        if req.end:
            self.end_stream(stream)
            return
        self.last_audio = time.monotonic()
        try:
            stream.push(req.frame_id, req.audio)
        except ProtocolError as exc:
            srv.stats["error_malformed"] += 1
            self.send(error_response(exc.status, exc.frame_id, exc.reason))

    def end_stream(self, stream: Stream, note: str | None = None) -> None:
        """End the current stream (the client's end message, or the server's idle limit: then `note` is the END's
        error.txt): its last frames are made, then END."""
        self.current = None
        if note:
            self.notes[stream] = note
        try:
            stream.finish()
        except AudioError as exc:
            reason = f"stream too short for a frame: {exc}"
            stream.deliver(0, (END, error_response(Status.END, 0, f"{note}; {reason}" if note else reason),
                               None, None))

    def check_idle(self, now: float) -> None:
        """The server's sweep: a client too slow even when no new answer comes (send checks the others); end the
        current stream after stream_idle_s without a chunk; close the WebSocket after ws_idle_s without a message
        while it has no stream open or still being answered."""
        cfg = self.server.cfg
        if self.closed:
            return
        if self.over_since is not None and now - self.over_since > cfg.slow_client_s:
            self.too_slow()
        elif self.current is not None:
            if cfg.stream_idle_s and now - self.last_audio >= cfg.stream_idle_s:
                self.server.stats["idle_streams"] += 1
                self.end_stream(self.current, f"no audio for {cfg.stream_idle_s:g} s: the server ended the stream")
        elif not self.streams and cfg.ws_idle_s and now - self.last_msg >= cfg.ws_idle_s:
            self.server.stats["idle_connections"] += 1
            self.closed = True
            asyncio.ensure_future(self.ws.close(code=1000, message=f"idle: no message for {cfg.ws_idle_s:g} s"
                                                .encode()))

    def close(self) -> None:
        self.closed = True
        for s in self.streams + ([self.current] if self.current else []):
            s.closed = True
            s.done = True
            self.server.active.discard(s)
        self.streams.clear()
        self.notes.clear()
        self.current = None
        self.out.put_nowait(None)


class Server:
    def __init__(self, cfg: ServeConfig, entries: dict[str, ModelEntry], encoder):
        self.cfg, self.entries = cfg, entries
        self.scheduler = Scheduler(encoder, cfg.max_batch, cfg.max_wait_ms / 1000, cfg.max_queue, cfg.policy,
                                   cfg.jpeg_quality, cfg.encode_threads, max_delay=cfg.max_delay_ms / 1000)
        self.active: set[Stream] = set()
        self.sockets: set = set()                 # open WebSockets, closed with 1001 (going away) at shutdown
        self.connections: set[Connection] = set()
        self._sweeper: asyncio.Future | None = None
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
        if self.cfg.webrtc:   # before the shutdown hook below: peers close before the model worker stops
            from .webrtc import add_routes
            add_routes(app, self)
        app.on_startup.append(lambda _app: self.start())
        app.on_shutdown.append(lambda _app: self.shutdown())
        return app

    async def start(self) -> None:
        """Start the model worker and the idle sweep (on the running event loop): aiohttp's startup, a Ray replica's."""
        self.scheduler.start()
        self._sweeper = asyncio.ensure_future(self._sweep())

    async def _sweep(self) -> None:
        """Every fraction of the smallest limit: slow clients dropped, idle streams ended, idle WebSockets closed."""
        limits = [t for t in (self.cfg.slow_client_s, self.cfg.stream_idle_s, self.cfg.ws_idle_s) if t > 0]
        if not limits:
            return
        period = min(1.0, min(limits) / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for conn in list(self.connections):
                try:
                    conn.check_idle(now)
                except Exception:     # a bug must not stop the sweep
                    self.stats["error_internal"] += 1

    async def shutdown(self) -> None:
        """Close open WebSockets with 1001 (going away) and stop the model worker."""
        # without this the handlers of connected clients would keep aiohttp's shutdown waiting for its timeout
        from aiohttp import WSCloseCode

        if self._sweeper is not None:
            self._sweeper.cancel()
        await asyncio.gather(*[ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")
                               for ws in list(self.sockets)], return_exceptions=True)
        await asyncio.get_running_loop().run_in_executor(None, self.scheduler.stop)

    async def root(self, request):
        from aiohttp import web

        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self.websocket(request)
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    def open(self, sock, transport=None) -> tuple[Connection, asyncio.Future]:
        """A new WebSocket (aiohttp's, or the Ray replica's wrapper): its Connection and the task writing to it."""
        conn = Connection(self, sock, transport)
        self.stats["connections"] += 1
        self.sockets.add(sock)
        self.connections.add(conn)
        return conn, asyncio.ensure_future(conn.writer())

    def receive(self, conn: Connection, data: bytes | None) -> None:
        """One message of a connection: binary `data`, or None for a text message (not the protocol's)."""
        conn.last_msg = time.monotonic()
        if data is None:
            self.stats["error_malformed"] += 1
            conn.send(error_response(Status.MALFORMED, 0, "text message; the protocol is binary"))
            return
        try:
            conn.on_message(data)
        except Exception as exc:   # a bug must not take the connection (or the server) down
            self.stats["error_internal"] += 1
            conn.send(error_response(Status.INTERNAL, 0, f"internal error: {exc}"[:200]))

    async def release(self, sock, conn: Connection, writer: asyncio.Future) -> None:
        """The connection is gone: its streams end, its writer finishes (or is cancelled after 5 s)."""
        self.sockets.discard(sock)
        self.connections.discard(conn)
        conn.close()
        try:
            await asyncio.wait_for(writer, timeout=5)
        except (asyncio.TimeoutError, Exception):
            writer.cancel()

    async def websocket(self, request):
        from aiohttp import WSMsgType, web

        ws = web.WebSocketResponse(max_msg_size=WS_MAX_MESSAGE_BYTES, compress=False, heartbeat=30)
        await ws.prepare(request)
        conn, writer = self.open(ws, request.transport)
        try:
            async for msg in ws:
                if msg.type not in (WSMsgType.BINARY, WSMsgType.TEXT):
                    break
                self.receive(conn, msg.data if msg.type == WSMsgType.BINARY else None)
                if conn.closed:
                    break
        finally:
            await self.release(ws, conn, writer)
        return ws

    def _entry(self, request) -> ModelEntry:
        from aiohttp import web

        entry = self.entries.get(request.match_info["name"])
        if entry is None:
            raise web.HTTPNotFound(text="unknown avatar")
        return entry

    async def get_avatars(self, request):
        from aiohttp import web

        return web.json_response({"avatars": sorted(self.entries), "chunk_samples": CHUNK_SAMPLES, "rate": STREAM_RATE})

    async def get_meta(self, request):
        from aiohttp import web

        e = self._entry(request)
        a = e.avatar
        period = R.template_period(a.count)
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
    # keepalive_timeout: since aiohttp 3.14.4 it also closes a connection that has not completed its first request
    runner = web.AppRunner(server.app(), access_log=None, keepalive_timeout=cfg.http_idle_s)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, server, port


def reset(transport) -> None:
    """Drop a TCP connection now: abort (asyncio discards its unsent data) with SO_LINGER 0, so the kernel sends
    a reset and frees the socket's buffers instead of keeping them for a peer that does not read."""
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


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
    """Serve until Ctrl-C, SIGTERM or SIGHUP (the CLI). Any of them first closes every WebSocket with 1001 (going
    away; `Server.shutdown`), then ends the command as `errors.run_command` says (one line, 130/143/129). While the
    models load (inside `start`) a signal unwinds at once: no client is connected yet."""
    import signal
    import sys

    from ..errors import STOP_SIGNALS, signal_exception

    async def main() -> int:
        runner, server, port = await start(cfg)
        loop, stop, got = asyncio.get_running_loop(), asyncio.Event(), []
        for sig in STOP_SIGNALS:
            if threading.current_thread() is threading.main_thread() and signal.getsignal(sig) is not signal.SIG_IGN:
                # (a signal ignored at start, nohup, stays ignored)
                loop.add_signal_handler(sig, lambda s=sig: (got.append(s), stop.set()))
        print(f"serving {', '.join(sorted(server.entries))} on http://{cfg.host}:{port}/ (WebSocket ws://{cfg.host}:"
              f"{port}/), backend {next(iter(server.entries.values())).runner.name}", file=sys.stderr, flush=True)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()
        return got[0]

    coro = main()
    try:
        got = asyncio.run(coro)
    except BaseException:
        coro.close()   # a signal before its first step: no "never awaited" warning
        raise
    raise signal_exception(got)
