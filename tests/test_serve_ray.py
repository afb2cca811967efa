"""`serve --ray` (issue #15): the streaming server as a Ray Serve application on a local Ray instance (2 CPUs),
2 replicas behind Ray's HTTP proxy, real WebSockets. Every frame is checked against the OFFLINE pipeline with
tests/test_serve.py's own helpers and tolerance (fixtures reused from there); skipped with the reason when Ray
Serve is not installed."""
from __future__ import annotations

import asyncio
import socket
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

pytest.importorskip("aiohttp")

from lipsync_trt.distributed import ray_missing_reason  # noqa: E402

if ray_missing_reason(serve=True):
    pytest.skip(ray_missing_reason(serve=True), allow_module_level=True)

from lipsync_trt.serve import client as C  # noqa: E402
from lipsync_trt.serve import protocol as P  # noqa: E402
from lipsync_trt.serve.protocol import Status  # noqa: E402

import test_serve as TS  # noqa: E402
from test_serve import CHUNK, MAX_MEAN_DIFF, _config, check_stream, padded, recipe_boxes, run, speech24  # noqa: E402
from lipsync_trt.bench import reference  # noqa: E402

pytestmark = pytest.mark.slow   # a local Ray instance and a Ray Serve deployment

# test_serve's fixtures, used here by name: its checkpoints, runner, avatars, offline oracle and plain server
live_checkpoints, runner, entries, oracle, server = TS.live_checkpoints, TS.runner, TS.entries, TS.oracle, TS.server

REPLICAS = 2
MAX_STREAMS = 4          # per replica


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_serve(entries, live_checkpoints):
    """The Serve app at http://127.0.0.1:PORT/ with 2 replicas of 1 CPU; shut down by the last test."""
    import ray
    from ray import serve

    from lipsync_trt.distributed.serve_app import app

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    # as the plain server's correctness tests: no queue bound nor deadline (the clients send faster than a CPU
    # makes frames), so the overload policy stays out of the frame comparison
    cfg = _config(entries, live_checkpoints, max_batch=8, max_wait_ms=5, max_queue=10_000, max_delay_ms=0,
                  max_streams=MAX_STREAMS)
    cfg.port, cfg.options = port, {"threads": 1}
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app(cfg, str(REPLICAS), 0.0, 1.0), name="lipsync", route_prefix="/")
    state = {"url": f"ws://127.0.0.1:{port}/", "http": f"http://127.0.0.1:{port}/", "serve": serve, "ray": ray}
    yield state
    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()


def test_four_concurrent_streams_through_the_proxy_equal_offline(ray_serve, entries, demo, oracle):
    """4 streams on 4 WebSockets at once, each its own speech and length: every frame of every stream arrives in
    order and equals that stream's own offline frame (so none went to another stream)."""
    import aiohttp

    source = speech24(2.0, seed=200)
    audios = [padded(source[k * 3840:k * 3840 + (12 + 2 * k) * CHUNK]) for k in range(4)]

    async def all_streams():
        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(*[C.stream(ray_serve["url"], "demo", a, session=session) for a in audios])

    results = run(all_streams())
    counts = [check_stream(res, "demo", demo["avatar"], a, oracle)["frames"] for res, a in zip(results, audios)]
    assert len(set(counts)) == 4
    boxes, _, _ = recipe_boxes(str(demo["avatar"]))
    x1, y1, x2, y2 = boxes[reference.frame_order(len(boxes), 6)[5]]
    for j in range(1, 4):   # the streams' frames differ, so cross-talk could not pass the comparison above
        a, b = oracle("demo", audios[0])[5], oracle("demo", audios[j])[5]
        assert np.abs(a[y1:y2, x1:x2].astype(np.int16) - b[y1:y2, x1:x2]).mean() > 4 * MAX_MEAN_DIFF, j


