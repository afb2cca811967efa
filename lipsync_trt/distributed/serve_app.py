"""The streaming server as a Ray Serve application: the same protocol, URL and browser client as
`python -m lipsync_trt serve`, with Ray's HTTP proxy taking the WebSockets and replicas (one per GPU) serving them.

Each replica is the plain server's core (`serve.server.Server`: models, avatars, the cross-stream batcher, the
protocol's `serve.connection.Connection`, the HTTP answers of `serve.routes`) behind a FastAPI ingress; this module is
only the transport. A WebSocket is one request
to Serve, so one replica serves a connection for its whole life. Importable for `serve run` / KubeRay:
`lipsync_trt.distributed.serve_app:build` with args {"argv": "<the serve command's options>"}.
"""

# (no `from __future__ import annotations`: FastAPI must see the WebSocket annotation as a class, not a string)
import shlex

from fastapi import FastAPI, WebSocket
from fastapi.responses import FileResponse, Response
from ray import serve

from ..serve import routes
from ..serve.config import ServeConfig, load_models
from ..serve.routes import STATIC
from ..serve.server import Server

ingress = FastAPI(title="lipsync_trt", docs_url=None, redoc_url=None, openapi_url=None)


class _Socket:
    """A `serve.connection.Socket` (send_bytes, close, closed) over a Starlette WebSocket."""

    def __init__(self, ws: WebSocket):
        self.ws, self.closed = ws, False

    async def send_bytes(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            await self.ws.send_bytes(data)
        except Exception:          # the peer went away; the receive loop sees the disconnect
            self.closed = True

    async def close(self, code: int = 1000, message: bytes = b"", drain: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            await self.ws.close(code=code, reason=message.decode("utf-8", "replace"))
        except Exception:
            pass


def _json(fn, *args, **extra) -> Response:
    """One of the plain server's answers (serve/routes.py) as a Starlette response, serialized as aiohttp's
    json_response does (json.dumps' defaults), so both transports send the same bytes; a missing name or frame is a
    404 with the same text."""
    import json

    try:
        return Response(json.dumps({**fn(*args), **extra}), media_type="application/json")
    except routes.NotFound as exc:
        return Response(str(exc), status_code=404)


@serve.deployment(name="lipsync", health_check_period_s=10, graceful_shutdown_timeout_s=5)
@serve.ingress(ingress)
class Replica:
    """One replica: the models, avatars and batcher of `ServeConfig`, serving the WebSockets Ray routes to it."""

    def __init__(self, cfg: ServeConfig):
        cfg.check()
        entries, encoder = load_models(cfg)
        self.server = Server(cfg, entries, encoder)
        self._started = False

    async def _start(self) -> None:
        if not self._started:       # the model worker and the idle sweep run on this replica's event loop
            self._started = True
            await self.server.start()

    @ingress.websocket("/")
    async def websocket(self, ws: WebSocket) -> None:
        """The plain server's WebSocket loop (`Server.websocket`) over Starlette: messages go to the protocol's
        `Connection`, which answers through `_Socket`."""
        await self._start()
        await ws.accept()
        srv, sock = self.server, _Socket(ws)
        conn, writer = srv.open(sock)
        try:
            while not conn.closed:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                srv.receive(conn, msg.get("bytes"))
        finally:
            await srv.release(sock, conn, writer)
            await sock.close()

    @ingress.get("/")
    async def root(self):
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @ingress.get("/static/{name}")
    async def static(self, name: str):
        path = (STATIC / name).resolve()
        if path.parent != STATIC.resolve() or not path.is_file():
            return Response("not found", status_code=404)
        return FileResponse(path)

    @ingress.get("/avatars.json")
    async def avatars(self):
        return _json(routes.avatars, self.server)

    @ingress.get("/avatar/{name}/meta.json")
    async def meta(self, name: str):
        return _json(routes.meta, self.server, name)

    @ingress.get("/avatar/{name}/frame/{n}.jpg")
    async def frame(self, name: str, n: str):
        try:
            path = routes.frame_path(self.server, name, n)
        except routes.NotFound as exc:
            return Response(str(exc), status_code=404)
        return FileResponse(path, headers={"Cache-Control": "max-age=3600"})

    @ingress.get("/stats")
    async def stats(self):
        """This replica's streams and counters (Ray routes the request to any one replica; `replica_pid` says
        which)."""
        import os

        return _json(routes.stats, self.server, replica_pid=os.getpid())

    @ingress.get("/metrics")
    async def metrics(self):
        """This replica's metrics (Prometheus text; a scraper reaches each replica through Ray's own metrics or
        one request per replica)."""
        body, content_type = routes.metrics(self.server)
        return Response(body, media_type=content_type.split(";")[0], headers={"Content-Type": content_type})

    def check_health(self) -> None:
        """Ray Serve's health probe: the model worker must be alive (a replica without it is replaced)."""
        if self._started and not self.server.packer.batcher.alive:
            raise RuntimeError("the batcher's model thread has stopped")

    async def __del__(self) -> None:
        """Replica shutdown: open WebSockets get 1001 (going away), the batcher stops."""
        if self._started:
            await self.server.shutdown()


def deployment_options(cfg: ServeConfig, replicas: str, gpus: float, cpus: float) -> dict:
    """Serve options: `replicas` 'N' (fixed) or 'MIN-MAX' (autoscaling on open connections), each replica with
    `gpus` GPUs and `cpus` CPUs; a replica accepts more connections than --max-streams so that a stream beyond
    its limit gets OVERLOADED instead of waiting in Ray's queue."""
    options: dict = {"ray_actor_options": {"num_cpus": cpus, "num_gpus": gpus},
                     "max_ongoing_requests": max(16, 4 * cfg.max_streams)}
    lo, sep, hi = replicas.partition("-")
    if sep:
        options["autoscaling_config"] = {"min_replicas": int(lo), "max_replicas": int(hi),
                                         "target_ongoing_requests": max(1, cfg.max_streams // 2)}
    else:
        options["num_replicas"] = int(lo)
    return options


def app(cfg: ServeConfig, replicas: str = "1", gpus: float = 0.0, cpus: float = 1.0):
    """The bound Serve application for `serve.run`."""
    return Replica.options(**deployment_options(cfg, replicas, gpus, cpus)).bind(cfg)


def build(args: dict):
    """Application builder for `serve run lipsync_trt.distributed.serve_app:build argv='...'` and KubeRay's
    RayService (`import_path` + `args: {argv: ...}`): argv holds the `serve` command's options."""
    import argparse

    from ..serve.cli import add_parser, config_from_args
    from .serve_options import add_serve_ray_args, preflight

    argv = args.get("argv", "")
    argv = shlex.split(argv) if isinstance(argv, str) else [str(a) for a in argv]
    parser = argparse.ArgumentParser(prog="lipsync_trt.distributed.serve_app:build")
    sub = parser.add_subparsers(dest="command")
    add_serve_ray_args(add_parser(sub))
    ns = parser.parse_args(["serve", *argv])
    if ns.demo:
        raise ValueError("--demo writes its files into a temporary folder of one machine; give real paths here")
    cfg = config_from_args(ns)
    preflight(cfg)
    return app(cfg, ns.replicas, ns.gpus_per_replica or 0.0, ns.cpus_per_replica or 1.0)


__all__ = ["Replica", "app", "build", "deployment_options", "ingress"]
