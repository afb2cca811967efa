"""`python -m lipsync_trt.bench distributed batch|serve`: Ray's cost, measured side by side in one run.

batch: the same jobs without Ray and on local Ray workers (1 and N), in interleaved rounds (jobs/s, frames/s).
serve: the plain server and `serve --ray local` (1 replica) running at once, the serve benchmark
(`python -m lipsync_trt.bench serve`) against each in turn at a pace this machine keeps up with (latency beyond the
algorithmic delay, p50/p99)."""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from ..cli_args import Parser

BENCHMARK = ("distributed", "Ray's cost: batch jobs without Ray vs on Ray workers, the server vs serve --ray "
                            "(subcommands batch, serve)")


def make_jobs(root: Path, count: int, seconds: float, avatar: str | None, audio: str | None,
              generator: str | None, audio_encoder: str | None) -> list:
    """`count` MP4 jobs: the demo avatar + checkpoints and seeded speech, or the files given."""
    from ..demo import demo_checkpoints, make_avatar, make_speech, write_wav
    from ..distributed.jobs import Job

    if generator is None or audio_encoder is None:
        generator, audio_encoder = (str(p) for p in demo_checkpoints(root / "weights"))
    avatar = avatar or str(make_avatar(root / "avatar"))
    jobs = []
    for k in range(count):
        wav = audio or str(write_wav(root / f"speech{k}.wav", make_speech(seconds, seed=100 + k)))
        jobs.append(Job(line=k + 1, avatar=str(Path(avatar).resolve()), audio=str(Path(wav).resolve()),
                        generator=str(Path(generator).resolve()), audio_encoder=str(Path(audio_encoder).resolve()),
                        out=str(root / "out" / f"{k}.mp4")))
    return jobs


