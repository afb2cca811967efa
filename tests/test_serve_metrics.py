"""/metrics (Prometheus text format): what the server reports equals what its clients saw. The real aiohttp server
in-process; the generator is test_serve's SlowRunner (the avatar's crop back as the mouth, at a set pace), so only
the bookkeeping is under test. The exposition is read with prometheus_client's own text parser, and every count
is checked against the answers the clients received, not against the server's counters."""
from __future__ import annotations

import asyncio
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("prometheus_client")

from lipsync_trt import avatar as AV  # noqa: E402
from lipsync_trt.serve import client as C  # noqa: E402
from lipsync_trt.serve import protocol as P  # noqa: E402
from lipsync_trt.serve.config import default_max_batch  # noqa: E402
from lipsync_trt.serve.protocol import Status  # noqa: E402
from lipsync_trt.serve.scheduler import ModelEntry  # noqa: E402
from lipsync_trt.serve.server import ServeConfig, ServerThread  # noqa: E402

from test_serve import SlowRunner  # noqa: E402


def start(torch_runner, demo, seconds: float, **kw) -> ServerThread:
    runner = SlowRunner(torch_runner, seconds)
    entries = {"demo": ModelEntry("demo", AV.load(demo["avatar"]), runner)}
    cfg = ServeConfig(avatars={"demo": str(demo["avatar"])}, generators={None: str(demo["generator"])},
                      audio_encoder=str(demo["audio_encoder"]), device="cpu", host="127.0.0.1", port=0, **kw)
    return ServerThread(cfg, entries, runner)


def speech(seconds: float, seed: int) -> np.ndarray:
    from lipsync_trt.demo import make_speech

    x = make_speech(seconds, P.STREAM_RATE, seed=seed)
    return x[:len(x) // P.CHUNK_SAMPLES * P.CHUNK_SAMPLES]


def scrape(srv: ServerThread) -> tuple[str, dict]:
    """(Content-Type, {sample name + sorted labels: value}) of GET /metrics, parsed by prometheus_client."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(srv.url + "metrics", timeout=30) as r:
        ctype, text = r.headers["Content-Type"], r.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return ctype, samples


def value(samples: dict, name: str, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_metrics_match_what_the_clients_got(torch_runner, demo):
    srv = start(torch_runner, demo, 0.02, max_batch=4, max_wait_ms=30, max_queue=10_000, max_delay_ms=0)
    try:
        ctype, m = scrape(srv)
        assert ctype.startswith("text/plain") and "version=0.0.4" in ctype
        for t in ("websocket", "webrtc"):
            assert value(m, "lipsync_active_streams", transport=t) == 0
        assert value(m, "lipsync_frames_made_total") == 0 and value(m, "lipsync_generator_batch_size_count") == 0

        async def two_streams_and_one_open():
            import aiohttp

            async with aiohttp.ClientSession() as session:
                done = await asyncio.gather(*[C.stream(srv.ws_url, "demo", speech(1.2, seed), session=session)
                                              for seed in (1, 2)])
                async with session.ws_connect(srv.ws_url) as ws:     # one stream left open: one chunk, no end
                    await ws.send_bytes(P.encode_request("demo", 0, speech(0.04, 3)))
                    await asyncio.sleep(0.5)
                    open_metrics = await asyncio.get_running_loop().run_in_executor(None, scrape, srv)
                return done, open_metrics

        results, (_, during) = asyncio.run(two_streams_and_one_open())
        assert value(during, "lipsync_active_streams", transport="websocket") == 1
        assert value(during, "lipsync_active_streams", transport="webrtc") == 0
        made = sum(1 for res in results for r in res.responses if r.status == Status.OK and not r.reused)
        assert made == sum(len(res.frames) for res in results) > 20
        _, m = scrape(srv)
        assert value(m, "lipsync_frames_made_total") == made
        for name in ("reused", "rejected", "late"):
            assert value(m, f"lipsync_frames_{name}_total") == 0
        # batch sizes: every generator call counted once, its frames summed, none above --max-batch 4
        calls = value(m, "lipsync_generator_batch_size_count")
        assert value(m, "lipsync_generator_batch_size_bucket", le="+Inf") == calls
        assert value(m, "lipsync_generator_batch_size_bucket", le="4") == calls
        assert value(m, "lipsync_generator_batch_size_sum") == made
        assert made / 4 <= calls < made      # batches of more than one frame happened (two streams, 30 ms wait)
        ups = [value(m, "lipsync_generator_batch_size_bucket", le=le) for le in ("1", "2", "4", "8", "+Inf")]
        assert ups == sorted(ups)
        # latency: one observation per answer packed, all of them positive
        assert value(m, "lipsync_frame_latency_seconds_count") == made
        assert value(m, "lipsync_frame_latency_seconds_sum") > 0
        assert value(m, "lipsync_queue_depth") == 0
    finally:
        srv.stop()


def test_late_frames_are_counted_as_rejected_and_late(torch_runner, demo):
    """A generator at 5 frames/s, one frame a call, a 100 ms deadline and 1.2 s of audio sent at once: most frames
    are past the deadline when their turn comes; each is answered OVERLOADED and counted rejected and late."""
    srv = start(torch_runner, demo, 0.2, max_batch=1, max_wait_ms=0, max_queue=10_000, max_delay_ms=100,
                policy="reject")
    try:
        res = asyncio.run(C.stream(srv.ws_url, "demo", speech(1.2, 4)))
        refused = sum(1 for r in res.responses if r.status == Status.OVERLOADED)
        made = len(res.frames)
        assert refused > 0 and made > 0
        _, m = scrape(srv)
        assert value(m, "lipsync_frames_rejected_total") == refused
        assert value(m, "lipsync_frames_late_total") == refused
        assert value(m, "lipsync_frames_made_total") == made
        assert value(m, "lipsync_generator_batch_size_bucket", le="1") == made   # --max-batch 1
    finally:
        srv.stop()


@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_default_batch_per_device_and_prometheus_client_imported_only_for_metrics(torch_runner, demo):
    srv = start(torch_runner, demo, 0.0)
    try:
        assert srv.server.max_batch == default_max_batch("cpu") == srv.server.packer.batcher.max_batch
    finally:
        srv.stop()
    assert default_max_batch("cuda") == 8
    code = "import sys, lipsync_trt.serve.server; print('prometheus_client' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr
