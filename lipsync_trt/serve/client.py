"""A minimal Python client of the streaming protocol (tests, benchmarks, scripting)."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np

from .protocol import CHUNK_SAMPLES, Response, Status, decode_response, encode_request


def chunks(audio24k: np.ndarray) -> list[np.ndarray]:
    """Split 24 kHz mono float32 audio into 960-sample chunks, the last one zero-padded."""
    x = np.asarray(audio24k, np.float32)
    n = -(-len(x) // CHUNK_SAMPLES)
    x = np.pad(x, (0, n * CHUNK_SAMPLES - len(x)))
    return [x[i * CHUNK_SAMPLES:(i + 1) * CHUNK_SAMPLES] for i in range(n)]


class StreamRefused(Exception):
    """The server will not make this stream: the model is unknown, or all its stream slots are taken."""


def refusal(r: Response) -> str | None:
    """The server's reason when response `r` refuses the whole stream (no END will follow), else None."""
    reason = (r.error or "").strip()
    if r.status == Status.UNKNOWN_MODEL or (r.status == Status.OVERLOADED and "streams already open" in reason):
        return reason or Status(r.status).name
    return None


@dataclass
class StreamResult:
    responses: list[Response] = field(default_factory=list)
    sent_at: dict[int, float] = field(default_factory=dict)        # chunk id -> perf_counter when sent
    received_at: list[float] = field(default_factory=list)        # per response
    end_sent_at: float | None = None                              # perf_counter when the end of stream was sent

    @property
    def frames(self) -> list[Response]:
        return [r for r in self.responses if r.status == Status.OK]


async def stream(url: str, model: str, audio24k: np.ndarray, pace: float | None = None, end: bool = True,
                 session=None, timeout: float = 600.0, start: float | None = None,
                 result: StreamResult | None = None) -> StreamResult:
    """Send the audio as chunks (every `pace` seconds, or as fast as possible), then end of stream; collect
    every response until END (or, with end=False, until the socket closes or `timeout`). StreamRefused at once
    when the server refuses the stream (unknown model, no free stream slot), with its reason.
    `start`: the time.perf_counter() at which chunk 0 is due (default: once connected; benchmarks start many
    streams on one clock). `result`: a StreamResult to fill in place, so that what arrived is kept when the
    call raises (a timeout, a refusal)."""
    import aiohttp

    own = session is None
    session = session or aiohttp.ClientSession()
    res = StreamResult() if result is None else result
    try:
        async with session.ws_connect(url, max_msg_size=1 << 24) as ws:
            async def reader():
                async for msg in ws:
                    if msg.type != aiohttp.WSMsgType.BINARY:
                        break
                    r = decode_response(msg.data)
                    res.responses.append(r)
                    res.received_at.append(time.perf_counter())
                    if r.status == Status.END:
                        return
                    reason = refusal(r)
                    if reason is not None:
                        raise StreamRefused(f"{url} model {model!r}: {reason}")

            task = asyncio.ensure_future(reader())
            t0 = time.perf_counter() if start is None else start
            for i, c in enumerate(chunks(audio24k)):
                if task.done():                 # refused (or the socket closed): stop sending
                    break
                if pace:
                    delay = t0 + i * pace - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                res.sent_at[i] = time.perf_counter()
                await ws.send_bytes(encode_request(model, i, c))
            if end and not task.done():
                res.end_sent_at = time.perf_counter()
                await ws.send_bytes(encode_request(model, len(res.sent_at), None))
            await asyncio.wait_for(task, timeout)
    finally:
        if own:
            await session.close()
    return res
