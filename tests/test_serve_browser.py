"""The browser client (lipsync_trt/serve/static) in headless Chromium against the real server (the small demo
avatar, on CPU): "play a file" mode (every frame back, in order), microphone mode with Chromium's fake capture
device fed from a WAV (frames arrive in order and are drawn with their mouth overlaid), and reconnection after the
server closes the socket. Checked through the page's `window.lipsyncState` and screenshots of its canvases.

Needs Debian's `chromium` (apt-get install chromium) and Playwright's Python package (no `playwright install`:
the system browser is used); skipped without them.
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

pytestmark = pytest.mark.slow   # a browser (Chromium through Playwright) against a served page

CHROMIUM = "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else shutil.which("chromium")
if CHROMIUM is None:
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright's Python package is not installed")
pytest.importorskip("aiohttp")


@pytest.fixture(scope="module")
def server(demo):
    from lipsync_trt.serve.server import ServeConfig, ServerThread

    # this CPU is slower than real time: no deadline (--max-delay-ms 0), so that the microphone test sees a few
    # seconds of frames (until 50 are queued) before the first OVERLOADED, which the page reports as an error
    cfg = ServeConfig(avatars={"demo": str(demo["avatar"])}, generators={None: str(demo["generator"])},
                      audio_encoder=str(demo["audio_encoder"]), backend="torch", device="cpu", port=0,
                      max_batch=2, max_queue=50, max_delay_ms=0, policy="reject")
    srv = ServerThread(cfg)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    from lipsync_trt.demo import make_speech, write_wav

    # Chromium's fake microphone plays this file in a loop
    mic_wav = write_wav(tmp_path_factory.mktemp("browser") / "mic.wav", make_speech(3.0, rate=48000, seed=1), 48000)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                  f"--use-file-for-fake-audio-capture={mic_wav}", "--autoplay-policy=no-user-gesture-required",
                  "--no-sandbox"])
        try:
            pg = browser.new_page(viewport={"width": 1400, "height": 900})
            console: list[str] = []
            pg.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            pg.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            pg.on("response", lambda r: r.status >= 400 and console.append(f"error: HTTP {r.status} {r.url}"))
            pg.goto(server.url)
            pg.wait_for_function("() => window.lipsyncState && lipsyncState.connected && lipsyncState.avatar === 'demo'",
                                 timeout=15000)
            pg.console_log = console
            yield pg
        finally:
            browser.close()


def state(pg) -> dict:
    return pg.evaluate("() => JSON.parse(JSON.stringify(window.lipsyncState))")


def canvas_pixels(pg) -> np.ndarray:
    import cv2

    png = pg.locator("#video").screenshot()
    return cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)


def no_page_errors(pg):
    bad = [m for m in pg.console_log if m.startswith(("pageerror", "error"))]
    assert not bad, bad


def test_page_served_with_its_assets(server, page):
    s = state(page)
    assert s["avatarSize"] == [256, 192]
    assert page.locator("#avatar option").all_inner_texts() == ["demo"]
    # idle: the avatar's own frames are drawn (not a blank canvas)
    page.wait_for_function("() => lipsyncState.framesDrawn > 5", timeout=10000)
    assert canvas_pixels(page).std() > 5
    # the page knows when each frame can be made, for any frame (meta.json's periodic rule), as the server does
    from lipsync_trt.serve.session import ready_chunk

    frames = [0, 4, 63, 64, 500, 1834, 1835, 1839, 12345]
    assert page.evaluate(f"() => {frames}.map((i) => lipsyncApp.readyChunk(i))") == [ready_chunk(i) for i in frames]
    no_page_errors(page)


def play_file(page, folder):
    from lipsync_trt.demo import make_speech, write_wav

    wav = write_wav(folder / "clip.wav", make_speech(0.8, rate=44100, seed=2), 44100)   # decoded to 24 kHz
    before = state(page)
    page.set_input_files("#file", str(wav))
    page.wait_for_function("() => lipsyncState.mode === 'file'", timeout=10000)
    page.wait_for_function(f"() => lipsyncState.streamsEnded > {before['streamsEnded']} || "
                           f"lipsyncState.errors.length > {len(before['errors'])}", timeout=40000)
    s = state(page)
    assert s["errors"] == before["errors"], s["errors"]
    h = s["history"][-1]
    assert h["kind"] == "file" and h["chunks"] == 20, h                # 0.8 s = 20 chunks of 40 ms
    assert abs(s["fileDuration"] - 0.8) < 1e-3
    # every frame of the clip came back, in order, none missing: ids 0..total-1, total = N + 2 (RECIPE §2) of the
    # 0.8 s at 16 kHz
    mel_frames = 1 + 12800 // 200
    assert h["total"] == int((mel_frames - 16) / 80.0 * 25.0) + 4, h
    assert h["received"] == h["total"] and h["contiguous"], h


def test_play_a_file_mode(page, tmp_path):
    play_file(page, tmp_path)
    no_page_errors(page)


def test_microphone_mode_streams_and_shows_frames(page):
    import cv2

    # The server on a 2-core CPU is slower than real time, so the auto playout delay cannot catch up: play out a
    # fixed 8 s behind the capture, long enough for the first frames to come back in time to be overlaid.
    page.uncheck("#autodelay")
    page.fill("#delay", "8000")
    page.dispatch_event("#delay", "change")
    before = state(page)
    page.click("#mic")
    page.wait_for_function("() => lipsyncState.mode === 'mic' && lipsyncState.chunksSent > 0", timeout=15000)
    # Chromium's fake capture device feeds the WAV at real-time pace; the server answers with mouth frames
    page.wait_for_function(f"() => lipsyncState.framesReceived >= {before['framesReceived'] + 8} || "
                           f"lipsyncState.errors.length > {len(before['errors'])}", timeout=45000)
    assert state(page)["errors"] == before["errors"], state(page)["errors"]
    first = state(page)
    page.wait_for_function(f"() => lipsyncState.lastFrameId > {first['lastFrameId']}", timeout=30000)
    s = state(page)
    ids = s["receivedIds"][len(before["receivedIds"]):]    # this stream's ids (each stream counts from 0)
    assert ids[0] == 0 and s["outOfOrder"] == 0 and all(b > a for a, b in zip(ids, ids[1:])), ids
    # requests in a wrong format would come back malformed / unknown model / wrong sample count / internal error
    assert not any(s["statusCounts"].get(str(code)) for code in (1, 2, 3, 5)), (s["statusCounts"], s["errors"])
    assert s["latency"] is not None and s["latencyTotal"] is not None
    # a frame that came back within the playout delay is drawn with its mouth overlaid at its box
    page.wait_for_function("() => lipsyncState.overlaysDrawn > 0", timeout=30000)
    lo = state(page)["lastOverlay"]
    x1, y1, x2, y2 = lo["box"]
    assert 0 <= x1 < x2 <= 256 and 0 <= y1 < y2 <= 192 and lo["size"] == [x2 - x1, y2 - y1], lo
    assert canvas_pixels(page).std() > 5, "the avatar canvas is blank"
    crop = cv2.imdecode(np.frombuffer(page.locator("#crop").screenshot(), np.uint8), cv2.IMREAD_COLOR)
    assert crop.std() > 5, "the mouth crop canvas is blank"
    page.click("#stop")        # sends end of stream; the frames still queued on the server are not waited for
    page.wait_for_function("() => lipsyncState.mode === 'idle'", timeout=5000)
    no_page_errors(page)


def test_reconnects_after_the_server_closes_the_socket(page, tmp_path):
    page.wait_for_function("() => lipsyncState.connected", timeout=5000)
    n = state(page)["reconnects"]
    # a WebSocket message over the server's 1 MiB limit makes it close the connection (code 1009)
    page.evaluate("() => lipsyncApp.socket().send(new ArrayBuffer(2 << 20))")
    page.wait_for_function(f"() => lipsyncState.reconnects > {n}", timeout=10000)
    page.wait_for_function("() => lipsyncState.connected", timeout=10000)
    # and the new connection works: a short file streams through it completely
    play_file(page, tmp_path)
    no_page_errors(page)
