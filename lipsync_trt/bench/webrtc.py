"""python -m lipsync_trt.bench webrtc: `serve --webrtc` measured from an aiortc client (docs/BENCHMARKS.md, WebRTC).

Latency: one peer sends a WAV (silence, then bursts of demo speech each after --gap seconds of silence) through
aiortc's MediaPlayer; every frame it sends and receives is stamped with the wall clock. The received audio is
placed on the server's timeline by its RTP timestamps (frame k's audio is samples [k, k+1) x rate/25); each
burst (from its onset, its first non-zero sample) is found in it by cross-correlating 1 ms envelopes, which gives
that burst's delay, and the video frame carrying its onset is frame k_on (the same media clock). Reported per
onset: sent -> onset heard (the received audio), sent -> its frame (video frame k_on received, and whether its
face box differs from the template, i.e. was generated, or came late as the template), sent -> first changed
mouth (the first received frame from k_on - 12 on whose face box differs from the template: the mouth starts
moving before its sound, by the recipe's receptive field), and how many of the burst's frames were generated.
Late frames: the server's counts over the data channel.

Idle CPU: K peers send silence for --seconds; the server process's CPU time (utime + stime from /proc) over that
window, minus the same window with no peer, divided by K.

Both run against `python -m lipsync_trt serve --webrtc` started here in a subprocess with the demo avatar.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..cli_args import Parser

BENCHMARK = ("webrtc", "serve --webrtc from aiortc clients: glass-to-glass latency, late frames, CPU per idle stream")

RATE = 48000                 # what Opus carries (aiortc decodes to 48 kHz)
SPF = RATE // 25             # samples per video frame
VIDEO_TICKS = 90000 // 25    # RTP video clock ticks per frame


@dataclass
class Recording:
    """What one peer sent and received, each item stamped with time.time() when it left or arrived."""

    sent: list = field(default_factory=list)        # (t, pts at 48 kHz, mono float32)
    audio: list = field(default_factory=list)       # (t, pts at 48 kHz, mono float32)
    video: list = field(default_factory=list)       # (t, frame index k = pts / 3600, BGR uint8 or None)
    server: list = field(default_factory=list)      # the server's counts (data channel), one a second
    answer_s: float | None = None                   # POST /offer round trip


class OfferRefused(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(f"HTTP {status}: {reason}")
        self.status, self.reason = status, reason


def _mono(frame) -> np.ndarray:
    """An av.AudioFrame (s16, packed mono or stereo) -> mono float32."""
    x = frame.to_ndarray().reshape(-1).astype(np.float32) / 32768.0
    channels = len(frame.layout.channels)
    return x.reshape(-1, channels).mean(axis=1) if channels > 1 else x


async def post_offer(url: str, body: dict) -> dict:
    """POST /offer; OfferRefused(status, error) unless 200."""
    import aiohttp

    async with aiohttp.ClientSession() as s:
        async with s.post(url.rstrip("/") + "/offer", json=body) as r:
            try:
                got = await r.json(content_type=None)
            except Exception:
                got = {"error": (await r.text())[:300]}
            if r.status != 200:
                raise OfferRefused(r.status, got.get("error", "") if isinstance(got, dict) else str(got))
            return got


class Peer:
    """An aiortc client of `serve --webrtc`: a WAV (MediaPlayer) or silence out, the avatar's tracks in."""

    def __init__(self, url: str, model: str, wav: str | os.PathLike | None, keep_images: bool = True):
        from aiortc import MediaStreamTrack, RTCPeerConnection
        from aiortc.contrib.media import MediaPlayer

        self.url, self.model, self.keep_images = url, model, keep_images
        self.rec = Recording()
        self.pc = RTCPeerConnection()
        self.player = MediaPlayer(str(wav)) if wav is not None else None
        rec = self.rec

        class Tap(MediaStreamTrack):
            """The player's audio, each frame noted as it leaves (the player paces it in real time)."""
            kind = "audio"

            def __init__(self, source):
                super().__init__()
                self.source = source

            async def recv(self):
                f = await self.source.recv()
                rec.sent.append((time.time(), int(f.pts), _mono(f)))
                return f

        if self.player is not None:
            self.pc.addTrack(Tap(self.player.audio))
        else:
            from aiortc.mediastreams import AudioStreamTrack
            self.pc.addTrack(AudioStreamTrack())        # aiortc's silence (8 kHz, 20 ms frames)
        self.pc.addTransceiver("video", direction="recvonly")
        self.channel = self.pc.createDataChannel("control")
        self.channel.on("message", self._on_message)
        self.tasks: list[asyncio.Task] = []
        self.pc.on("track", self._on_track)

    def _on_message(self, message) -> None:
        import json

        try:
            self.rec.server.append(json.loads(message))
        except ValueError:
            pass

    def _on_track(self, track) -> None:
        self.tasks.append(asyncio.ensure_future(self._consume(track)))

    async def _consume(self, track) -> None:
        from aiortc.mediastreams import MediaStreamError

        while True:
            try:
                f = await track.recv()
            except MediaStreamError:
                return
            t = time.time()
            if track.kind == "audio":
                self.rec.audio.append((t, int(f.pts), _mono(f)))
            else:
                img = f.to_ndarray(format="bgr24") if self.keep_images else None
                self.rec.video.append((t, int(round(f.pts / VIDEO_TICKS)), img))

    async def connect(self, model: str | None = None, sdp: str | None = None) -> None:
        from aiortc import RTCSessionDescription

        await self.pc.setLocalDescription(await self.pc.createOffer())
        t0 = time.perf_counter()
        answer = await post_offer(self.url, {"sdp": sdp if sdp is not None else self.pc.localDescription.sdp,
                                             "type": "offer", "model": model or self.model})
        self.rec.answer_s = time.perf_counter() - t0
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))

    def interrupt(self) -> None:
        self.channel.send("interrupt")

    async def close(self) -> None:
        await self.pc.close()
        for t in self.tasks:
            t.cancel()