def test_same_pages_and_metadata_as_the_plain_server(ray_serve, server):
    """The browser client's page, scripts, avatar list, meta.json and template frames: byte for byte what the plain
    aiohttp server (test_serve's, same avatars) answers."""
    def get(base: str, path: str) -> bytes:
        with urllib.request.urlopen(base + path, timeout=60) as r:
            return r.read()

    for path in ("", "static/app.js", "static/capture-worklet.js", "avatars.json", "avatar/demo/meta.json",
                 "avatar/demo/frame/0.jpg", "avatar/demo/frame/7.jpg"):
        assert get(ray_serve["http"], path) == get(server.url, path), path
    for path in ("avatar/nobody/meta.json", "avatar/demo/frame/8.jpg", "static/..%2Fserver.py"):
        with pytest.raises(urllib.error.HTTPError) as err:
            get(ray_serve["http"], path)
        assert err.value.code == 404, path


def test_streams_beyond_the_replicas_limits_are_answered_overloaded(ray_serve):
    """2 replicas x 4 streams: of 9 streams opened at once, those beyond the limit of the replica Ray routed them
    to get OVERLOADED at once instead of waiting; the accepted ones get no answer until the server's stream idle
    limit ends them (one chunk makes no frame). However Ray spreads 9 connections, one replica has 5 or more,
    so 4 to 8 are accepted and 1 to 5 refused."""
    import aiohttp

    async def main():
        async with aiohttp.ClientSession() as session:
            sockets = [await session.ws_connect(ray_serve["url"]) for _ in range(REPLICAS * MAX_STREAMS + 1)]
            try:
                for ws in sockets:
                    await ws.send_bytes(P.encode_request("demo", 0, np.zeros(CHUNK, np.float32)))

                async def first(ws):
                    msg = await asyncio.wait_for(ws.receive(), 120)
                    return P.decode_response(msg.data)

                return await asyncio.gather(*[first(ws) for ws in sockets])
            finally:
                for ws in sockets:
                    await ws.close()

    answers = run(main())
    refused = [a for a in answers if a.status == Status.OVERLOADED]
    accepted = [a for a in answers if a.status == Status.END]   # ended by the idle limit: it had been accepted
    assert len(refused) + len(accepted) == len(answers), answers
    assert MAX_STREAMS <= len(accepted) <= REPLICAS * MAX_STREAMS, answers
    assert all(f"{MAX_STREAMS} streams" in a.error for a in refused) and all("no audio" in a.error for a in accepted)


def test_shutdown_closes_open_websockets_and_stops_the_replicas(ray_serve):
    """Last: serve.shutdown() with a client mid-stream closes its socket (no hang) and leaves no Serve actor."""
    import aiohttp

    serve, ray = ray_serve["serve"], ray_serve["ray"]

    async def main():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(ray_serve["url"]) as ws:
                await ws.send_bytes(P.encode_request("demo", 0, np.zeros(CHUNK, np.float32)))
                await asyncio.sleep(0.5)
                stopping = asyncio.get_running_loop().run_in_executor(None, serve.shutdown)
                msg = await asyncio.wait_for(ws.receive(), 120)
                await asyncio.wait_for(stopping, 120)
                return msg

    msg = run(main())
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING), msg
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        left = [a for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE" in a["name"].upper()]
        if not left:
            break
        time.sleep(1)
    assert not left, left
    ray.shutdown()


@pytest.mark.parametrize("bad,pattern", [(["--max-batch", "0"], "--max-batch must be within 1..1024"),
                                         (["--avatar", "x=/nonexistent/avatar"], "avatar folder not found")])
def test_bad_options_fail_in_one_line_before_ray_starts(demo, capsys, bad, pattern):
    import ray

    from lipsync_trt.__main__ import main

    args = ["serve", "--ray", "local", "--port", str(free_port()), "--generator", str(demo["generator"]),
            "--audio-encoder", str(demo["audio_encoder"])]
    if "--avatar" not in bad:
        args += ["--avatar", f"demo={demo['avatar']}"]
    assert main(args + bad) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and pattern in err, err
    assert not ray.is_initialized()
