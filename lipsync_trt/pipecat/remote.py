"""`RemoteLive`: the live timeline of `LipSync.live()` with its mouths made by `python -m lipsync_trt serve` over the
seed WebSocket protocol (docs/PROTOCOL.md), composited here onto the avatar's template frames: the seed browser
client's architecture, for a GPU box shared by many agents.

The timeline is the in-process one, slot for slot (same lookahead L, same commit and barge-in rules, same speech
rule: a frame is speech when its receptive field holds pushed audio), so the audio out is the same. Every slot goes
to the server as soon as it is planned (pushed audio) or committed (silence), as 40 ms chunks of 24 kHz float32
(resampled with soxr HQ at other rates), on one server stream for the whole session, so that server frame i is
timeline frame i with the same template. What differs from in-process, and why:
- idle frames are the template here too, but the server still makes (and sends) a mouth for every chunk, silence
  included: it has no idle rule on the wire;
- after a barge-in, the server has already heard the slots that were committed and then dropped; a speech frame
  whose receptive field reaches one of them would show a mouth made from audio that is not played, so it goes out
  as the template, late-marked (`stats["dropped"]`); in-process makes such frames again from the played audio;
- a mouth travels as JPEG (the server's `--jpeg-quality`, 95 by default): speech frames equal the in-process ones
  inside the face box within JPEG's loss, and exactly outside it.
"""
from __future__ import annotations

import asyncio
from collections import Counter, OrderedDict
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from .. import recipe as R
from ..errors import StreamError
from ..timeline import Timeline
from ..serve.client import refusal
from ..serve.protocol import CHUNK_SAMPLES, STREAM_RATE, Status, decode_response, encode_request
from .source import Step, to_pcm16, to_rgb

TEMPLATE_CACHE = 32          # decoded template frames kept (as lipsync_trt.avatar's cache)
SEND_AHEAD = 6               # slots of pushed audio sent past the committed ones: 240 ms more for the server to make
                             # a mouth in, and at most 240 ms more silence before the next utterance after a barge-in


def http_base(url: str) -> str:
    """ws://host:port/ -> http://host:port (wss -> https); an http(s) URL is kept."""
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, "", "", ""))


def ws_url(url: str) -> str:
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, parts.path or "/", parts.query, ""))


class Templates:
    """The avatar's template frames and boxes: from a local avatar folder, or fetched from the server (meta.json
    and frame/N.jpg, as the browser client does), decoded with OpenCV as the server decodes them."""

    def __init__(self, count: int, height: int, width: int, order: list[int], boxes, jpegs=None, avatar=None):
        self.count, self.height, self.width, self.order = count, height, width, order
        self.boxes = np.asarray(boxes, np.int64)
        self._jpegs, self._avatar = jpegs, avatar
        self._cache: OrderedDict = OrderedDict()

    @classmethod
    def local(cls, folder) -> "Templates":
        from .. import avatar as avatar_mod

        av = avatar_mod.load(folder)
        period = R.template_period(av.count)
        return cls(av.count, av.height, av.width, [int(t) for t in av.order(period)], av.boxes, avatar=av)

    @classmethod
    async def fetch(cls, session, url: str, model: str) -> "Templates":
        base = http_base(url)
        async with session.get(f"{base}/avatar/{model}/meta.json") as r:
            if r.status == 404:
                raise StreamError(f"{base}: the server has no avatar {model!r} (GET /avatars.json lists its avatars)")
            r.raise_for_status()
            meta = await r.json()
        jpegs = []
        for n in range(int(meta["count"])):
            async with session.get(f"{base}/avatar/{model}/frame/{n}.jpg") as r:
                r.raise_for_status()
                jpegs.append(await r.read())
        return cls(int(meta["count"]), int(meta["height"]), int(meta["width"]), [int(t) for t in meta["order"]],
                   meta["boxes"], jpegs=jpegs)

    def template_of(self, i: int) -> int:
        return self.order[i % len(self.order)]

    def frame(self, t: int) -> np.ndarray:
        """Template image t, BGR uint8 (read-only)."""
        if self._avatar is not None:
            return self._avatar.frame(t)
        if t in self._cache:
            self._cache.move_to_end(t)
            return self._cache[t]
        import cv2

        img = cv2.imdecode(np.frombuffer(self._jpegs[t], np.uint8), cv2.IMREAD_COLOR)
        if img is None or img.shape[:2] != (self.height, self.width):
            raise StreamError(f"template frame {t} from the server is not a {self.width}x{self.height} JPEG")
        img.setflags(write=False)
        self._cache[t] = img
        while len(self._cache) > TEMPLATE_CACHE:
            self._cache.popitem(last=False)
        return img


