"""The server holds nothing forever (issue #13 item 4) and refuses absurd samples (item 6): idle streams are ended
and free their slot, incomplete or idle HTTP connections and idle WebSockets are closed, a client too slow to
read is disconnected with its socket reset. The real aiohttp server in-process on a free localhost port, with
short limits set in its config; clients are aiohttp or raw sockets. The generator is SlowRunner with no delay (the
avatar's crop back as the mouth): what is checked here is the server's bookkeeping, not the pixels (test_serve.py
checks those), and it keeps these tests to seconds.
"""
from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("cv2")

from lipsync_trt import audio as A  # noqa: E402
from lipsync_trt import avatar as AV  # noqa: E402
from lipsync_trt.errors import AudioError  # noqa: E402
from lipsync_trt.serve import protocol as P  # noqa: E402
from lipsync_trt.serve.protocol import Status  # noqa: E402
from lipsync_trt.serve.scheduler import ModelEntry  # noqa: E402
from lipsync_trt.serve.server import ServeConfig, ServerThread  # noqa: E402

from test_serve import SlowRunner  # noqa: E402

CHUNK = P.CHUNK_SAMPLES
WAIT = 30.0      # how long a test waits for something that must happen (a hang, not a slow machine, exceeds it)


@pytest.fixture(scope="module")
def fast(torch_runner, demo):
    """(entries, runner): the demo avatar with a generator that costs nothing."""
    runner = SlowRunner(torch_runner, 0.0)
    return {"demo": ModelEntry("demo", AV.load(demo["avatar"]), runner)}, runner


def start(fast, checkpoints, **kw) -> ServerThread:
    entries, runner = fast
    cfg = ServeConfig(avatars={"demo": str(entries["demo"].avatar.root)}, generators={None: str(checkpoints[0])},
                      audio_encoder=str(checkpoints[1]), device="cpu", host="127.0.0.1", port=0, max_wait_ms=1,
                      max_delay_ms=0, **kw)
    return ServerThread(cfg, entries, runner)


def chunk(i: int) -> np.ndarray:
    return (0.3 * np.sin(np.arange(CHUNK) * (0.01 + 0.001 * i))).astype(np.float32)


async def receive(ws) -> P.Response:
    import aiohttp

    msg = await asyncio.wait_for(ws.receive(), WAIT)
    assert msg.type == aiohttp.WSMsgType.BINARY, (msg.type, msg.data, msg.extra)
    return P.decode_response(msg.data)


async def until_end(ws) -> list[P.Response]:
    got = [await receive(ws)]
    while got[-1].status != Status.END:
        got.append(await receive(ws))
    return got


async def until_end_at(ws) -> tuple[list[P.Response], float]:
    """until_end, and when the END arrived (time.monotonic)."""
    got = await until_end(ws)
    return got, time.monotonic()


# ------------------------------------------------------------------------------------------------ samples

@pytest.mark.parametrize("value, ok", [(1.5, True), (-64.0, True), (64.0, True), (64.0001, False), (-100.0, False),
                                       (1e6, False), (3e38, False), (-3e38, False)])
def test_huge_finite_samples_are_malformed_like_nan(value, ok):
    """The decision of #13: finite samples up to |64| pass unchanged (clipped TTS output goes a little over 1),
    larger ones are refused MALFORMED with the request's frame id, as NaN is, and by the same rule as
    audio.check_samples (the WAV path)."""
    audio = np.zeros(CHUNK, np.float32)
    audio[100] = value
    msg = P.encode_request("demo", 7, audio)
    try:
        A.check_samples(audio, "x")
        wav_ok = True
    except AudioError:
        wav_ok = False
    assert wav_ok == ok
    if ok:
        assert P.decode_request(msg).audio[100] == np.float32(value)
        return
    with pytest.raises(P.ProtocolError) as info:
        P.decode_request(msg)
    assert info.value.status == Status.MALFORMED and info.value.frame_id == 7
    assert "64" in info.value.reason and f"{abs(np.float32(value)):.3g}" in info.value.reason, info.value.reason


def test_huge_sample_chunk_is_answered_malformed_and_the_stream_goes_on(fast, checkpoints):
    """Over the wire: a 3e38 chunk is answered MALFORMED (frame id echoed) and dropped; resending that chunk id
    with sane audio continues the stream: C whole chunks give frames 0 .. C - 2 and END with id C - 1."""
    import aiohttp

    srv = start(fast, checkpoints)

    async def main():
        async with aiohttp.ClientSession() as session, session.ws_connect(srv.ws_url) as ws:
            for i in range(3):
                await ws.send_bytes(P.encode_request("demo", i, chunk(i)))
            bad = chunk(3)
            bad[5] = 3e38
            await ws.send_bytes(P.encode_request("demo", 3, bad))
            refused = await receive(ws)
            for i in range(3, 8):
                await ws.send_bytes(P.encode_request("demo", i, chunk(i)))
            await ws.send_bytes(P.encode_request("demo", 8, None))
            return refused, await until_end(ws)

    try:
        refused, rest = asyncio.run(main())
    finally:
        srv.stop()
    assert refused.status == Status.MALFORMED and refused.frame_id == 3 and "3e+38" in refused.error, refused
    assert [(r.status, r.frame_id) for r in rest] == [(Status.OK, i) for i in range(7)] + [(Status.END, 7)]


