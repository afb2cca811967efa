"""python -m lipsync_trt.bench serve: the streaming server under K concurrent real-time streams.

Starts `python -m lipsync_trt serve` in a subprocess (or uses a running server with --url), then for K = 1, 2,
4, ... opens K WebSocket connections that each send one 40 ms chunk of 24 kHz speech every 40 ms (real time)
for --duration seconds, then end of stream, and times every answer.

Latency beyond the algorithmic delay: frame i's answer time minus the send time of chunk ready_chunk(i), the
chunk whose arrival makes frame i ready (i + 11 or i + 12, docs/PROTOCOL.md "Delay"). That is what serving adds
(queueing, batch wait, encoder, generator, JPEG/ZIP, network) on top of the 480/520 ms the recipe itself needs.
`latency_ms` covers the generated frames made mid-stream (a live stream's steady state); the ~11 frames per
stream that only the END message completes (they all become ready at once) are reported apart
(`latency_end_flush_ms`, from the END's send time).

K streams keep up when every frame of every stream is answered with a generated mouth (none OVERLOADED, reused,
failed or missing) and the p99 latency beyond the algorithmic delay is at most --budget-ms (default 150). The
ramp doubles K until a K does not keep up (or --max-k) and reports the largest K that did.

Clients are the library's own (`lipsync_trt.serve.client.stream`), in this process (an asyncio loop;
--client-procs N spreads the streams over N processes, which many streams need: one Python loop sends and receives
~25 messages per second per stream).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..cli_args import Parser
from ..serve import client
from ..serve.protocol import CHUNK_SAMPLES, CHUNK_SECONDS, STREAM_RATE, Status
from ..serve.session import ready_chunk
from .machine import loadavg, machine
from .measure import log
from .report import write_json
from .serving import ServerProcess, get_json, generator_only, http_of, server_command

BENCHMARK = ("serve", "the streaming server (seed WebSocket protocol) under K concurrent real-time streams")
SCHEMA = 1
PACE = CHUNK_SECONDS               # seconds per chunk: real time (0.04 s, one video frame)


# ---------------------------------------------------------------------------------------------- clients

async def _stream(session, url: str, model: str, audio24: np.ndarray, t_start: float, pace: float | None,
                  timeout: float) -> dict:
    """One stream through the library's client (`serve.client.stream`), chunk 0 due at t_start (time.perf_counter),
    as the timings `analyse` reads: chunk (and END) send times, how late each chunk went out, (frame id, status,
    reused, arrival) per answer, and the END's frame id and arrival. A refused or timed-out stream keeps what came."""
    res = client.StreamResult()
    refused = None
    try:
        await client.stream(url, model, audio24, pace=pace, session=session, timeout=timeout, start=t_start,
                            result=res)
    except asyncio.TimeoutError:
        pass
    except client.StreamRefused as exc:
        refused = str(exc)
    chunks = len(audio24) // CHUNK_SAMPLES
    planned = [t_start + c * (pace or 0.0) for c in range(chunks + 1)]
    sent = [res.sent_at.get(c, planned[c]) for c in range(chunks)] + [res.end_sent_at or planned[-1]]
    late = [max(0.0, sent[c] - planned[c]) if pace else 0.0 for c in range(chunks)] + [0.0]
    answers, end = [], {}
    for r, t in zip(res.responses, res.received_at):
        if r.status == Status.END:
            end = {"frame_id": r.frame_id, "t": t}
        else:
            answers.append((r.frame_id, r.status, r.status == Status.OK and r.reused, t))
    out = {"sent": sent, "late": late, "answers": answers, "end": end}
    if refused:
        out["refused"] = refused
    return out


async def _streams(url: str, model: str, audios: list[np.ndarray], t_start: float, pace: float | None,
                   stagger: float, timeout: float) -> list[dict]:
    import aiohttp

    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as session:
        return await asyncio.gather(*[_stream(session, url, model, a, t_start + k * stagger, pace, timeout)
                                      for k, a in enumerate(audios)])


def _client_proc(job: tuple) -> list[dict]:
    return asyncio.run(_streams(*job))