class RemoteLive:
    """The Pipecat service's source over `serve` (see the module docstring); the `source.LocalSource` contract."""

    def __init__(self, url: str, model: str, avatar=None, idle: str = "template", session=None,
                 send_ahead: int = SEND_AHEAD):
        if idle not in ("template", "generate"):
            raise StreamError(f"idle={idle!r}: expected 'template' or 'generate'")
        self.url, self.model, self.avatar_dir, self.idle = ws_url(url), model, avatar, idle
        self.send_ahead = int(send_ahead)
        self._session, self._own_session = session, session is None
        self.stats: Counter = Counter()
        self.templates: Templates | None = None
        self._ws = None
        self._reader: asyncio.Task | None = None
        self._mouths: dict[int, object] = {}         # frame id -> Response (status 0, 4 or 5)
        self._news = asyncio.Event()
        self._failed: str | None = None

    # -- the source contract
    async def open(self, rate: int) -> None:
        import aiohttp

        self._start_timeline(rate)
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            self.templates = (Templates.local(self.avatar_dir) if self.avatar_dir is not None
                              else await Templates.fetch(self._session, self.url, self.model))
            self._ws = await self._session.ws_connect(self.url, max_msg_size=1 << 24, heartbeat=30)
        except aiohttp.ClientError as exc:
            await self.close()
            raise StreamError(f"{self.url}: cannot reach the lip-sync server ({exc})") from exc
        self._reader = asyncio.ensure_future(self._read())

    @property
    def size(self) -> tuple[int, int]:
        return self.templates.height, self.templates.width

    async def step(self, chunks: list[np.ndarray], interrupt: bool, timeout: float | None) -> Step:
        self._check()
        k = self._advance(chunks, interrupt)
        await self._send()
        speech = self.tl.is_speech(k)
        late = False
        image = None
        if speech and any(s in self._dropped for s in self.tl.span(k)):
            late = True
            self.stats["dropped"] += 1
        elif speech or self.idle == "generate":
            r = await self._wait_mouth(k, timeout)
            if r is None or r.status != Status.OK:
                late = True
            else:
                image = await asyncio.to_thread(self._composite, k, r)
        if image is None:
            image = self.templates.frame(self.templates.template_of(k))
        audio = self._finish(k)
        for i in [i for i in self._mouths if i <= k]:
            del self._mouths[i]
        self.stats["speech" if speech else "idle"] += 1
        self.stats["late"] += late
        return Step(k, to_rgb(image), to_pcm16(audio), speech, late)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        if self._ws is not None:
            await self._ws.close()
            self._ws = None
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    # -- the timeline (lipsync_trt.timeline: the rules of LipSync.live)
    def _start_timeline(self, rate: int) -> None:
        self.tl = Timeline(rate)
        self.samples_per_frame, self.rate, self.lookahead = self.tl.samples_per_frame, self.tl.rate, self.tl.lookahead
        self._dropped: set[int] = set()              # slots the server heard with audio that was then dropped
        self._fed = 0                                # slots given to the 24 kHz chunker
        self._out24 = np.zeros(0, np.float32)
        self._chunks_sent = 0
        self._rs = None
        if self.rate != STREAM_RATE:
            import soxr

            self._rs = soxr.ResampleStream(self.rate, STREAM_RATE, 1, dtype="float32", quality="HQ")

    def _advance(self, chunks: list[np.ndarray], interrupt: bool) -> int:
        """Apply a barge-in, push the audio, commit what the next frame k needs (slot k + L); returns k."""
        if interrupt:
            # every slot not yet returned becomes silence: the committed ones and those the server already has
            # stay (as silence: the server's stream cannot take them back), the planned rest goes
            self._dropped.update(s for s in self.tl.silence(self._fed) if s < self._fed)
            self.stats["interrupts"] += 1
        for c in chunks:
            x = np.asarray(c)
            self.tl.push(x.astype(np.float32) * np.float32(1 / 32768) if x.dtype == np.int16 else x.astype(np.float32))
        k = self.tl.returned
        self.tl.commit(k + self.lookahead + 1)
        self.tl.take(self.tl.committed + self.send_ahead)
        return k

    def _finish(self, k: int) -> np.ndarray:
        """Frame k is returned: its audio, and forget what no later frame reads."""
        audio = self.tl.slots[k]
        self.tl.returned = k + 1
        keep = k - 3 * self.tl.reach - 2 * R.FEATURE_CONTEXT
        self.tl.trim(keep)
        self._dropped = {s for s in self._dropped if s >= keep}
        return audio

    # -- the wire
    async def _send(self) -> None:
        """Send the committed slots and up to `send_ahead` planned ones not sent yet, as whole 960-sample chunks at
        24 kHz."""
        while self._fed < min(self.tl.planned, self.tl.committed + self.send_ahead):
            x = self.tl.slots[self._fed]
            self._fed += 1
            y = x if self._rs is None else self._rs.resample_chunk(x)
            self._out24 = np.concatenate([self._out24, y]) if len(self._out24) else np.asarray(y, np.float32)
        while len(self._out24) >= CHUNK_SAMPLES:
            c, self._out24 = self._out24[:CHUNK_SAMPLES], self._out24[CHUNK_SAMPLES:]
            await self._ws.send_bytes(encode_request(self.model, self._chunks_sent, c))
            self._chunks_sent += 1

    async def _read(self) -> None:
        import aiohttp

        try:
            async for msg in self._ws:
                if msg.type != aiohttp.WSMsgType.BINARY:
                    break
                r = decode_response(msg.data)
                reason = refusal(r)
                if reason is not None:
                    self._failed = f"{self.url} refused the stream for {self.model!r}: {reason}"
                elif r.status in (Status.OK, Status.OVERLOADED, Status.INTERNAL) and r.frame_id >= self.tl.returned:
                    if r.status == Status.INTERNAL and r.frame_id == 0 and not r.files:
                        self._failed = f"{self.url}: the server failed the stream"
                    self._mouths[r.frame_id] = r
                elif r.status == Status.END:
                    self._failed = f"{self.url} ended the stream: {r.error or 'END'}"
                elif r.status in (Status.MALFORMED, Status.WRONG_SAMPLE_COUNT):
                    self._failed = f"{self.url} refused a chunk: {r.error or Status(r.status).name}"
                self._news.set()
                if self._failed:
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:                     # a broken answer or socket
            self._failed = f"{self.url}: {exc}"
        if not self._failed:
            self._failed = f"{self.url}: the connection closed"
        self._news.set()

    def _check(self) -> None:
        if self._failed:
            raise StreamError(self._failed)

    async def _wait_mouth(self, k: int, timeout: float | None):
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while k not in self._mouths:
            self._check()
            self._news.clear()
            wait = None if deadline is None else deadline - loop.time()
            if wait is not None and wait <= 0:
                return None
            try:
                await asyncio.wait_for(self._news.wait(), wait)
            except asyncio.TimeoutError:
                return None
        return self._mouths.pop(k)

    def _composite(self, k: int, r) -> np.ndarray:
        import cv2

        t = self.templates.template_of(k)
        x1, y1, x2, y2 = (int(v) for v in r.box)
        mouth = cv2.imdecode(np.frombuffer(r.jpeg, np.uint8), cv2.IMREAD_COLOR)
        if mouth is None or mouth.shape[:2] != (y2 - y1, x2 - x1):
            raise StreamError(f"frame {k}: the server's mouth is not a {x2 - x1}x{y2 - y1} JPEG for its box")
        image = self.templates.frame(t).copy()
        image[y1:y2, x1:x2] = mouth
        return image
