"""The streaming server end to end (issue #6): the real aiohttp server in-process on a free localhost port, a real
WebSocket client (lipsync_trt.serve.client), real speech. Every returned mouth is checked against the OFFLINE
pipeline (api.LipSync.frames on the same 24 kHz audio: one-shot soxr resampling, whole-file mel and features,
pipeline compositing), which shares none of the streaming code (incremental resampler/mel/features, scheduler,
mouth crop, JPEG/ZIP). Boxes and template order are checked against the recipe computed here from the .lms files.

The generator is the same runner on both sides (ONNX Runtime when installed: ~4x faster than eager torch on a CPU).
These tests check correctness, not pace (a 2-core CPU is slower than real time); the only clock-based checks are
the generous latency bounds of the overload policies.
"""
from __future__ import annotations

import asyncio
import functools
import struct
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("aiohttp")
cv2 = pytest.importorskip("cv2")

from lipsync_trt import api, backends  # noqa: E402
from lipsync_trt import audio as A  # noqa: E402
from lipsync_trt import avatar as AV  # noqa: E402
from lipsync_trt.bench import reference  # noqa: E402
from lipsync_trt.demo import demo_checkpoints, make_speech  # noqa: E402
from lipsync_trt.serve import client as C  # noqa: E402
from lipsync_trt.serve import protocol as P  # noqa: E402
from lipsync_trt.serve.protocol import Status  # noqa: E402
from lipsync_trt.serve.scheduler import ModelEntry  # noqa: E402
from lipsync_trt.serve.server import ServeConfig, ServerThread  # noqa: E402
from lipsync_trt.serve.session import ready_chunk  # noqa: E402

from conftest import SANDERS  # noqa: E402
from oracle import render_batch  # noqa: E402

BACKEND = "onnxruntime" if backends.available()["onnxruntime"].usable else "torch"
CHUNK = P.CHUNK_SAMPLES
MAX_MEAN_DIFF = 2.0          # levels, mouth crop vs the offline frame cropped to the box, both through JPEG q95
JPEG_QUALITY = 95            # the server's default (ServeConfig.jpeg_quality)


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def live_checkpoints(tmp_path_factory):
    """Demo checkpoints (seeded, untrained, BatchNorm calibrated so the mouth depends on the audio) with sharper
    output logits than the default: a one-frame audio shift or another stream's audio then moves the mouth by
    well over the comparison tolerance, so a test with them sees audio going to the wrong frame or stream."""
    return demo_checkpoints(tmp_path_factory.mktemp("live"), output_gain=0.25)


@pytest.fixture(scope="module")
def runner(live_checkpoints):
    from lipsync_trt.errors import BackendError

    try:
        return backends.load(BACKEND, *live_checkpoints, device="cpu")
    except BackendError as exc:    # an ONNX export outside the build's tolerance on this CPU: eager torch
        print(f"onnxruntime unusable for the test checkpoints ({exc}); using torch")
        return backends.load("torch", *live_checkpoints, device="cpu")


@pytest.fixture(scope="module")
def entries(runner, demo):
    out = {"demo": ModelEntry("demo", AV.load(demo["avatar"]), runner)}
    if (SANDERS / "full_body_img").is_dir():
        out["sanders"] = ModelEntry("sanders", AV.load(SANDERS), runner)
    return out


def _config(entries, checkpoints, **kw) -> ServeConfig:
    return ServeConfig(avatars={n: str(e.avatar.root) for n, e in entries.items()},
                       generators={None: str(checkpoints[0])}, audio_encoder=str(checkpoints[1]),
                       backend=BACKEND, device="cpu", host="127.0.0.1", port=0, **kw)


@pytest.fixture(scope="module")
def server(entries, live_checkpoints, runner):
    # the clients here send faster than real time and a CPU makes frames slower than it: a queue bound above any
    # stream's length and no deadline keep the overload policy out of the correctness tests (it has its own tests)
    srv = ServerThread(_config(entries, live_checkpoints, max_batch=8, max_wait_ms=5, max_queue=10_000,
                               max_delay_ms=0), entries, runner)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def oracle(entries, runner):
    """offline(model, audio24k, frames=None) -> {video frame index: composited BGR frame}, cached."""
    cache: dict = {}

    def offline(model: str, audio24: np.ndarray, frames: list[int] | None = None) -> dict[int, np.ndarray]:
        key = (model, audio24.tobytes(), None if frames is None else tuple(frames))
        if key not in cache:
            ls = api.LipSync(entries[model].avatar, runner, batch_size=4)
            cache[key] = dict(ls.frames(audio24, rate=P.STREAM_RATE, frames=frames))
        return cache[key]

    return offline


def run(coro):
    return asyncio.run(coro)