# ---------------------------------------------------------------------------------------------- analysis

def timeline(items: list, rate: int = RATE) -> tuple[float, np.ndarray]:
    """Audio frames (t, pts, samples) -> (wall time of sample 0, the samples placed by pts). The wall time is that
    of the least delayed frame (min of t - pts / rate): frames that waited in a buffer do not move it."""
    if not items:
        return float("nan"), np.zeros(0, np.float32)
    end = max(p + len(x) for _, p, x in items)
    out = np.zeros(end, np.float32)
    for _, p, x in items:
        out[p:p + len(x)] = x
    return min(t - p / rate for t, p, _ in items), out


def xcorr_lag(a: np.ndarray, b: np.ndarray) -> tuple[int, float]:
    """(lag, normalized peak): b[n] ~ a[n - lag] (b is a delayed a); the peak is the correlation coefficient."""
    n = len(a) + len(b)
    size = 1 << (n - 1).bit_length()
    fa, fb = np.fft.rfft(a, size), np.fft.rfft(b, size)
    c = np.fft.irfft(np.conj(fa) * fb, size)
    lag = int(np.argmax(c))
    if lag > size // 2:
        lag -= size
    sa, sb = (a, b[lag:]) if lag >= 0 else (a[-lag:], b)
    m = min(len(sa), len(sb))
    sa, sb = sa[:m], sb[:m]
    return lag, float(np.dot(sa, sb) / (float(np.linalg.norm(sa) * np.linalg.norm(sb)) or 1.0))