def run_clients(url: str, model: str, audios: list[np.ndarray], pace: float | None, procs: int, timeout: float,
                lead: float = 1.0) -> list[dict]:
    """Every stream's timings; streams start `lead` s from now, spread evenly over one chunk period."""
    k = len(audios)
    stagger = (pace or 0.0) / max(k, 1)
    if procs <= 1 or k == 1:
        return asyncio.run(_streams(url, model, audios, time.perf_counter() + lead, pace, stagger, timeout))
    import concurrent.futures as cf
    import multiprocessing as mp

    procs = min(procs, k)
    t_start = time.perf_counter() + lead + 2.0               # spawn takes a moment (perf_counter: one system-wide clock)
    jobs = [(url, model, audios[i::procs], t_start + i * stagger, pace, stagger * procs, timeout) for i in range(procs)]
    with cf.ProcessPoolExecutor(procs, mp_context=mp.get_context("spawn")) as ex:
        parts = list(ex.map(_client_proc, jobs))
    out: list[dict] = [None] * k                              # type: ignore[list-item]
    for i, part in enumerate(parts):
        out[i::procs] = part
    return out


# ---------------------------------------------------------------------------------------------- analysis

def _pct(values, qs=(50, 90, 99)) -> dict:
    v = np.asarray(values, np.float64)
    if not v.size:
        return {}
    out = {f"p{q}": round(float(np.percentile(v, q)), 1) for q in qs}
    out.update(max=round(float(v.max()), 1), mean=round(float(v.mean()), 1), n=int(v.size))
    return out


def analyse(k: int, chunks: int, runs: list[dict], wall: float, budget_ms: float, pace: float = PACE) -> dict:
    """One ramp step: frame counts by kind, latency beyond the algorithmic delay (ms), throughput, verdict."""
    frames_per = chunks - 1
    lat_made, lat_flush, lat_all, first_s, last_s, late = [], [], [], [], [], []
    counts = {"made": 0, "reused": 0, "overloaded": 0, "internal": 0, "other": 0, "missing": 0, "no_end": 0}
    t0 = min(r["sent"][0] for r in runs)
    t_last = t0
    for r in runs:
        sent, end_t = r["sent"], r["sent"][-1]
        late += [x * 1000 for x in r["late"]]
        ids = set()
        for fid, status, reused, t in r["answers"]:
            ids.add(fid)
            c = ready_chunk(fid)
            ms = (t - (sent[c] if c < chunks else end_t)) * 1000
            lat_all.append(ms)
            t_last = max(t_last, t)
            if status == Status.OK and not reused:
                counts["made"] += 1
                (lat_made if c < chunks else lat_flush).append(ms)
                if fid < 25:
                    first_s.append(ms)
                elif fid >= frames_per - 25:
                    last_s.append(ms)
            elif status == Status.OK:
                counts["reused"] += 1
            elif status == Status.OVERLOADED:
                counts["overloaded"] += 1
            elif status == Status.INTERNAL:
                counts["internal"] += 1
            else:
                counts["other"] += 1
        counts["missing"] += len(set(range(frames_per)) - ids)
        counts["no_end"] += int(r["end"].get("frame_id") != frames_per)
    lat = _pct(lat_made)
    why = []
    for key in ("reused", "overloaded", "internal", "other", "missing", "no_end"):
        if counts[key]:
            why.append(f"{counts[key]} {key}")
    if lat and lat["p99"] > budget_ms:
        why.append(f"p99 {lat['p99']:.0f} ms > {budget_ms:g} ms")
    return {
        "k": k, "chunks_per_stream": chunks, "frames_expected": k * frames_per, "frames": counts,
        "latency_ms": lat, "latency_end_flush_ms": _pct(lat_flush), "latency_all_answers_ms": _pct(lat_all),
        "latency_first_second_ms_p50": round(float(np.median(first_s)), 1) if first_s else None,
        "latency_last_second_ms_p50": round(float(np.median(last_s)), 1) if last_s else None,
        "made_fps": round(counts["made"] / max(t_last - t0, 1e-9), 2),
        "needed_fps": round(k / pace, 2), "client_send_late_ms": _pct(late, (50, 99)), "wall_s": round(wall, 2),
        "keeps_up": not why, "why_not": why,
    }