# ------------------------------------------------------------------------------------------------ idle streams

def test_idle_streams_are_ended_and_free_their_slots(fast, checkpoints):
    """With --max-streams 2 two clients that send chunks and then go silent hold both slots: a third stream is
    OVERLOADED. After --stream-idle-s without a chunk the server ends both streams as if their clients had: the
    12-chunk one gets its frames 0 .. 10 then END 11, the 1-chunk one END 0 (too short), each END saying why;
    then the third client's stream is accepted, and the first client's connection takes a new stream."""
    import aiohttp

    idle = 1.0
    srv = start(fast, checkpoints, max_streams=2, stream_idle_s=idle, http_idle_s=0.3)

    async def main():
        async with aiohttp.ClientSession() as session:
            a, b, c = [await session.ws_connect(srv.ws_url) for _ in range(3)]
            for i in range(12):
                t_a = time.monotonic()           # before the last chunk leaves: the server sees it later
                await a.send_bytes(P.encode_request("demo", i, chunk(i)))
            t_b = time.monotonic()
            await b.send_bytes(P.encode_request("demo", 0, chunk(0)))
            await asyncio.sleep(0.1)
            await c.send_bytes(P.encode_request("demo", 0, chunk(0)))
            refused = await receive(c)
            (got_a, end_a), (got_b, end_b) = await asyncio.gather(until_end_at(a), until_end_at(b))
            waited = (end_a - t_a, end_b - t_b)
            async with session.get(srv.url + "stats") as r:
                active = (await r.json())["active_streams"]
            for ws in (c, a):        # a new stream on a new and on a reused connection
                for i in range(6):
                    await ws.send_bytes(P.encode_request("demo", i, chunk(i)))
                await ws.send_bytes(P.encode_request("demo", 6, None))
            after = await asyncio.gather(until_end(c), until_end(a))
            for ws in (a, b, c):
                await ws.close()
            return refused, got_a, got_b, waited, active, after

    try:
        refused, got_a, got_b, waited, active, after = asyncio.run(main())
        stats = dict(srv.server.stats)
    finally:
        srv.stop()
    assert refused.status == Status.OVERLOADED and refused.frame_id == 0, refused
    assert [(r.status, r.frame_id) for r in got_a] == [(Status.OK, i) for i in range(11)] + [(Status.END, 11)]
    assert got_b[-1].status == Status.END and got_b[-1].frame_id == 0 and len(got_b) == 1
    note = f"no audio for {idle:g} s"
    assert note in got_a[-1].error and note in got_b[-1].error and "too short" in got_b[-1].error
    assert min(waited) >= idle, waited     # not ended before the limit
    assert active == 0 and stats["idle_streams"] == 2, (active, stats)
    for res in after:
        assert [(r.status, r.frame_id) for r in res] == [(Status.OK, i) for i in range(5)] + [(Status.END, 5)]


# ------------------------------------------------------------------------------------------------ connections

def _closed_by(sock: socket.socket, deadline: float) -> bool:
    """True when the peer closes (EOF or reset) before `deadline` (time.monotonic); whatever it sends first is read
    and ignored."""
    try:
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False
    return False


def test_incomplete_and_idle_http_connections_are_closed(fast, checkpoints):
    """--http-idle-s: sockets that send nothing, that send half a request header, and keep-alive connections idle
    after a complete request are all closed by the server (they used to stay open for good)."""
    srv = start(fast, checkpoints, http_idle_s=0.5)
    socks = []
    try:
        for k in range(24):
            s = socket.create_connection(("127.0.0.1", srv.port))
            socks.append(s)
            if k % 3 == 1:
                s.sendall(b"GET /avatars.json HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Half: ")
            elif k % 3 == 2:
                s.sendall(b"GET /avatars.json HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")   # keep-alive (HTTP/1.1)
        end = time.monotonic() + WAIT
        closed = [_closed_by(s, end) for s in socks]
        end = time.monotonic() + WAIT       # the server's side of the closing runs on its own thread
        while srv.runner.server.connections and time.monotonic() < end:
            time.sleep(0.05)
        n_open = len(srv.runner.server.connections)
    finally:
        for s in socks:
            s.close()
        srv.stop()
    assert all(closed), [k for k, c in enumerate(closed) if not c]
    assert n_open == 0, n_open


