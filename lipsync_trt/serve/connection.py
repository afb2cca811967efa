"""One client connection of the seed protocol, whatever carries it: `Connection` decodes requests, opens and ends
streams (`session.WireStream`), holds each stream's answers until the earlier streams' are out, bounds the outgoing
queue (a client too slow to read is dropped) and ends idle streams and sockets. It talks to its socket only through
`Socket` (what aiohttp's WebSocketResponse offers; the Ray Serve replica wraps Starlette's the same way), and to
the server through `Server`'s entries, packer, active set, stats and config.
"""
from __future__ import annotations

import asyncio
import socket
import struct
import time
from typing import Protocol

from .. import compose
from ..errors import AudioError
from .protocol import HEADER, HEADER_BYTES, ProtocolError, Status, decode_request, error_response
from .session import END, WireStream



class Socket(Protocol):
    """What a Connection needs of a WebSocket."""

    closed: bool

    async def send_bytes(self, data: bytes) -> None: ...

    async def close(self, *, code: int = 1000, message: bytes = b"", drain: bool = True) -> None: ...


class Connection:
    """One WebSocket: its streams one after another (a new stream may start after the previous one's end),
    their responses in order, a bounded outgoing queue. `ws` is any `Socket`; `transport` (optional) the asyncio
    transport under it, reset when a client is too slow to read."""

    def __init__(self, server: "Server", ws: "Socket", transport=None):
        self.server, self.ws, self.transport = server, ws, transport
        self.out: asyncio.Queue = asyncio.Queue()
        self.streams: list[WireStream] = []           # the first is the one whose responses go out now
        self.current: WireStream | None = None        # the stream taking audio
        self.pending: dict[int, list[bytes]] = {}
        self.closed = False
        self.over_since: float | None = None      # when the outgoing queue last reached out_limit
        self.last_msg = self.last_audio = time.monotonic()   # last message; last chunk for the current stream
        self.notes: dict[WireStream, str] = {}        # streams the server ended: the reason their END carries

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

    def emit(self, stream: WireStream, msg: bytes) -> None:
        if self.notes and len(msg) == HEADER_BYTES and stream in self.notes:
            status, frame_id, _, _ = HEADER.unpack(msg)
            if status == Status.END:              # a stream the server ended: its END says why
                msg = error_response(Status.END, frame_id, self.notes[stream])
        if self.streams and stream is self.streams[0]:
            self.send(msg)
        else:
            self.pending.setdefault(id(stream), []).append(msg)

    def stream_done(self, stream: WireStream) -> None:
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
            stream = WireStream(req.model, entry, asyncio.get_running_loop(), self.emit, srv.packer, srv.cfg.max_gap,
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

    def end_stream(self, stream: WireStream, note: str | None = None) -> None:
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
