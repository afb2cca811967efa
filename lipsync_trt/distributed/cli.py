"""`python -m lipsync_trt batch JOBS.jsonl`: render many clips, here or on a Ray cluster, with a progress bar."""
from __future__ import annotations

import argparse
import sys
import tempfile

from ..cli_args import add_backend_args
from ..errors import UsageError
from .serve_options import check_serve_ray_args, preflight, serve_ray_plan

JOBS_HELP = ("JOBS.jsonl: one JSON object a line with generate's fields: avatar, audio, generator, audio_encoder "
             "(required), out and/or frames_dir, optional frames ('0-99,120' or a list), start_frame, crf, preset. "
             "Relative paths are relative to the JOBS file's folder; missing output folders are created.")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "batch", help="render many clips from a JOBS.jsonl file, here or on Ray workers",
        description="Render every job of JOBS.jsonl (see JOBS below). Without --ray the jobs run here, one after "
                    "another; with --ray they run on Ray worker actors (one per GPU on a GPU cluster, --workers on "
                    "CPUs), each loading an avatar + checkpoints once for all its jobs. Outputs are written "
                    "atomically; a job whose outputs are already complete is skipped (so rerunning a crashed batch "
                    "resumes it) unless --overwrite. A failing job is recorded and the others go on. "
                    "Exit code: 0 all succeeded, 1 some failed, 2 unusable arguments or JOBS file.",
        epilog=JOBS_HELP + " Ray is optional: pip install -e '.[ray]'.")
    p.add_argument("jobs", metavar="JOBS.jsonl", help="the jobs file (a bad line stops everything before it starts)")
    p.add_argument("--ray", metavar="local|auto|ADDRESS", default=None,
                   help="run on Ray: 'local' starts a Ray instance on this machine, 'auto' joins the cluster this "
                        "machine belongs to, or a cluster address (host:6379, ray://host:10001). Every node must "
                        "see the JOBS paths (a shared filesystem) and have lipsync_trt installed")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="Ray worker actors (default: one per GPU in the cluster, else 1); never more than jobs")
    p.add_argument("--gpus-per-worker", type=float, default=None, metavar="G",
                   help="GPUs each worker reserves (default 1 when the cluster has GPUs, else 0)")
    p.add_argument("--cpus-per-worker", type=float, default=None, metavar="C",
                   help="CPUs each worker reserves (default 1 with GPUs; on CPUs the cluster's CPUs / --workers, "
                        "which is also the ONNX Runtime thread count of each worker)")
    p.add_argument("--max-retries", type=int, default=3, metavar="R",
                   help="times Ray restarts a worker that died (OOM, node lost) and retries its job (default 3)")
    add_backend_args(p)
    p.add_argument("--batch-size", type=int, default=None, help="frames per model call (default as generate's)")
    p.add_argument("--summary", metavar="SUMMARY.json", default=None,
                   help="write a JSON summary: per job its status, error, frames, seconds, worker and node; totals "
                        "and frames/s for the whole batch")
    p.add_argument("--overwrite", action="store_true", help="render every job, even those already complete")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_batch)
    return p


class _Progress:
    """A tqdm bar over jobs whose postfix counts frames and frames/s; failures are printed as they come."""

    def __init__(self, total: int, quiet: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="job", desc="batch", disable=quiet, file=sys.stderr)
        self.frames = 0

    def __call__(self, kind: str, job, value) -> None:
        if kind != "result":
            return
        self.frames += value.frames if value.status == "done" else 0
        elapsed = self.bar.format_dict.get("elapsed") or 0
        self.bar.set_postfix(frames=self.frames, fps=f"{self.frames / elapsed:.1f}" if elapsed else "-")
        self.bar.update(1)
        if value.status == "failed":
            self.bar.write(f"line {job.line}: failed: {value.error}", file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def cmd_batch(args: argparse.Namespace) -> int:
    from ..video import check_writable
    from . import batch
    from .jobs import load_jobs

    if args.ray is None:
        given = [f"--{n.replace('_', '-')}" for n in ("workers", "gpus_per_worker", "cpus_per_worker")
                 if getattr(args, n) is not None]
        if given:
            raise UsageError(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --ray (without it the jobs "
                             "run here, one after another)")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.max_retries < 0:
        raise UsageError(f"--max-retries must be at least 0, got {args.max_retries}")
    if args.summary:
        check_writable(args.summary)
    jobs = load_jobs(args.jobs)
    if args.ray is not None:
        from . import require_ray
        require_ray("batch --ray")
    renderer = {"backend": args.backend, "device": args.device, "precision": args.precision,
                "engines": args.engines, "batch_size": args.batch_size}
    progress = _Progress(len(jobs), args.quiet)
    try:
        if args.ray is None:
            report = batch.run_local(jobs, overwrite=args.overwrite, on_event=progress, **renderer)
        else:
            report = batch.run_ray(jobs, address=args.ray, workers=args.workers,
                                   gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
                                   overwrite=args.overwrite, on_event=progress, max_restarts=args.max_retries,
                                   max_task_retries=args.max_retries, **renderer)
    finally:
        progress.close()
    if args.summary:
        batch.write_summary(report, args.summary)
    print(report.line())
    return report.exit_code


# ------------------------------------------------------------------------------------------------ serve --ray

def cmd_serve(args: argparse.Namespace) -> int:
    """`serve`: with --ray on Ray Serve (Ray's proxy takes the sockets, lipsync_trt.distributed.serve_app), else the
    plain server (`serve.cli.run_serve`). The top-level CLI registers it, so `serve` never imports `distributed`."""
    from ..serve.cli import config_from_args, run_serve

    if args.ray is not None and getattr(args, "webrtc", False):
        raise UsageError("--webrtc is served by the plain server only, not through --ray (Ray's proxy carries "
                         "HTTP and WebSockets, not WebRTC's UDP media)")
    if not check_serve_ray_args(args):
        return run_serve(args)
    with tempfile.TemporaryDirectory(prefix="lipsync_serve_") as tmp:
        return run_serve_on_ray(args, config_from_args(args, tmp))


def run_serve_on_ray(args: argparse.Namespace, cfg) -> int:
    """`serve --ray`: start (or join) Ray, run the Serve application at --host/--port until Ctrl-C."""
    import time

    from . import require_ray
    from .batch import connect

    ray = require_ray("serve --ray", serve=True)
    if cfg.port == 0:
        raise UsageError("serve --ray needs a fixed --port (Ray's HTTP proxy binds it on every node)")
    preflight(cfg)
    from ray import serve

    from .serve_app import app

    started = connect(ray, args.ray)
    try:
        gpus, cpus = serve_ray_plan(ray, args)
        if gpus == 0 and cpus >= 1 and "threads" not in cfg.options:
            cfg.options["threads"] = int(cpus)   # ONNX Runtime's pool within the replica's share of the CPUs
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        serve.run(app(cfg, args.replicas, gpus, cpus), name="lipsync", route_prefix="/")
        print(f"serving {', '.join(sorted(cfg.avatars))} on http://{cfg.host}:{cfg.port}/ (WebSocket ws://{cfg.host}:"
              f"{cfg.port}/) through Ray Serve, replicas {args.replicas} ({gpus:g} GPU, {cpus:g} CPU each)",
              file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    finally:
        try:
            serve.shutdown()
        finally:
            if started:
                ray.shutdown()