def retarget(jobs: list, folder: Path) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    return [replace(j, out=str(folder / Path(j.out).name)) for j in jobs]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        return serve_main(argv[1:])
    if argv[:1] == ["batch"]:
        argv = argv[1:]
    p = Parser(prog="python -m lipsync_trt.bench distributed batch", description=__doc__)
    p.add_argument("--jobs", type=int, default=4, help="jobs per batch (default 4)")
    p.add_argument("--seconds", type=float, default=1.0, help="seconds of demo speech per job (default 1.0)")
    p.add_argument("--workers", default="1,2", help="Ray worker counts to measure (default 1,2)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--avatar"), p.add_argument("--audio")
    p.add_argument("--generator"), p.add_argument("--audio-encoder")
    p.add_argument("--json", metavar="OUT.json", help="write the raw samples and the machine here")
    args = p.parse_args(argv)

    import ray

    from ..distributed.batch import run_local, run_ray
    from .machine import machine

    counts = [int(w) for w in args.workers.split(",")]
    renderer = {"backend": args.backend, "device": args.device}
    with tempfile.TemporaryDirectory(prefix="lipsync_batch_bench_") as tmp:
        root = Path(tmp)
        jobs = make_jobs(root, args.jobs, args.seconds, args.avatar, args.audio, args.generator, args.audio_encoder)
        warm = run_local(jobs[:1], **renderer)   # ONNX export / engine build once, outside the timings
        assert warm.exit_code == 0, warm.summary()
        t0 = time.perf_counter()
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        ray_start = time.perf_counter() - t0
        configs = ["local"] + [f"ray:{w}" for w in counts]
        samples: dict[str, list[dict]] = {c: [] for c in configs}
        try:
            for r in range(args.rounds):
                for c in configs:
                    batch = retarget(jobs, root / f"r{r}-{c.replace(':', '')}")
                    if c == "local":
                        rep = run_local(batch, **renderer)
                    else:
                        rep = run_ray(batch, workers=int(c.split(":")[1]), **renderer)
                    assert rep.exit_code == 0, rep.summary()
                    t = rep.summary()["totals"]
                    busy = sum(r.seconds for r in rep.results.values())   # inside the workers' render calls
                    samples[c].append({"seconds": t["seconds"], "frames": t["frames"], "jobs": t["done"],
                                       "render_seconds": round(busy, 3)})
                    print(f"round {r} {c:8s} {t['done']} jobs {t['frames']} frames in {t['seconds']:.1f} s "
                          f"({t['frames_per_s']:.2f} frames/s)", file=sys.stderr, flush=True)
        finally:
            ray.shutdown()
    base = statistics.median(s["frames"] / s["seconds"] for s in samples["local"])
    rows = []
    for c in configs:
        fps = statistics.median(s["frames"] / s["seconds"] for s in samples[c])
        jps = statistics.median(s["jobs"] / s["seconds"] for s in samples[c])
        workers = 1 if c == "local" else int(c.split(":")[1])
        outside = statistics.median(s["seconds"] - s["render_seconds"] / workers for s in samples[c])
        rows.append({"config": c, "jobs_per_s": round(jps, 4), "frames_per_s": round(fps, 3),
                     "vs_local": round(fps / base, 3), "seconds_outside_render": round(outside, 2)})
    print(f"Ray start (ray.init, local instance): {ray_start:.1f} s")
    print("| config | jobs/s | frames/s | vs without Ray | wall s outside the render calls |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['config']} | {row['jobs_per_s']:.3f} | {row['frames_per_s']:.2f} | {row['vs_local']:.2f}x | "
              f"{row['seconds_outside_render']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "machine": machine(), "ray_init_s": ray_start,
                                               "rows": rows, "samples": samples}, indent=2) + "\n")
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(port: int, proc, timeout: float = 900.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/avatars.json", timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"server on port {port} not ready after {timeout:g} s")


def serve_main(argv: list[str]) -> int:
    import signal
    import subprocess

    p = Parser(prog="python -m lipsync_trt.bench distributed serve", description=__doc__)
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--device", default="cpu")
    p.add_argument("--pace", type=float, default=0.2, help="seconds between chunks (default 0.2: 5 frames/s)")
    p.add_argument("--duration", type=float, default=6.0, help="seconds of audio per stream (default 6)")
    p.add_argument("--streams", default="1", help="K concurrent streams (default 1)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", metavar="OUT.json")
    args = p.parse_args(argv)

    from .machine import machine

    base = [sys.executable, "-m", "lipsync_trt", "serve", "--demo", "--host", "127.0.0.1", "--backend", args.backend,
            "--device", args.device]
    ports = {"plain": _free_port(), "ray": _free_port()}
    procs = {"plain": subprocess.Popen(base + ["--port", str(ports["plain"])], stderr=subprocess.DEVNULL),
             "ray": subprocess.Popen(base + ["--port", str(ports["ray"]), "--ray", "local", "--replicas", "1"],
                                     stderr=subprocess.DEVNULL)}
    samples: dict[str, list[dict]] = {"plain": [], "ray": []}
    with tempfile.TemporaryDirectory(prefix="lipsync_serve_ray_bench_") as tmp:
        try:
            for name, proc in procs.items():
                _wait_ready(ports[name], proc)
            for r in range(args.rounds):
                for name in ("plain", "ray"):
                    out = Path(tmp) / f"{name}{r}.json"
                    subprocess.run([sys.executable, "-m", "lipsync_trt.bench", "serve", "--url",
                                    f"ws://127.0.0.1:{ports[name]}/", "--name", "demo", "--streams", args.streams,
                                    "--duration", str(args.duration), "--pace", str(args.pace), "--json", str(out)],
                                   check=True, stdout=subprocess.DEVNULL)
                    for res in json.loads(out.read_text())["results"]:
                        row = {"k": res["k"], **{q: res["latency_ms"][q] for q in ("p50", "p99")},
                               "made": res["frames"]["made"], "expected": res["frames_expected"]}
                        samples[name].append(row)
                        print(f"round {r} {name:5s} K={row['k']} p50 {row['p50']:.0f} ms p99 {row['p99']:.0f} ms, "
                              f"{row['made']}/{row['expected']} frames made", file=sys.stderr, flush=True)
        finally:
            for proc in procs.values():
                proc.send_signal(signal.SIGINT)
            for proc in procs.values():
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    proc.kill()
    print("| server | K | latency p50 (ms) | latency p99 (ms) | frames made |\n|---|---|---|---|---|")
    for name, rows in samples.items():
        for row in rows:
            print(f"| {name} | {row['k']} | {row['p50']:.0f} | {row['p99']:.0f} | {row['made']}/{row['expected']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "machine": machine(), "samples": samples},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
