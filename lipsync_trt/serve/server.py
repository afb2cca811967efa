"""The server and how it runs: `Server` (the avatars, the packer with the batcher every stream shares, the open
streams and sockets, the idle sweep) with its aiohttp app: the WebSocket at ws://HOST:PORT/ and the browser client
at http://HOST:PORT/ (same path, told apart by the Upgrade header), static files, the avatars' template frames and
metadata for the page, /stats and /metrics; `start` on a running loop, `ServerThread` (tests, benchmarks) and
`run` (the CLI). Model names are keys of the registry built at start-up, never paths. The options are in config.py,
one client connection in connection.py, the HTTP answers as plain data in routes.py.
"""
from __future__ import annotations

import asyncio
import threading
import time

from . import routes
from .config import ServeConfig, default_max_batch, load_models
from .connection import Connection, Socket
from .protocol import WS_MAX_MESSAGE_BYTES, Status, error_response
from .scheduler import ModelEntry, Packer
from .session import WireStream

STATIC = routes.STATIC


class Server:
    def __init__(self, cfg: ServeConfig, entries: dict[str, ModelEntry], encoder):
        self.cfg, self.entries = cfg, entries
        self.max_batch = cfg.max_batch or default_max_batch(encoder.device)
        self.packer = Packer(encoder, self.max_batch, cfg.max_wait_ms / 1000, cfg.max_queue, cfg.policy,
                             cfg.jpeg_quality, cfg.encode_threads, max_delay=cfg.max_delay_ms / 1000)
        self.active: set[WireStream] = set()
        self.sockets: set = set()                 # open WebSockets, closed with 1001 (going away) at shutdown
        self.connections: set[Connection] = set()
        self._sweeper: asyncio.Future | None = None
        self.stats = self.packer.stats
        self.out_limit = 4 * cfg.max_queue + 64
        self.started = time.time()

    def app(self):
        from aiohttp import web

        app = web.Application(client_max_size=1 << 16)
        app.router.add_get("/", self.root)
        app.router.add_get("/stats", self.get_stats)
        app.router.add_get("/metrics", self.get_metrics)
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
        self.packer.start()
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
        await asyncio.get_running_loop().run_in_executor(None, self.packer.stop)

    async def root(self, request):
        from aiohttp import web

        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self.websocket(request)
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    def open(self, sock: Socket, transport=None) -> tuple[Connection, asyncio.Future]:
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

    # -- aiohttp's answers to the plain data of routes.py
    @staticmethod
    def _json(fn, *args):
        from aiohttp import web

        try:
            return web.json_response(fn(*args))
        except routes.NotFound as exc:
            raise web.HTTPNotFound(text=str(exc)) from None

    async def get_avatars(self, request):
        return self._json(routes.avatars, self)

    async def get_meta(self, request):
        return self._json(routes.meta, self, request.match_info["name"])

    async def get_stats(self, request):
        return self._json(routes.stats, self)

    async def get_frame(self, request):
        from aiohttp import web

        try:
            path = routes.frame_path(self, request.match_info["name"], request.match_info["n"])
        except routes.NotFound as exc:
            raise web.HTTPNotFound(text=str(exc)) from None
        return web.FileResponse(path, headers={"Cache-Control": "max-age=3600"})

    async def get_metrics(self, request):
        from aiohttp import web

        body, content_type = routes.metrics(self)
        return web.Response(body=body, headers={"Content-Type": content_type})


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
              f"{port}/), backend {next(iter(server.entries.values())).runner.name}, max batch {server.max_batch}",
              file=sys.stderr, flush=True)
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