# ---------------------------------------------------------------------------------------------- inputs

def load_audio24(path: str | None, seconds: float, streams: int, seed: int = 0) -> list[np.ndarray]:
    """Per stream `seconds` of 24 kHz speech: windows of the WAV at different offsets (it loops), or synthetic."""
    n = int(round(seconds / PACE)) * CHUNK_SAMPLES
    if path is None:
        from ..demo import make_speech

        return [make_speech(seconds, STREAM_RATE, seed=seed + k)[:n] for k in range(streams)]
    import soxr

    from .. import audio as A

    data, rate = A.load(path)
    x = data.mean(axis=1).astype(np.float32)
    x24 = soxr.resample(x, rate, STREAM_RATE, quality="HQ").astype(np.float32)
    reps = -(-(n + len(x24)) // len(x24))
    loop = np.tile(x24, reps)
    step = max(1, (len(x24) // max(streams, 1)) // CHUNK_SAMPLES * CHUNK_SAMPLES)
    return [loop[(k * step) % len(x24):][:n] for k in range(streams)]


# ---------------------------------------------------------------------------------------------- CLI

def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(
        prog="python -m lipsync_trt.bench serve",
        description="Latency and capacity of the streaming server: K concurrent real-time streams (one 40 ms "
                    "chunk every 40 ms each), K = 1, 2, 4, ... until the server falls behind. Writes a table "
                    "(stdout) and a JSON.")
    src = p.add_argument_group("inputs")
    src.add_argument("--avatar", help="avatar folder served for the streams (SyncTalk_2D layout)")
    src.add_argument("--name", help="model name to serve it under (default: the folder's name; 'demo' with --demo)")
    src.add_argument("--audio", help="speech WAV the streams send (any rate; each stream starts at another offset "
                                     "and it loops); default: talk_hb.wav next to --avatar if there, else synthetic")
    src.add_argument("--generator", help="generator checkpoint; default: seeded demo weights (speed does not "
                                         "depend on weight values)")
    src.add_argument("--audio-encoder", help="audio encoder checkpoint; default: seeded demo weights")
    src.add_argument("--demo", action="store_true", help="serve the synthetic 256x192 demo avatar with seeded "
                                                         "weights (no files needed); synthetic speech")
    src.add_argument("--engines", help="folder of built ONNX/TensorRT artifacts for the server")
    src.add_argument("--url", help="measure a server already running at this ws:// URL (serving --name) "
                                   "instead of starting one")
    srv = p.add_argument_group("server (passed to `python -m lipsync_trt serve`)")
    srv.add_argument("--backend", default="auto", help="auto, torch, onnxruntime, tensorrt, coreml (default auto)")
    srv.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    srv.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    srv.add_argument("--max-batch", type=int, default=None,
                     help="server --max-batch (default: the server's: 1 on a CPU, 8 on CUDA)")
    srv.add_argument("--max-wait-ms", type=float, default=None, help="server --max-wait-ms (default 10)")
    srv.add_argument("--max-queue", type=int, default=None, help="server --max-queue (default 50)")
    srv.add_argument("--max-delay-ms", type=float, default=None, help="server --max-delay-ms (default 1000; 0 = none)")
    srv.add_argument("--policy", default=None, choices=["reject", "skip"], help="server --policy (default reject)")
    run = p.add_argument_group("run")
    run.add_argument("--duration", type=float, default=10.0, help="seconds of audio per stream (default 10)")
    run.add_argument("--generator-seconds", type=float, default=5.0,
                     help="before the server starts, time the generator alone (same backend, device and batch as "
                          "the server) for this long, as the mouths/s ceiling to compare with (default 5; 0 = skip)")
    run.add_argument("--streams", help="comma list of K to run, e.g. 1,2,4 (default: the ramp 1, 2, 4, ... up to "
                                       "--max-k, stopping after the first K that falls behind)")
    run.add_argument("--max-k", type=int, default=256, help="largest K of the ramp (default 256)")
    run.add_argument("--pace", type=float, default=PACE,
                     help="seconds between a stream's chunks (default 0.04 = real time). A larger value models a "
                          "slower-than-real-time stream: a slow machine can then show its latency when it is not "
                          "behind (fps needed scales to 1/pace per stream)")
    run.add_argument("--budget-ms", type=float, default=150.0,
                     help="p99 latency beyond the algorithmic delay that still counts as keeping up (default 150)")
    run.add_argument("--client-procs", type=int, default=1,
                     help="client processes the streams are spread over (default 1; use more for many streams)")
    run.add_argument("--warmup", type=float, default=2.0,
                     help="seconds of audio of the warm-up streams before measuring, one sent at once and one paced "
                          "(default 2; 0 = none)")
    out = p.add_argument_group("output")
    out.add_argument("--json", default="serve_bench.json", help="results JSON (default ./serve_bench.json)")
    args = p.parse_args(argv)
    if args.duration < 0.5 or args.max_k < 1 or args.budget_ms <= 0 or args.client_procs < 1 or args.pace <= 0:
        p.error("--duration must be >= 0.5 s, --max-k and --client-procs >= 1, --budget-ms and --pace > 0")
    if args.streams:
        try:
            args.streams = [int(v) for v in args.streams.split(",") if v.strip()]
        except ValueError:
            p.error("--streams: a comma list of whole numbers, e.g. 1,2,4")
        if not args.streams or min(args.streams) < 1:
            p.error("--streams: every K must be >= 1")
    if not args.demo and not args.avatar and not args.url:
        p.error("give --avatar DIR, --demo or --url")
    return args


def table(report: dict) -> str:
    rows = [f"streaming server: {report['inputs']['avatar']}, backend {report['server'].get('backend')}, "
            f"{report['config']['duration']:g} s of audio per stream, one chunk every {report['config']['pace']:g} s, "
            f"budget p99 <= {report['config']['budget_ms']:g} ms beyond the algorithmic delay",
            f"{'K':>4} {'made':>6} {'refused':>8} {'reused':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
            f"{'fps made':>9} {'needed':>7}  verdict"]
    for r in report["results"]:
        f, lat = r["frames"], r["latency_ms"]
        rows.append(f"{r['k']:>4} {f['made']:>6} {f['overloaded']:>8} {f['reused']:>7} {lat.get('p50', float('nan')):>8.1f} "
                    f"{lat.get('p99', float('nan')):>8.1f} {lat.get('max', float('nan')):>8.1f} {r['made_fps']:>9.1f} "
                    f"{r['needed_fps']:>7g}  {'keeps up' if r['keeps_up'] else 'behind: ' + ', '.join(r['why_not'])}")
    rows.append(f"largest K keeping up: {report['max_streams_keeping_up']}")
    g = report.get("generator_only")
    if g:
        rows.append(f"generator alone ({g['backend']} {g['device']}, batch {g['batch']}): {g['fps']:.2f} frames/s "
                    f"(before/after the server: {g['before']['fps']:.2f}/{g['after']['fps']:.2f}); "
                    "server mouths/s: " + ", ".join(f"K={r['k']} {r['made_fps']:.2f} ({r['made_fps'] / g['fps']:.0%})"
                                                    for r in report["results"]))
    return "\n".join(rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.name is None:
        args.name = "demo" if args.demo else (Path(args.avatar).name if args.avatar else None)
    if args.url and not args.name:
        raise SystemExit("--url needs --name (the model name the server serves)")
    created = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    info = machine()
    ks = args.streams or [k for k in (2 ** i for i in range(20)) if k <= args.max_k]
    audio_path = args.audio
    if audio_path is None and args.avatar and not args.demo and Path(args.avatar, "talk_hb.wav").is_file():
        audio_path = str(Path(args.avatar, "talk_hb.wav"))
    results = []
    with tempfile.TemporaryDirectory(prefix="lipsync_serve_bench_") as tmpdir:
        server, server_info = None, {"url": args.url}
        inputs = {"avatar": args.url or "?", "name": args.name}
        generator = None
        if args.generator_seconds > 0 and not args.url:
            from ..serve.config import default_max_batch
            from .. import backends

            batch = args.max_batch or default_max_batch(backends.resolve_device(args.device))
            generator = {"before": generator_only(args, Path(tmpdir), batch, args.generator_seconds)}
            log(f"generator alone: {generator['before']['fps']} frames/s (batch {batch})")
        if not args.url:
            cmd, inputs = server_command(args, Path(tmpdir), max(ks))
            log("starting: " + " ".join(cmd))
            server = ServerProcess(cmd)
            server_info = {"url": server.url, "backend": server.backend, "command": " ".join(cmd[1:])}
            log(f"server up at {server.url} (backend {server.backend})")
        url = server_info["url"]
        try:
            if args.warmup > 0:        # first calls at each batch size, template cache: unpaced, then paced
                w = load_audio24(audio_path, args.warmup, 1, seed=999)[0]
                run_clients(url, args.name, [w], None, 1, timeout=600)
                run_clients(url, args.name, [w], args.pace, 1, timeout=600, lead=0.1)
            for k in ks:
                audio = load_audio24(audio_path, args.duration, k)
                before = asyncio.run(get_json(http_of(url), "stats"))
                t = time.monotonic()
                runs = run_clients(url, args.name, audio, args.pace, args.client_procs,
                                   timeout=max(120.0, 10 * args.duration * args.pace / PACE))
                wall = time.monotonic() - t
                after = asyncio.run(get_json(http_of(url), "stats"))
                res = analyse(k, len(audio[0]) // CHUNK_SAMPLES, runs, wall, args.budget_ms, args.pace)
                b0, b1 = before.get("counters", {}), after.get("counters", {})
                batches = b1.get("batches", 0) - b0.get("batches", 0)
                frames = b1.get("frames", 0) - b0.get("frames", 0)
                res["server"] = {"batches": batches, "frames": frames,
                                 "mean_batch": round(frames / batches, 2) if batches else None,
                                 "ready_to_zip_ms_cumulative": after.get("ready_to_zip_ms")}
                results.append(res)
                lat = res["latency_ms"]
                log(f"K={k}: made {res['frames']['made']}/{res['frames_expected']}, p50 {lat.get('p50')} ms, "
                    f"p99 {lat.get('p99')} ms, {res['made_fps']} fps made of {res['needed_fps']} needed: "
                    + ("keeps up" if res["keeps_up"] else "behind (" + ", ".join(res["why_not"]) + ")"))
                if not res["keeps_up"] and not args.streams:
                    break
        finally:
            if server is not None:
                server_info["log_tail"] = "".join(server.lines[-20:])
                server.stop()
        if generator:     # again once the server is gone: on a shared machine the load moves during a run
            generator["after"] = generator_only(args, Path(tmpdir), generator["before"]["batch"],
                                                args.generator_seconds)
            fps = [generator[k]["fps"] for k in ("before", "after")]
            generator.update({k: generator["before"][k] for k in ("backend", "device", "batch")},
                             fps=round(sum(fps) / 2, 2))
            log(f"generator alone after the server: {fps[1]} frames/s; mean {generator['fps']}")
    kept = [r["k"] for r in results if r["keeps_up"]]
    report = {
        "schema": SCHEMA, "created": created,
        "command": " ".join([Path(sys.executable).name, "-m", "lipsync_trt.bench", "serve"]
                           + (sys.argv[1:] if argv is None else list(argv))),
        "config": {k: v for k, v in vars(args).items()}, "machine": info, "inputs": {**inputs, "audio": audio_path or
                                                                                     "synthetic speech"},
        "server": server_info,
        "algorithmic_delay": {"chunks": "i + 11 (86 %) or i + 12 (14 %)", "ms_from_frame_start": [480, 520],
                              "note": "latency figures are beyond it: from the send of chunk ready_chunk(i)"},
        "results": results, "max_streams_keeping_up": max(kept) if kept else 0,
        "generator_only": generator,
    }
    info["loadavg_end"] = loadavg()
    print(table(report))
    write_json(report, args.json)
    log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