def padded(audio24: np.ndarray) -> np.ndarray:
    """The audio exactly as the client sends it (whole 960-sample chunks, the last zero-padded)."""
    return np.concatenate(C.chunks(audio24))


@functools.lru_cache(maxsize=None)
def recipe_boxes(root: str) -> tuple[np.ndarray, int, int]:
    """RECIPE §5 from the .lms files: (count, 4) boxes (x1, y1, x2, y2) clipped to the frame; frame h, w."""
    root = Path(root)
    count = len(list((root / "full_body_img").glob("*.jpg")))
    h, w = cv2.imread(str(root / "full_body_img" / "0.jpg")).shape[:2]
    boxes = []
    for n in range(count):
        x1, y1, x2, y2 = reference.face_box(reference.read_landmarks(root / "landmarks" / f"{n}.lms"))
        boxes.append((max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)))
    return np.asarray(boxes), h, w


def mouth(resp: P.Response) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(resp.jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None, f"frame {resp.frame_id}: frame.jpg is not a decodable JPEG"
    return img


def check_frame(resp: P.Response, avatar_root, full: np.ndarray) -> float:
    """One status-0 response against the recipe's box and the offline frame; returns the mean abs difference."""
    boxes, h, w = recipe_boxes(str(avatar_root))
    i = resp.frame_id
    template = reference.frame_order(len(boxes), i + 1)[i]
    x1, y1, x2, y2 = (float(v) for v in boxes[template])
    assert resp.box == (x1, y1, x2, y2), f"frame {i}: box {resp.box}, recipe box of template {template} is " \
                                         f"{(x1, y1, x2, y2)}"
    assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
    img = mouth(resp)
    x1, y1, x2, y2 = (int(v) for v in resp.box)
    assert img.shape == (y2 - y1, x2 - x1, 3)
    d = float(np.abs(img.astype(np.int16) - as_jpeg(full[y1:y2, x1:x2]).astype(np.int16)).mean())
    assert d <= MAX_MEAN_DIFF, f"frame {i}: mean abs difference {d:.2f} to the offline frame"
    return d


def as_jpeg(img: np.ndarray, quality: int = JPEG_QUALITY) -> np.ndarray:
    """The offline crop through the same lossy step the server applies (cv2 JPEG, 4:2:0): the test models'
    untrained mouths are noise-like texture on which JPEG q95 alone differs by ~9 levels on average."""
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)


def check_stream(res: C.StreamResult, model: str, avatar_root, audio24: np.ndarray, oracle) -> dict:
    """Every response of a complete stream: ids 0..N+1 in order, each frame equal to the offline one, then END."""
    ref = oracle(model, padded(audio24))
    n = len(ref)
    statuses = [r.status for r in res.responses]
    assert statuses == [Status.OK] * n + [Status.END], statuses
    assert [r.frame_id for r in res.responses] == list(range(n)) + [n]
    assert not any(r.reused for r in res.responses)
    diffs = [check_frame(r, avatar_root, ref[r.frame_id]) for r in res.frames]
    return {"frames": n, "max_mean_diff": max(diffs)}


def template_crop(avatar_root, i: int) -> np.ndarray:
    boxes, _, _ = recipe_boxes(str(avatar_root))
    t = reference.frame_order(len(boxes), i + 1)[i]
    x1, y1, x2, y2 = boxes[t]
    return cv2.imread(str(Path(avatar_root) / "full_body_img" / f"{t}.jpg"))[y1:y2, x1:x2]


def speech24(seconds: float, seed: int) -> np.ndarray:
    return make_speech(seconds, P.STREAM_RATE, seed=seed)


# ------------------------------------------------------------------------------------------------ real speech

