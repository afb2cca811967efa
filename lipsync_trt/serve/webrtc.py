"""The WebRTC door of `serve --webrtc` (extra [webrtc]: aiortc, imported when a peer comes): `POST /offer` takes
{"sdp", "type": "offer", "model": AVATAR} and answers {"sdp", "type": "answer"} (aiortc's and Pipecat's
convention); `/webrtc.html` is its page. Each peer connection is one `LipSync.live()` stream on the server's shared
model worker (serve/webrtc_media.py: microphone in, the avatar's video and voice out, one clock), counted in
--max-streams with the WebSocket streams and freed when the peer goes (closed, ICE/DTLS failure, no audio).
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
from collections import Counter, deque
from pathlib import Path

from ..errors import UsageError

RATE = 48000                 # the live stream's rate: what Opus decodes to and encodes from (divisible by 25)
HANGOVER_S = 0.5             # audio quieter than --webrtc-silence-db is not pushed once this much of it followed
                             # the last louder piece (shorter pauses inside speech are pushed as they are)
PREROLL_S = 0.06             # quiet audio pushed before an onset: its soft start, and margin against jitter
CONNECT_S = 30.0             # an answered peer whose media has not started by then is dropped (its slot freed)
MAX_OFFER_BYTES = 1 << 16    # POST /offer bodies (the app's client_max_size; a browser's offer is 3-8 KB)
MEDIA_KINDS = {"audio": 1, "video": 1, "application": 1}   # media sections an offer may have, per kind
PAGE = Path(__file__).resolve().parent / "static" / "webrtc.html"
EXTRA = "pip install 'lipsync_trt[webrtc]'"

log = logging.getLogger(__name__)


def parse_size(spec: str | None) -> tuple[int, int] | None:
    """--webrtc-size WxH -> (W, H); None keeps the avatar's size. UsageError unless both are even, 16..4096."""
    if spec is None:
        return None
    m = re.fullmatch(r"\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*", str(spec))
    w, h = (int(m[1]), int(m[2])) if m else (0, 0)
    if not (16 <= w <= 4096 and 16 <= h <= 4096 and w % 2 == 0 and h % 2 == 0):
        raise UsageError(f"--webrtc-size {spec!r}: expected WxH, both even numbers of pixels within 16..4096 "
                         "(e.g. 640x360)")
    return w, h


def check_options(cfg) -> None:
    """ServeConfig's WebRTC fields (UsageError naming the option)."""
    parse_size(cfg.webrtc_size)
    if not 0 <= cfg.webrtc_wait_ms <= 1000:
        raise UsageError(f"--webrtc-wait-ms must be within 0..1000, got {cfg.webrtc_wait_ms:g}")
    if not -150 <= cfg.webrtc_silence_db <= 0:
        raise UsageError(f"--webrtc-silence-db must be a level in dBFS within -150..0, got {cfg.webrtc_silence_db:g}")


def missing() -> str | None:
    """Why `serve --webrtc` cannot run here (aiortc not importable), or None."""
    try:
        import aiortc  # noqa: F401
    except ImportError as exc:
        return f"serve --webrtc needs aiortc ({exc}): {EXTRA}"
    return None


def add_routes(app, server) -> "Door":
    """Register POST /offer and GET /webrtc.html on the server's aiohttp app; peers are closed at shutdown."""
    door = Door(server)
    app.router.add_post("/offer", door.offer)
    app.router.add_get("/webrtc.html", door.page)
    app.on_shutdown.append(lambda _app: door.shutdown())
    server.webrtc = door
    return door


def _error(status: int, reason: str):
    from aiohttp import web

    return web.json_response({"error": reason.splitlines()[0][:300] if reason else "error"}, status=status)