def envelope(x: np.ndarray, n: int = RATE // 1000) -> np.ndarray:
    """RMS over consecutive n-sample windows (1 ms by default)."""
    m = len(x) // n
    return np.sqrt(np.mean(np.square(x[:m * n].reshape(m, n), dtype=np.float64), axis=1))


def audio_match(sent: np.ndarray, got: np.ndarray) -> dict:
    """Where the sent audio sits in the received timeline, and how alike they are. Opus (twice: in and out) keeps
    the short-time level but not the waveform's phase, so the lag is that of the 1 ms RMS envelopes (the
    waveform's own peak is ambiguous within a pitch period) and "alike" is the correlation and level ratio of the 10
    ms envelopes."""
    n = RATE // 1000
    es, eg = envelope(sent, n), envelope(got, n)
    lag_ms, _ = xcorr_lag(es - es.mean(), eg - eg.mean())
    lag = lag_ms * n
    a, b = (sent, got[lag:]) if lag >= 0 else (sent[-lag:], got)
    w = 10 * n                                           # compared over 10 ms: a pitch period or more
    m = min(len(a), len(b)) // w * w
    ea, eb = envelope(a[:m], w), envelope(b[:m], w)
    loud = ea > 0.1 * ea.max()
    return {"lag": lag, "envelope_corr": float(np.corrcoef(ea, eb)[0, 1]),
            "gain": float(np.median(eb[loud] / ea[loud])) if loud.any() else float("nan")}


LAG_BACK_MS, LAG_AHEAD_MS = 200, 2000   # a burst is looked for this far before / after the previous burst's lag


def local_lag(piece: np.ndarray, got: np.ndarray, center: int, lo_ms: int, hi_ms: int) -> int:
    """Where `piece` starts in `got`, searched within [center + lo_ms, center + hi_ms] (1 ms envelopes, the
    normalized correlation's peak): bursts of speech look alike to a global search, so each is found near where
    the previous burst was (later when the server's clock fell behind), the first from lag 0 on."""
    n = RATE // 1000
    ep, eg = envelope(piece, n), envelope(got, n)
    ep = ep - ep.mean()
    best, best_c = center, -2.0
    for m in range(max(center // n + lo_ms, 0), min(center // n + hi_ms, len(eg) - len(ep)) + 1):
        seg = eg[m:m + len(ep)]
        seg = seg - seg.mean()
        c = float(np.dot(ep, seg) / ((np.linalg.norm(ep) * np.linalg.norm(seg)) or 1.0))
        if c > best_c:
            best, best_c = m * n, c
    return best


def onsets(x: np.ndarray, min_gap: int) -> list[int]:
    """First non-zero sample of every burst that follows at least min_gap zero samples (and the very first)."""
    nz = np.flatnonzero(np.abs(x) > 0)
    if not len(nz):
        return []
    starts = [int(nz[0])]
    gaps = np.flatnonzero(np.diff(nz) > min_gap)
    return starts + [int(nz[g + 1]) for g in gaps]


def box_diff(img: np.ndarray, template: np.ndarray, box) -> tuple[float, float]:
    """(mean |img - template| inside the face box, outside it), in levels."""
    x1, y1, x2, y2 = (int(v) for v in box)
    d = np.abs(img.astype(np.int16) - template.astype(np.int16))
    inside = d[y1:y2, x1:x2]
    total, n_in = d.sum(), inside.size
    return float(inside.mean()), float((total - inside.sum()) / max(d.size - n_in, 1))


def nearest_template(img: np.ndarray, templates: list[np.ndarray], boxes) -> tuple[int, float, float]:
    """(template, box diff, outside diff) of the template whose area outside its box is closest to img."""
    best = min(range(len(templates)), key=lambda t: box_diff(img, templates[t], boxes[t])[1])
    return (best, *box_diff(img, templates[best], boxes[best]))


def analyse(rec: Recording, templates: list[np.ndarray], boxes, lookahead: int, gap_s: float,
            changed_levels: float, burst_s: float) -> dict:
    """The latency figures of a recording (see the module docstring). Each burst is found in the received audio on
    its own (its lag can grow when the server's clock falls behind or a late packet left a gap)."""
    s0, sent = timeline(rec.sent)
    r0, got = timeline(rec.audio)
    match = audio_match(sent, got)
    video_t = {k: t for t, k, _ in rec.video}
    changed_at = {}
    for t, k, img in rec.video:
        _, inside, _ = nearest_template(img, templates, boxes)
        changed_at[k] = inside > changed_levels
    burst = int(burst_s * RATE)
    out, prev_lag = [], 0
    for o in onsets(sent, int(gap_s * RATE * 0.8)):
        lag = local_lag(sent[o:o + burst], got, o + prev_lag, -LAG_BACK_MS if out else 0, LAG_AHEAD_MS) - o
        w = RATE // 100                                 # is the burst there? (10 ms envelopes correlate)
        ea, eb = envelope(sent[o:o + burst], w), envelope(got[o + lag:o + lag + burst], w)
        corr = float(np.corrcoef(ea, eb)[0, 1]) if len(eb) == len(ea) else float("nan")
        if not corr > 0.5:                              # not there (the peer left first), or cut by gaps
            out.append({"onset_sent_s": round(o / RATE, 3), "received": False, "corr": round(corr, 3)})
            continue
        prev_lag = lag
        t_sent = s0 + o / RATE
        k_on = (o + lag) // SPF                         # the video frame that carries the onset (same clock)
        t_heard = next((t + (o + lag - p) / RATE for t, p, x in rec.audio if p <= o + lag < p + len(x)), None)
        span = [k for k in range(k_on - 12, k_on + int(burst_s * 25)) if k in video_t]
        first = next((k for k in span if changed_at[k]), None)
        gen = [changed_at[k] for k in span if k >= k_on]
        out.append({"onset_sent_s": round(o / RATE, 3), "received": True, "corr": round(corr, 3), "frame": int(k_on),
                    "to_heard_ms": round(1000 * (t_heard - t_sent), 1) if t_heard is not None else None,
                    "to_its_frame_ms": round(1000 * (video_t[k_on] - t_sent), 1) if k_on in video_t else None,
                    "its_mouth_generated": changed_at.get(int(k_on)),   # False: frame k_on came late (template)
                    "to_first_changed_mouth_ms": round(1000 * (video_t[first] - t_sent), 1) if first is not None
                    else None, "first_changed_frame": first,
                    "burst_frames_generated": f"{sum(gen)}/{len(gen)}"})
    server = rec.server[-1] if rec.server else {}
    return {"audio_delay_ms": out[0].get("to_heard_ms") if out else None,
            "audio_envelope_corr": round(match["envelope_corr"], 4), "audio_gain": round(match["gain"], 3),
            "lookahead_frames": lookahead, "onsets": out,
            "frames_received": len(rec.video), "server": server,
            "late_share_of_speech": round(server["late"] / server["speech"], 4) if server.get("speech") else None}


# ---------------------------------------------------------------------------------------------- measuring

def latency_wav(path: Path, lead_s: float, bursts: int, burst_s: float, gap_s: float) -> Path:
    """Silence, then `bursts` bursts of demo speech, each followed by gap_s of silence, 48 kHz mono PCM16. The
    demo speech's syllables repeat every few hundred ms, so each burst is scaled by its own seeded random level per
    30 ms (0.3..1, smoothed over 5 ms): the bursts then align with the received audio at one lag only."""
    from ..demo import make_speech, write_wav

    parts = [np.zeros(int(lead_s * RATE), np.float32)]
    block, ramp = RATE * 3 // 100, RATE // 200
    for b in range(bursts):
        x = make_speech(burst_s, rate=RATE, seed=b)
        gains = np.random.default_rng(1000 + b).uniform(0.3, 1.0, len(x) // block + 1)
        env = np.convolve(np.repeat(gains, block)[:len(x)], np.ones(ramp) / ramp, mode="same")
        parts += [(x * env).astype(np.float32), np.zeros(int(gap_s * RATE), np.float32)]
    return write_wav(path, np.concatenate(parts), RATE)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (and its threads), seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure_latency(url: str, model: str, wav: Path, seconds: float, templates, boxes, lookahead: int,
                          gap_s: float, changed_levels: float, burst_s: float) -> dict:
    peer = Peer(url, model, wav)
    await peer.connect()
    await asyncio.sleep(seconds)
    # a server clock that fell behind (a slip) plays the end later: wait (10 s at most) until the received audio
    # reaches 1.5 s past the end of what was sent
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        sent_end = max((p + len(x) for _, p, x in peer.rec.sent), default=0)
        got_end = max((p + len(x) for _, p, x in peer.rec.audio), default=0)
        if got_end >= sent_end + int(1.5 * RATE):
            break
        await asyncio.sleep(0.2)
    await peer.close()
    return analyse(peer.rec, templates, boxes, lookahead, gap_s, changed_levels, burst_s)


async def measure_idle(url: str, model: str, pid: int, streams: int, seconds: float, settle: float = 3.0) -> dict:
    """Server CPU over `seconds` with no peer, then with `streams` silent peers."""
    c0 = cpu_seconds(pid)
    await asyncio.sleep(seconds)
    base = (cpu_seconds(pid) - c0) / seconds
    peers = [Peer(url, model, None, keep_images=False) for _ in range(streams)]
    for p in peers:
        await p.connect()
    await asyncio.sleep(settle)
    c0 = cpu_seconds(pid)
    await asyncio.sleep(seconds)
    busy = (cpu_seconds(pid) - c0) / seconds
    frames = [len(p.rec.video) for p in peers]
    counts = [p.rec.server[-1] if p.rec.server else {} for p in peers]
    for p in peers:
        await p.close()
    return {"streams": streams, "seconds": seconds, "server_cpu_no_peer_pct": round(100 * base, 1),
            "server_cpu_pct": round(100 * busy, 1),
            "per_stream_cpu_pct": round(100 * (busy - base) / streams, 2),
            "frames_received_per_peer": frames, "speech_frames": sum(c.get("speech", 0) for c in counts),
            "idle_frames": sum(c.get("idle", 0) for c in counts)}


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m lipsync_trt.bench webrtc", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--backend", default="onnxruntime", help="the server's --backend (default onnxruntime)")
    p.add_argument("--bursts", type=int, default=6, help="speech bursts in the latency WAV (default 6)")
    p.add_argument("--burst-s", type=float, default=0.8, help="length of each burst (default 0.8 s)")
    p.add_argument("--gap", type=float, default=2.2, help="silence after each burst (default 2.2 s)")
    p.add_argument("--idle-streams", type=int, default=8, help="silent peers for the idle CPU figure (0: skip)")
    p.add_argument("--seconds", type=float, default=20.0, help="length of the idle CPU windows (default 20 s)")
    p.add_argument("--wait-ms", type=float, default=30.0, help="the server's --webrtc-wait-ms (default 30)")
    p.add_argument("--max-delay-ms", type=float, default=None,
                   help="the server's --max-delay-ms (the batcher's deadline; default: the server's, 1000; 0: none)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    from ..bench.machine import loadavg, machine
    from ..bench.report import write_json
    from ..demo import demo_checkpoints, make_avatar
    from .serve import ServerProcess
    from .. import avatar as AV
    from ..live import lookahead as live_lookahead
    from ..serve.webrtc import PREROLL_S

    with tempfile.TemporaryDirectory(prefix="lipsync_bench_webrtc_") as tmp:
        gen, enc = demo_checkpoints(tmp)
        av_dir = make_avatar(f"{tmp}/avatar")
        av = AV.load(av_dir)
        templates = [av.frame(t) for t in range(av.count)]
        cmd = [sys.executable, "-m", "lipsync_trt", "serve", "--avatar", f"demo={av_dir}", "--generator", str(gen),
               "--audio-encoder", str(enc), "--backend", args.backend, "--device", "cpu", "--port", "0",
               "--webrtc", "--webrtc-wait-ms", str(args.wait_ms), "--max-streams", str(max(8, args.idle_streams))]
        if args.max_delay_ms is not None:
            cmd += ["--max-delay-ms", str(args.max_delay_ms)]
        load_before = loadavg()
        server = ServerProcess(cmd)
        url = f"http://{server.host}:{server.port}/"
        try:
            wav = latency_wav(Path(tmp) / "latency.wav", 2.0, args.bursts, args.burst_s, args.gap)
            seconds = 2.0 + args.bursts * (args.burst_s + args.gap) + 1.0
            lat = asyncio.run(measure_latency(url, "demo", wav, seconds, templates, av.boxes, live_lookahead(RATE),
                                              args.gap, changed_levels=6.0, burst_s=args.burst_s))
            idle = asyncio.run(measure_idle(url, "demo", server.proc.pid, args.idle_streams, args.seconds)) \
                if args.idle_streams else None
        finally:
            server.stop()
    report = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
              "command": "python -m lipsync_trt.bench webrtc " + " ".join(argv if argv is not None else sys.argv[1:]),
              "server": {"backend": server.backend, "wait_ms": args.wait_ms, "max_delay_ms": args.max_delay_ms,
                         "preroll_ms": 1000 * PREROLL_S},
              "loadavg_before": load_before, "loadavg_after": loadavg(), "latency": lat, "idle": idle}
    _print(report)
    if args.json:
        write_json(report, args.json)
    return 0


def _print(r: dict) -> None:
    lat = r["latency"]
    print(f"audio delay {lat['audio_delay_ms']} ms (envelope corr {lat['audio_envelope_corr']}, gain "
          f"{lat['audio_gain']}), lookahead {lat['lookahead_frames']} "
          f"frames; late {lat['late_share_of_speech']} of speech frames; server {lat['server']}")
    for o in lat["onsets"]:
        if not o["received"]:
            print(f"  onset at {o['onset_sent_s']} s: not found in the received audio (envelope corr {o['corr']})")
            continue
        print(f"  onset at {o['onset_sent_s']} s (corr {o['corr']}): heard +{o['to_heard_ms']} ms, "
              f"its frame +{o['to_its_frame_ms']} ms "
              f"(generated: {o['its_mouth_generated']}), first changed mouth +{o['to_first_changed_mouth_ms']} ms "
              f"(frame {o['first_changed_frame']} for onset frame {o['frame']}); burst frames generated "
              f"{o['burst_frames_generated']}")
    if r["idle"]:
        i = r["idle"]
        print(f"idle: {i['streams']} peers, server CPU {i['server_cpu_pct']}% (no peer {i['server_cpu_no_peer_pct']}%),"
              f" {i['per_stream_cpu_pct']}% per stream")


if __name__ == "__main__":
    sys.exit(main())