@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_real_speech_stream_equals_offline_generate(server, entries, sanders, oracle):
    """sanders + talk_hb.wav resampled to 24 kHz (soxr), 2.4 s = 60 chunks, then end of stream."""
    import soundfile as sf
    import soxr

    wav16, rate = sf.read(str(sanders / "talk_hb.wav"), dtype="float32")
    x24 = soxr.resample(wav16, rate, P.STREAM_RATE, quality="HQ").astype(np.float32)
    x24 = x24[int(1.0 * P.STREAM_RATE):][:60 * CHUNK]           # 2.4 s of speech from 1 s in
    res = run(C.stream(server.ws_url, "sanders", x24))
    out = check_stream(res, "sanders", sanders, x24, oracle)
    assert out["frames"] == A.num_windows(1 + len(padded(x24)) * 2 // 3 // 200) + 2 == 59
    # the comparison can fail: the mouths are far from the untouched template crops, and an audio misaligned
    # by one video frame (frame i made with frame i+1's feature window, same template) is outside the tolerance
    ref = oracle("sanders", padded(x24))
    boxes, _, _ = recipe_boxes(str(sanders))
    for r in res.frames:
        x1, y1, x2, y2 = (int(v) for v in r.box)
        far = np.abs(template_crop(sanders, r.frame_id).astype(np.int16) - ref[r.frame_id][y1:y2, x1:x2]).mean()
        assert far > 4 * MAX_MEAN_DIFF, (r.frame_id, far)
    feats = api.LipSync(entries["sanders"].avatar, entries["sanders"].runner).features(padded(x24), P.STREAM_RATE)
    probe = [3, 17, 30, 44, 57]
    shifted = render_batch(entries["sanders"].runner, entries["sanders"].avatar,
                                    A.feature_windows(feats.padded, [i + 1 for i in probe]),
                                    [reference.frame_order(len(boxes), i + 1)[i] for i in probe])
    for i, wrong in zip(probe, shifted):
        x1, y1, x2, y2 = (int(v) for v in res.frames[i].box)
        off = np.abs(mouth(res.frames[i]).astype(np.int16) - as_jpeg(wrong.numpy()[y1:y2, x1:x2])).mean()
        assert off > 2 * MAX_MEAN_DIFF, (i, off)


# ------------------------------------------------------------------------------------------------ concurrency

@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_eight_concurrent_streams_nothing_lost_no_cross_talk(server, entries, demo, oracle):
    """8 streams at once on separate connections, each with its own audio and length (12..19 chunks): every frame
    of every stream arrives, in order, and equals that stream's own offline result."""
    # each stream its own stretch of a speech-like signal (its own syllables, not just its own noise), and length
    source = speech24(2.0, seed=100)
    audios = [padded(source[k * 2880:k * 2880 + (12 + k) * CHUNK]) for k in range(8)]

    async def all_streams():
        import aiohttp

        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(*[C.stream(server.ws_url, "demo", a, session=session) for a in audios])

    before = dict(server.server.stats)
    results = run(all_streams())
    batches, frames = (server.server.stats[k] - before.get(k, 0) for k in ("batches", "frames"))
    counts = [check_stream(res, "demo", demo["avatar"], a, oracle)["frames"] for res, a in zip(results, audios)]
    assert len(set(counts)) > 1                      # different lengths really ended at different frames
    # cross-talk would show: stream k's frames are not stream j's (their audio differs)
    boxes, _, _ = recipe_boxes(str(demo["avatar"]))
    x1, y1, x2, y2 = boxes[reference.frame_order(len(boxes), 6)[5]]
    for j in range(1, 8):
        a, b = oracle("demo", audios[0])[5], oracle("demo", audios[j])[5]
        assert np.abs(a[y1:y2, x1:x2].astype(np.int16) - b[y1:y2, x1:x2]).mean() > 4 * MAX_MEAN_DIFF, j
    # the scheduler really batched across streams
    assert frames == sum(counts) and batches < frames / 2, (batches, frames)


# ------------------------------------------------------------------------------------------------ fuzz

GOOD_AUDIO = np.linspace(-0.5, 0.5, CHUNK, dtype=np.float32)


def _hdr(name_len: int, fid: int, audio_len: int, reserved: int = 0) -> bytes:
    return struct.pack("<4I", name_len & 0xFFFFFFFF, fid & 0xFFFFFFFF, audio_len & 0xFFFFFFFF, reserved & 0xFFFFFFFF)


def spec_status(msg: bytes | str, models: set[str], max_message: int = P.MAX_MESSAGE_BYTES) -> tuple[int, int]:
    """(status, echoed frame id) of an invalid request, written from docs/PROTOCOL.md's validation order."""
    if isinstance(msg, str):
        return Status.MALFORMED, 0
    if len(msg) < 16:
        return Status.MALFORMED, 0
    name_len, fid, audio_len, reserved = struct.unpack_from("<4I", msg)
    if len(msg) > max_message or reserved or not 1 <= name_len <= 64 or 16 + name_len + audio_len != len(msg):
        return Status.MALFORMED, fid
    try:
        name = msg[16:16 + name_len].decode("utf-8")
    except UnicodeDecodeError:
        return Status.MALFORMED, fid
    if audio_len % 4:
        return Status.MALFORMED, fid
    if audio_len not in (0, 3840):
        return Status.WRONG_SAMPLE_COUNT, fid
    if not np.isfinite(np.frombuffer(msg, "<f4", offset=16 + name_len)).all():
        return Status.MALFORMED, fid
    if name not in models:
        return Status.UNKNOWN_MODEL, fid
    raise AssertionError(f"the fuzzer made a valid request: {msg[:40]!r}")


def fuzz_messages(rng: np.random.Generator, n: int) -> list[tuple[str, bytes | str]]:
    """n invalid requests of many kinds, each (kind, message); valid requests are never produced."""
    good = P.encode_request("demo", 5, GOOD_AUDIO)
    out = []

    def name():
        return "".join(rng.choice(list("abcdemoxyz._-/"), size=int(rng.integers(1, 12))))

    kinds = ["random", "truncated", "trailing", "oversized", "reserved", "name_len", "lengths", "utf8", "odd_audio",
             "sample_count", "nan", "unknown_model", "text", "header_flip"]
    while len(out) < n:
        kind = kinds[int(rng.integers(len(kinds)))]
        fid = int(rng.integers(0, 2**32))
        if kind == "random":
            msg = rng.bytes(int(rng.integers(0, 64)))
        elif kind == "truncated":
            msg = good[:int(rng.integers(0, len(good)))]
        elif kind == "trailing":
            msg = good + rng.bytes(int(rng.integers(1, 100)))
        elif kind == "oversized":          # consistent header, too big for max_message (but under the WS limit)
            alen = 4 * int(rng.integers(P.MAX_MESSAGE_BYTES // 4, 16 * P.MAX_MESSAGE_BYTES // 4))
            msg = _hdr(4, fid, alen) + b"demo" + bytes(alen)
        elif kind == "reserved":
            msg = _hdr(4, fid, 3840, int(rng.integers(1, 2**32))) + b"demo" + GOOD_AUDIO.tobytes()
        elif kind == "name_len":
            nl = int(rng.choice([0, 65, 100, 2**31, 2**32 - 1]))
            msg = _hdr(nl, fid, 3840) + b"x" * min(nl, 100) + GOOD_AUDIO.tobytes()
        elif kind == "lengths":            # header lengths that do not add up to the message
            delta = int(rng.choice([-3, -1, 1, 4, 960]))
            msg = _hdr(4, fid, 3840 + delta) + b"demo" + GOOD_AUDIO.tobytes()
        elif kind == "utf8":
            bad = rng.choice([b"\xff\xfe", b"\xc3\x28", b"de\x80o", b"\xed\xa0\x80"])
            msg = _hdr(len(bad), fid, 3840) + bad + GOOD_AUDIO.tobytes()
        elif kind == "odd_audio":
            alen = int(rng.integers(1, 3000)) * 4 + int(rng.integers(1, 4))
            msg = _hdr(4, fid, alen) + b"demo" + rng.bytes(alen)
        elif kind == "sample_count":
            samples = int(rng.choice([1, 480, 959, 961, 1920, 3000, int(rng.integers(1, 4000))]))
            if samples == CHUNK:
                samples += 1
            msg = P.encode_request(str(rng.choice(["demo", "nope"])), fid, np.zeros(samples, np.float32))
        elif kind == "nan":
            a = GOOD_AUDIO.copy()
            a[int(rng.integers(CHUNK))] = rng.choice([np.nan, np.inf, -np.inf])
            msg = P.encode_request("demo", fid, a)
        elif kind == "unknown_model":
            nm = name()
            if nm in ("demo", "sanders"):
                continue
            msg = P.encode_request(nm, fid, GOOD_AUDIO if rng.random() < 0.5 else None)
        elif kind == "text":
            msg = "".join(rng.choice(list("hello {}\"'\\"), size=int(rng.integers(0, 40))))
        else:                              # header_flip: flip a bit in name length, audio length or reserved
            b = bytearray(good)
            pos = int(rng.choice([0, 1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 15]))
            b[pos] ^= 1 << int(rng.integers(8))
            msg = bytes(b)
        out.append((kind, msg))
    return out


async def _send_all(ws, msgs):
    for _, m in msgs:
        if isinstance(m, str):
            await ws.send_str(m)
        else:
            await ws.send_bytes(m)


async def _collect(ws, errors: int, until_end: bool = False) -> list[P.Response]:
    """Responses until `errors` error answers (status 1-5) have come and, with until_end, an END."""
    import aiohttp

    got, n_err, ended = [], 0, False
    while n_err < errors or (until_end and not ended):
        msg = await asyncio.wait_for(ws.receive(), 300)
        assert msg.type == aiohttp.WSMsgType.BINARY, (msg.type, msg.data, len(got))
        got.append(P.decode_response(msg.data))
        n_err += got[-1].status not in (Status.OK, Status.END)
        ended = ended or got[-1].status == Status.END
    return got


@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_fuzz_2400_bad_messages_then_a_good_stream(server, entries, demo, oracle):
    """2,400 seeded invalid messages (random, truncated, oversized, bad headers, bad UTF-8, wrong sample counts,
    NaN, unknown models, text, header bit flips) on two connections, 800 of them interleaved with a good stream:
    each gets exactly one answer, in order, with the documented status and echoed frame id; the good stream is
    unaffected; oversized WebSocket messages (> 1 MiB) close only their own connection (1009); afterwards
    the server answers a fresh good stream correctly."""
    import aiohttp

    rng = np.random.default_rng(20261122)
    models = set(entries)
    msgs = fuzz_messages(rng, 2400)
    assert len({k for k, _ in msgs}) == 14
    expected = [spec_status(m, models) for _, m in msgs]
    audio = padded(speech24(0.48, seed=7))                 # 12 chunks
    chunks = C.chunks(audio)

    async def main():
        async with aiohttp.ClientSession() as session:
            # connection 1: 1,600 bad messages in a burst, then their answers
            async with session.ws_connect(server.ws_url, max_msg_size=1 << 24) as ws:
                reader = asyncio.ensure_future(_collect(ws, 1600))
                await _send_all(ws, msgs[:1600])
                first = await reader
            # connection 2: a good stream with the other 800 bad messages between its chunks
            async with session.ws_connect(server.ws_url, max_msg_size=1 << 24) as ws:
                rest = msgs[1600:]
                per = len(rest) // (len(chunks) + 2)
                reader = asyncio.ensure_future(_collect(ws, len(rest), until_end=True))
                pos = 0
                for i, c in enumerate(chunks + [None]):
                    await _send_all(ws, rest[pos:pos + per])
                    pos += per
                    await ws.send_bytes(P.encode_request("demo", i, c))
                await _send_all(ws, rest[pos:])
                second = await reader
            # oversized WebSocket messages: the connection is closed with 1009 (message too big)
            closes = []
            for size in (P.WS_MAX_MESSAGE_BYTES + 1, 4 * P.WS_MAX_MESSAGE_BYTES):
                async with session.ws_connect(server.ws_url) as ws:
                    try:
                        await ws.send_bytes(_hdr(4, 1, size - 20) + b"demo" + bytes(size - 20))
                    except ConnectionError:    # the server hung up before the whole message was written
                        pass
                    msg = await asyncio.wait_for(ws.receive(), 60)
                    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
                    closes.append(ws.close_code)
            # and then a fresh good stream on a new connection
            fresh = await C.stream(server.ws_url, "demo", audio, session=session)
            return first, second, fresh, closes

    first, second, fresh, closes = run(main())
    # 1009 (message too big); a message far over the limit may still be in flight when the server closes, and
    # the client then sees the TCP reset (1006) instead of the close frame
    assert closes[0] == 1009 and closes[1] in (1009, 1006), closes
    errors2 = [r for r in second if r.status not in (Status.OK, Status.END)]
    frames2 = C.StreamResult(responses=[r for r in second if r.status in (Status.OK, Status.END)])
    assert len(first) == 1600 and len(errors2) == 800
    for (kind, msg), exp, got in zip(msgs, expected, first + errors2):
        assert (got.status, got.frame_id) == exp, (kind, msg[:32], got.status, got.frame_id, got.error)
        assert got.error, (kind, "an error answer carries error.txt with the reason")
    check_stream(frames2, "demo", demo["avatar"], audio, oracle)
    check_stream(fresh, "demo", demo["avatar"], audio, oracle)


# ------------------------------------------------------------------------------------------------ model names

def test_unknown_models_and_names_are_never_paths(server, demo):
    import aiohttp

    avatar_dir = str(demo["avatar"])
    names = ["nope", "../x", "..", ".", "../demo", "./demo", "demo/", "/demo", "DEMO", "demo ", "demo\x00",
             "demo/../demo", "%2e%2e", "avatar", "full_body_img"]
    if len(avatar_dir.encode()) <= P.MAX_NAME_BYTES:
        names.append(avatar_dir)                   # the real folder of a served avatar, by path: still unknown

    async def main():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(server.ws_url) as ws:
                for k, name in enumerate(names):
                    await ws.send_bytes(P.encode_request(name, 1000 + k, GOOD_AUDIO))
                answers = await _collect(ws, len(names))
            http = {}
            for path in ("avatar/demo/meta.json", "avatar/..%2F..%2Fetc/meta.json", "avatar/../demo/meta.json",
                         "avatar/demo/frame/0.jpg", "avatar/demo/frame/8.jpg", "avatar/nope/frame/0.jpg",
                         "static/../server.py", "static/..%2Fserver.py"):
                async with session.get(server.url + path) as r:
                    http[path] = r.status
            return answers, http

    answers, http = run(main())
    for k, (name, r) in enumerate(zip(names, answers)):
        assert (r.status, r.frame_id) == (Status.UNKNOWN_MODEL, 1000 + k), (name, r.status, r.error)
        assert "demo" in r.error                  # the reason lists the names this server has
    assert http["avatar/demo/meta.json"] == 200 and http["avatar/demo/frame/0.jpg"] == 200
    assert all(s == 404 for p, s in http.items() if p not in ("avatar/demo/meta.json", "avatar/demo/frame/0.jpg")), http


def test_meta_json_gives_the_ready_chunk_rule_for_every_frame(server):
    """meta.json: one period of ready_chunk offsets and the period; the rule it states gives ready_chunk(i) for any
    frame i (it used to list frames 0-63 only)."""
    import aiohttp

    async def main():
        async with aiohttp.ClientSession() as session:
            async with session.get(server.url + "avatar/demo/meta.json") as r:
                return await r.json()

    meta = run(main())
    period, offs = meta["ready_chunk_period"], meta["ready_chunk_offsets"]
    assert period and len(offs) == period and set(offs) == {11, 12}
    assert "i % ready_chunk_period" in meta["ready_chunk_note"]
    for i in list(range(3 * period)) + [12345, 54321]:
        assert i + offs[i % period] == ready_chunk(i), i


def test_wrong_sample_count_mid_stream_leaves_the_stream_intact(server, demo, oracle):
    """A chunk with 959 / 961 / 480 / 1920 samples is answered WRONG_SAMPLE_COUNT (frame id echoed) and dropped;
    resent correctly, the stream's frames still equal the offline result of the good audio."""
    import aiohttp

    audio = padded(speech24(0.48, seed=7))
    chunks = C.chunks(audio)
    wrong = {3: 959, 5: 961, 8: 480, 10: 1920}

    async def main():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(server.ws_url) as ws:
                reader = asyncio.ensure_future(_collect(ws, len(wrong), until_end=True))
                for i, c in enumerate(chunks):
                    if i in wrong:
                        await ws.send_bytes(P.encode_request("demo", i, np.resize(c, wrong[i])))
                    await ws.send_bytes(P.encode_request("demo", i, c))
                await ws.send_bytes(P.encode_request("demo", len(chunks), None))
                return await reader

    got = run(main())
    errs = [r for r in got if r.status == Status.WRONG_SAMPLE_COUNT]
    assert [r.frame_id for r in errs] == sorted(wrong)
    assert all(str(wrong[r.frame_id]) in r.error for r in errs)
    check_stream(C.StreamResult(responses=[r for r in got if r.status in (Status.OK, Status.END)]), "demo",
                 demo["avatar"], audio, oracle)


# ------------------------------------------------------------------------------------------------ overload

def _overload_run(entries, live_checkpoints, runner, policy: str, audio: np.ndarray, pace: float, max_queue: int = 2):
    """The queue bound alone (no deadline: its own test below)."""
    srv = ServerThread(_config(entries, live_checkpoints, max_batch=4, max_wait_ms=5, max_queue=max_queue,
                               max_delay_ms=0, policy=policy), entries, runner)
    try:
        res = run(C.stream(srv.ws_url, "demo", audio, pace=pace))
        stats = dict(srv.server.stats)
    finally:
        srv.stop()
    return res, stats


def _latencies(res: C.StreamResult, n_chunks: int) -> list[float]:
    """Seconds from the chunk that made frame i ready being sent to frame i's answer (frames after the last
    chunk: from the end-of-stream message, sent right after it)."""
    out = []
    for r, t in zip(res.responses, res.received_at):
        if r.status == Status.END:
            continue
        c = min(ready_chunk(r.frame_id), n_chunks - 1)
        out.append(t - res.sent_at[c])
    return out


def _generator_seconds(runner, batch: int) -> float:
    import torch

    x, a = torch.rand(batch, 6, 320, 320), torch.rand(batch, 32, 16, 16)
    runner.generate(x, a)
    t = time.perf_counter()
    runner.generate(x, a)
    return time.perf_counter() - t


@pytest.mark.parametrize("policy", ["reject", "skip"])
@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_overload_policy_bounds_latency(entries, live_checkpoints, runner, demo, oracle, policy):
    """A producer 4x faster than real time (10 ms per 40 ms chunk, 100 chunks) against a CPU that makes a few
    frames per second, with max_queue 2: the policy is observed (reject: OVERLOADED answers for the dropped frames;
    skip: status 0 with the last mouth again, marked reused), every frame id is answered exactly once and in
    order, the frames that were made equal the offline ones, and latency stays bounded instead of growing with
    the backlog (an unbounded queue would make the last frames wait for all ~98 to be generated)."""
    audio = padded(speech24(4.0, seed=11))
    n_chunks = len(audio) // CHUNK
    t_gen, t_gen4 = _generator_seconds(runner, 2), _generator_seconds(runner, 4)
    res, stats = _overload_run(entries, live_checkpoints, runner, policy, audio, pace=0.010)
    n = A.num_windows(1 + len(audio) * 2 // 3 // 200) + 2
    assert [r.frame_id for r in res.responses] == list(range(n + 1))
    assert res.responses[-1].status == Status.END
    body = res.responses[:-1]
    made = [r for r in body if r.status == Status.OK and not r.reused]
    if policy == "reject":
        dropped = [r for r in body if r.status == Status.OVERLOADED]
        assert all(r.status in (Status.OK, Status.OVERLOADED) for r in body)
        assert not any(r.reused for r in body)
        assert all("overloaded" in r.error for r in dropped)
        assert stats["overloaded"] == len(dropped)
    else:
        dropped = [r for r in body if r.reused]
        assert all(r.status == Status.OK for r in body)
        last = None
        for r in body:                  # a reused mouth is exactly the last one made before it (JPEG bytes, box)
            if r.reused:
                assert last is not None and (r.jpeg, r.box) == (last.jpeg, last.box)
                assert f"frame {last.frame_id}" in r.files[P.REUSED_FILE].decode()
            else:
                last = r
        assert stats["reused"] == len(dropped)
    assert len(dropped) >= n // 3, (len(dropped), n)          # the device could not keep up: the policy acted
    assert len(made) >= 2
    # the frames that were made are the right ones
    ids = [r.frame_id for r in made]
    ref = oracle("demo", audio, ids)
    for r in made:
        check_frame(r, demo["avatar"], ref[r.frame_id])
    # bounded latency: at most max_queue (2) frames of this stream wait, so every answer comes within a few
    # generator calls (a generous bound: 6 calls + 1 s). An unbounded queue would make the last frame wait for
    # the backlog: the ~99 frames ready within ~1 s, less what the device makes in that second at its best
    # rate (batches of 4), at that rate.
    lat = _latencies(res, n_chunks)
    bound = 1.0 + 6 * t_gen
    best_fps = 4 / t_gen4
    backlog_wait = (n - 1 - best_fps * n_chunks * 0.010) / best_fps
    assert max(lat) < bound < backlog_wait, (max(lat), bound, backlog_wait, t_gen, t_gen4)


def test_a_burst_of_answers_is_not_a_slow_client(entries, live_checkpoints, runner):
    """6 s of audio sent at once with max_queue 1: ~145 frames are refused while the first ones are made and then
    released together, more than the outgoing queue's limit (4 * max_queue + 64). A client that reads them all
    promptly is not 'too slow': it gets every answer and the END (it used to be cut off with 1008)."""
    audio = padded(speech24(6.0, seed=12))
    res, stats = _overload_run(entries, live_checkpoints, runner, "reject", audio, pace=None, max_queue=1)
    n = A.num_windows(1 + len(audio) * 2 // 3 // 200) + 2
    assert stats.get("slow_clients", 0) == 0
    assert [r.frame_id for r in res.responses] == list(range(n + 1)) and res.responses[-1].status == Status.END
    assert sum(r.status == Status.OVERLOADED for r in res.responses) > 4 * 1 + 64


class SlowRunner:
    """A device that is behind, at a known pace: a "generator" that takes `seconds` per call whatever the batch (a
    sleep: the pace does not depend on this machine's load) and returns the input image, so that with max_batch B
    it makes at most B / seconds frames per second; and an "audio encoder" that costs next to nothing (the first
    512 mel values of each window). For timing tests: the mouths mean nothing."""

    def __init__(self, inner, seconds: float):
        self.seconds = seconds
        self.name, self.device, self.precision, self.dtype = "slow", inner.device, inner.precision, inner.dtype

    def encode_audio(self, windows):
        return windows.reshape(len(windows), -1)[:, :512].float()

    def generate(self, images, audio):
        time.sleep(self.seconds)
        return images[:, :3].clone()


@pytest.mark.parametrize("policy", ["reject", "skip"])
def test_deadline_bounds_latency_across_streams(entries, live_checkpoints, runner, policy):
    """--max-delay-ms bounds the wait in time whatever the number of streams. 4 streams of 49 frames sent at 4x real
    time (~200 frames ready within ~0.5 s) to a device making 40 frames/s (batches of 4 in 0.1 s), with a queue
    bound (50) that none of them reaches: without a deadline the last frames would wait for the whole backlog
    (~5 s). With a 300 ms deadline every frame that is made (status 0, not reused) comes back within the deadline
    plus one batch (plus a margin for JPEG, WebSocket and this process's threads), the frames past it get the
    policy (reject: OVERLOADED saying so; skip: the last mouth, marked reused), and every frame id is answered
    exactly once, in order."""
    import aiohttp

    k, n_chunks, pace, batch_s, deadline = 4, 50, 0.010, 0.100, 0.300
    device = SlowRunner(runner, batch_s)
    slow = {"demo": ModelEntry("demo", entries["demo"].avatar, device)}
    audios = [padded(speech24(n_chunks * 0.04, seed=200 + j)) for j in range(k)]
    srv = ServerThread(_config(slow, live_checkpoints, max_batch=4, max_wait_ms=5, max_queue=50,
                               max_delay_ms=1000 * deadline, policy=policy), slow, device)

    async def all_streams():
        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(*[C.stream(srv.ws_url, "demo", a, pace=pace, session=session, timeout=60)
                                          for a in audios])

    try:
        results = run(all_streams())
        stats = dict(srv.server.stats)
    finally:
        srv.stop()
    n = A.num_windows(1 + len(audios[0]) * 2 // 3 // 200) + 2
    ages, made, dropped = [], 0, 0
    for res in results:
        assert [r.frame_id for r in res.responses] == list(range(n + 1)) and res.responses[-1].status == Status.END
        last = None
        for r, age in zip(res.responses[:-1], _latencies(res, n_chunks)):
            if r.status == Status.OK and not r.reused:
                made += 1
                ages.append(age)
                last = r
                continue
            dropped += 1
            if policy == "reject":
                assert r.status == Status.OVERLOADED and "ms limit" in r.error, (r.frame_id, r.status, r.error)
            elif last is None:            # skip, before this stream's first mouth: nothing to reuse
                assert r.status == Status.OVERLOADED and "no earlier mouth" in r.error, (r.frame_id, r.error)
            else:                         # skip: the last mouth made before it again, marked reused
                assert r.status == Status.OK and r.reused and (r.jpeg, r.box) == (last.jpeg, last.box), r.frame_id
    # a batch takes batch_s plus its mouth compositing (~0.03 s here); the margin covers that, the JPEGs, the
    # WebSocket and the threads of this process (server and clients) sharing the interpreter
    margin = 0.25
    assert max(ages) < deadline + batch_s + margin, (max(ages), sorted(ages)[-10:])
    assert made >= 8, made
    assert stats["late"] == dropped and dropped >= k * n // 3, (stats, dropped)   # the deadline acted, not the queue


def test_stop_closes_open_websockets_with_1001(entries, live_checkpoints, runner):
    """Stopping the server while a client is connected (mid-stream) closes its WebSocket with 1001 (going away) at
    once; the server used to wait for aiohttp's shutdown timeout (~45-60 s) with a client connected."""
    import aiohttp

    srv = ServerThread(_config(entries, live_checkpoints), entries, runner)

    async def main():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(srv.ws_url) as ws:
                await ws.send_bytes(P.encode_request("demo", 0, GOOD_AUDIO))      # a stream is open
                await asyncio.sleep(0.2)
                t = time.perf_counter()
                stopping = asyncio.get_running_loop().run_in_executor(None, srv.stop)
                msg = await asyncio.wait_for(ws.receive(), 30)
                await asyncio.wait_for(stopping, 30)
                return msg, ws.close_code, time.perf_counter() - t

    try:
        msg, code, took = run(main())
    finally:
        srv.stop()
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING), msg
    assert code == 1001, (msg, code)
    assert took < 5, took
    assert not srv.thread.is_alive()


def test_max_streams_answers_overloaded_then_frees_the_slot(entries, live_checkpoints, runner):
    """With --max-streams 1 a second stream's first chunk is OVERLOADED until the first stream has ended."""
    import aiohttp

    srv = ServerThread(_config(entries, live_checkpoints, max_streams=1), entries, runner)

    async def main():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(srv.ws_url) as a, session.ws_connect(srv.ws_url) as b:
                await a.send_bytes(P.encode_request("demo", 0, GOOD_AUDIO))
                await asyncio.sleep(0.2)
                await b.send_bytes(P.encode_request("demo", 0, GOOD_AUDIO))
                (refused,) = await _collect(b, 1)
                await a.send_bytes(P.encode_request("demo", 1, None))       # too short for a frame: END at once
                (ended,) = await _collect(a, 0, until_end=True)
                await asyncio.sleep(0.2)
                await b.send_bytes(P.encode_request("demo", 0, GOOD_AUDIO))
                await b.send_bytes(P.encode_request("demo", 1, None))
                (b_end,) = await _collect(b, 0, until_end=True)
                return refused, ended, b_end

    try:
        refused, ended, b_end = run(main())
    finally:
        srv.stop()
    assert refused.status == Status.OVERLOADED and "1 streams" in refused.error
    assert ended.status == Status.END and ended.frame_id == 0 and "too short" in ended.error
    assert b_end.status == Status.END and b_end.frame_id == 0