class Door:
    """The server's WebRTC peers: one LipSync per avatar (the server's runner and avatar), a Session per peer."""

    def __init__(self, server):
        self.server, self.cfg = server, server.cfg
        self.size = parse_size(self.cfg.webrtc_size)
        self.wait_s = self.cfg.webrtc_wait_ms / 1000
        self.silence_db = self.cfg.webrtc_silence_db
        self.sessions: set[Session] = set()
        self.closed_reasons: deque = deque(maxlen=32)   # why the last peers were closed (logs, tests)
        self.closing = False
        self._lipsyncs: dict = {}

    def lipsync(self, name: str):
        """The LipSync of avatar `name` (built once from the server's entry: no new model load)."""
        if name not in self._lipsyncs:
            from ..api import LipSync

            e = self.server.entries[name]
            self._lipsyncs[name] = LipSync(e.avatar, e.runner, blend=self.cfg.blend)
        return self._lipsyncs[name]

    async def page(self, request):
        from aiohttp import web

        return web.FileResponse(PAGE, headers={"Cache-Control": "no-cache"})

    async def offer(self, request):
        """POST /offer: 400 for a malformed request or SDP, 404 for an unknown model, 413 for a body over
        MAX_OFFER_BYTES, 503 when the server is full or shutting down; otherwise the answer. Never a traceback."""
        from aiohttp import web

        srv = self.server
        srv.stats["webrtc_offers"] += 1
        if self.closing:
            return _error(503, "the server is shutting down")
        try:
            if (request.content_length or 0) > MAX_OFFER_BYTES:
                raise web.HTTPRequestEntityTooLarge(max_size=MAX_OFFER_BYTES, actual_size=request.content_length)
            params = json.loads(await request.read())
        except web.HTTPRequestEntityTooLarge:
            srv.stats["webrtc_bad_offers"] += 1
            return _error(413, f"the offer is too large: at most {MAX_OFFER_BYTES} bytes")
        except (ValueError, RecursionError):          # not UTF-8, not JSON, nested too deeply
            srv.stats["webrtc_bad_offers"] += 1
            return _error(400, 'the body must be JSON: {"sdp": "...", "type": "offer", "model": "AVATAR"}')
        if not isinstance(params, dict):
            srv.stats["webrtc_bad_offers"] += 1
            return _error(400, 'the body must be a JSON object: {"sdp": "...", "type": "offer", "model": "AVATAR"}')
        sdp, kind, model = params.get("sdp"), params.get("type"), params.get("model")
        problem = None
        if kind != "offer":
            problem = f'"type" must be "offer", got {_short(kind)}'
        elif not isinstance(sdp, str) or not sdp.strip():
            problem = f'"sdp" must be the offer\'s SDP text, got {_short(sdp)}'
        elif not isinstance(model, str):
            problem = f'"model" must be an avatar name ({", ".join(sorted(srv.entries))}), got {_short(model)}'
        if problem:
            srv.stats["webrtc_bad_offers"] += 1
            return _error(400, problem)
        if model not in srv.entries:
            srv.stats["error_unknown_model"] += 1
            return _error(404, f"unknown model {model[:64]!r}; this server has: {', '.join(sorted(srv.entries))}")
        if len(srv.active) >= self.cfg.max_streams:
            srv.stats["error_overloaded"] += 1
            return _error(503, f"server full: {self.cfg.max_streams} streams already open (--max-streams)")
        session = Session(self, model)
        srv.active.add(session)                       # the slot is taken before the first await
        self.sessions.add(session)
        try:
            answer = await session.negotiate(sdp)
        except asyncio.CancelledError:                # the client went away mid-answer: the slot is freed
            asyncio.ensure_future(session.close("the offer's request was cancelled"))
            raise
        except Exception as exc:
            answer, error = None, exc
        else:
            error = None
        if self.closing or (session.closed and error is None):   # shut down (or the peer went) while answering
            await session.close("server shutdown" if self.closing else "closed")
            return _error(503, "the server is shutting down" if self.closing else
                          f"the peer closed while answering: {session.reason}")
        if isinstance(error, OfferError):
            await session.close(str(error))
            srv.stats["webrtc_bad_offers"] += 1
            return _error(400, str(error))
        if error is not None:                         # a bug or an unexpected aiortc failure: one line, slot freed
            log.error("webrtc offer failed", exc_info=error)
            await session.close(f"internal error: {error}")
            srv.stats["error_internal"] += 1
            return _error(500, f"internal error: {type(error).__name__}: {error}")
        srv.stats["webrtc_streams"] += 1
        return _json(answer)

    async def shutdown(self) -> None:
        """Refuse new offers (503) and close every peer; the server's hook, before the model worker stops."""
        self.closing = True
        await asyncio.gather(*[s.close("server shutdown") for s in list(self.sessions)], return_exceptions=True)


def _short(value) -> str:
    """A JSON value named in an error: its type, and its start when it is a string."""
    if isinstance(value, str):
        return repr(value[:40] + ("..." if len(value) > 40 else ""))
    return "nothing" if value is None else f"a JSON {_JSON_TYPES.get(type(value), type(value).__name__)}"


_JSON_TYPES = {dict: "object", list: "array", bool: "boolean", int: "number", float: "number"}


def _json(body: dict):
    from aiohttp import web

    return web.json_response(body)


class OfferError(Exception):
    """An offer this door cannot answer (bad SDP, no audio to send, no video to receive): HTTP 400."""