def test_idle_websocket_is_closed_but_not_by_the_http_limit(fast, checkpoints):
    """--ws-idle-s closes a WebSocket that has no stream and receives nothing, with code 1000 and a reason; the
    (shorter) --http-idle-s does not apply to an open WebSocket (it would reset it without a close frame)."""
    import aiohttp

    srv = start(fast, checkpoints, http_idle_s=0.2, ws_idle_s=1.0)

    async def main():
        async with aiohttp.ClientSession() as session, session.ws_connect(srv.ws_url) as ws:
            t0 = time.monotonic()
            for i in range(6):
                await ws.send_bytes(P.encode_request("demo", i, chunk(i)))
            await ws.send_bytes(P.encode_request("demo", 6, None))
            got = await until_end(ws)
            msg = await asyncio.wait_for(ws.receive(), WAIT)
            return got, msg, ws.close_code, time.monotonic() - t0

    try:
        got, msg, code, took = asyncio.run(main())
    finally:
        srv.stop()
    assert got[-1].status == Status.END and got[-1].frame_id == 5
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING), msg
    assert code == 1000 and "idle" in (msg.extra or ""), (code, msg)
    assert took >= 1.0, took


# ------------------------------------------------------------------------------------------------ slow clients

def _ws_frame(payload: bytes) -> bytes:
    """A masked binary WebSocket frame (RFC 6455 §5.2), as a client sends it."""
    n = len(payload)
    head = b"\x82" + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n))
    mask = os.urandom(4)
    body = np.frombuffer(payload, np.uint8) ^ np.resize(np.frombuffer(mask, np.uint8), n)
    return head + mask + body.tobytes()


def _tcp_states(local_port: int, remote_port: int) -> list[str]:
    """Kernel TCP states (hex, /proc/net/tcp) of the sockets 127.0.0.1:local_port <-> :remote_port."""
    out = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if int(f[1].split(":")[1], 16) == local_port and int(f[2].split(":")[1], 16) == remote_port:
            out.append(f[3])
    return out


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads the kernel's socket table (Linux)")
def test_too_slow_client_is_dropped_without_waiting_for_it(fast, checkpoints):
    """A client that sends 1,000 chunks and never reads an answer (each a mouth: policy skip) is closed as too slow
    (1008) and its connection is dropped at once: the server's socket leaves the kernel's table (reset), instead
    of holding its buffers until the client disconnects, which this one never does while the test waits."""
    srv = start(fast, checkpoints, max_queue=1, policy="skip", slow_client_s=0.3)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)          # a small window: the server backs up fast
    try:
        s.connect(("127.0.0.1", srv.port))
        s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(1)
        assert head.startswith(b"HTTP/1.1 101"), head
        port = s.getsockname()[1]
        assert _tcp_states(srv.port, port) == ["01"]                     # ESTABLISHED on the server side
        s.settimeout(WAIT)
        try:
            for i in range(1000):
                s.sendall(_ws_frame(P.encode_request("demo", i, chunk(i))))
        except (ConnectionResetError, BrokenPipeError):     # dropped while sending: fine
            pass
        end = time.monotonic() + WAIT
        while _tcp_states(srv.port, port) and time.monotonic() < end:
            time.sleep(0.1)
        left = _tcp_states(srv.port, port)
        stats = dict(srv.server.stats)
        handlers = len(srv.runner.server.connections)
    finally:
        s.close()
        srv.stop()
    assert stats["slow_clients"] == 1, stats
    assert left == [] and handlers == 0, (left, handlers)


def test_python_client_raises_at_once_when_the_stream_is_refused(fast, checkpoints):
    """The bundled client (serve.client.stream) stops at the server's refusal instead of waiting for an END that
    never comes: an unknown model, and no free stream slot."""
    from lipsync_trt.serve import client as C

    srv = start(fast, checkpoints, max_streams=1, stream_idle_s=0)
    try:
        audio = np.concatenate([chunk(i) for i in range(20)])
        with pytest.raises(C.StreamRefused, match="unknown model 'nobody'"):
            asyncio.run(C.stream(srv.ws_url, "nobody", audio, timeout=120))

        async def hold_one_then_try_another():
            import aiohttp

            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(srv.ws_url) as ws:          # takes the only slot and keeps it
                    await ws.send_bytes(P.encode_request("demo", 0, chunk(0)))
                    await asyncio.sleep(0.5)
                    return await C.stream(srv.ws_url, "demo", audio, session=session, timeout=120)

        with pytest.raises(C.StreamRefused, match="streams already open"):
            asyncio.run(hold_one_then_try_another())
    finally:
        srv.stop()