class Session:
    """One peer connection: its live stream, tracks and tasks; `close()` (idempotent) frees everything and the
    --max-streams slot."""

    def __init__(self, door: Door, model: str):
        self.door, self.model = door, model
        self.pc = None
        self.media = None
        self.tasks: list[asyncio.Task] = []
        self.channel = None
        self.closed = False
        self.reason: str | None = None

    async def negotiate(self, sdp: str) -> dict:
        from aiortc import RTCPeerConnection, RTCSessionDescription

        from . import webrtc_media as M

        from aiortc.sdp import SessionDescription

        try:
            sections = SessionDescription.parse(sdp).media
            offer = RTCSessionDescription(sdp=sdp, type="offer")
        except Exception as exc:
            raise OfferError(f"bad SDP: {type(exc).__name__}: {exc}".splitlines()[0]) from None
        if not sections:
            raise OfferError("bad SDP: no media section (m= line); the offer must send audio and receive video")
        counts = Counter(m.kind for m in sections)
        extra = {k: n for k, n in counts.items() if n > MEDIA_KINDS.get(k, 0)}
        if extra:
            raise OfferError("the offer's SDP has media sections this door does not take: "
                             + ", ".join(f"{n} {k}" for k, n in sorted(extra.items()))
                             + " (at most one audio, one video and one data channel)")
        if any(m.dtls is None or not m.dtls.fingerprints for m in sections):
            raise OfferError("bad SDP: a media section has no DTLS fingerprint (a=fingerprint): the media could "
                             "not be encrypted")
        media = {m.kind: m.direction for m in sections}
        if media.get("audio") != "sendrecv":   # the offer's own view: it sends its audio and receives the voice
            raise OfferError("the offer's SDP must have an audio m-line with direction sendrecv (the caller's audio "
                             f"in, the avatar's voice out), got {media.get('audio') or 'none'}")
        if media.get("video") not in ("recvonly", "sendrecv"):
            raise OfferError("the offer's SDP must receive video: a video m-line recvonly or sendrecv, got "
                             f"{media.get('video') or 'none'}")
        self.pc = pc = RTCPeerConnection()
        incoming: list = []
        pc.on("track", lambda track: incoming.append(track) if track.kind == "audio" else None)
        pc.on("datachannel", self._on_channel)
        pc.on("connectionstatechange", self._on_state)
        try:
            await pc.setRemoteDescription(offer)
        except Exception as exc:
            raise OfferError(f"bad SDP: {type(exc).__name__}: {exc}".splitlines()[0]) from None
        if not incoming:
            raise OfferError("the offer sends no audio track")
        door, cfg = self.door, self.door.cfg
        live = door.lipsync(self.model).live(rate=RATE, batcher=door.server.packer.batcher)
        gate = M.Gate(live.rate, door.silence_db, HANGOVER_S, PREROLL_S)
        self.media = media = M.Media(live, door.size, door.wait_s, gate)
        pc.addTrack(media.audio)
        pc.addTrack(media.video)
        try:
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:                      # e.g. no codec in common
            raise OfferError(f"cannot answer this offer: {type(exc).__name__}: {exc}".splitlines()[0]) from None
        self._spawn(media.clock(), "clock")
        self._spawn(media.pump(incoming[0], cfg.stream_idle_s), "pump")
        self._spawn(self._report(), None)
        self._spawn(self._deadline(CONNECT_S), None)
        return {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type}

    def _spawn(self, coro, name: str | None) -> None:
        """A task of this peer; when a named one ends (the clock, the incoming audio) the peer is closed."""
        task = asyncio.ensure_future(coro)
        self.tasks.append(task)
        if name is not None:
            task.add_done_callback(lambda t: self._ended(name, t))

    def _ended(self, name: str, task: asyncio.Task) -> None:
        if self.closed or task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("webrtc %s failed", name, exc_info=exc)
            self.door.server.stats["error_internal"] += 1
        asyncio.ensure_future(self.close(f"{name}: {exc or task.result()}"))

    def _on_state(self) -> None:
        state = self.pc.connectionState if self.pc is not None else "closed"
        if state in ("failed", "closed") and not self.closed:
            self.door.server.stats[f"webrtc_{state}"] += 1
            asyncio.ensure_future(self.close(f"connection {state}"))

    def _on_channel(self, channel) -> None:
        """The page's data channel: "interrupt" (barge-in) in, this peer's counts (JSON, once a second) out."""
        self.channel = channel

        @channel.on("message")
        def on_message(message):
            if message == "interrupt" and self.media is not None and not self.closed:
                self.media.interrupt()

    async def _deadline(self, seconds: float) -> None:
        """An answered peer whose media has not started (DTLS up, the tracks pulled) within `seconds` is dropped:
        a client that posted an offer and never connected does not keep its slot."""
        try:
            await asyncio.wait_for(self.media.started.wait(), seconds)
        except asyncio.TimeoutError:
            self.door.server.stats["webrtc_not_connected"] += 1
            asyncio.ensure_future(self.close(f"not connected within {seconds:g} s"))   # not inside this task:
                                                                                      # close() cancels it

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            ch = self.channel
            if ch is not None and ch.readyState == "open" and self.media is not None:
                ch.send(json.dumps(self.media.stats()))

    async def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed, self.reason = True, reason
        self.door.closed_reasons.append(reason)
        srv = self.door.server
        srv.active.discard(self)
        self.door.sessions.discard(self)
        for t in self.tasks:
            t.cancel()
        if self.media is not None:
            self.media.close()
            for key in ("frames", "speech", "idle", "late"):
                srv.stats[f"webrtc_{key}"] += self.media.counts[key]
        if self.pc is not None:
            try:
                await self.pc.close()
            except Exception:
                log.exception("closing a peer connection")
        log.info("webrtc peer closed: %s", reason)

