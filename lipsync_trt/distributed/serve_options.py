"""`serve --ray`'s options: registered on `serve` by the top-level CLI, checked before Ray starts, and turned into
each replica's share of the cluster. Imported by the CLI (`distributed.cli`) and by the Serve application
(`distributed.serve_app`) alike, so neither imports the other."""
from __future__ import annotations

import argparse

from ..errors import UsageError


def add_serve_ray_args(p: argparse.ArgumentParser) -> None:
    """`serve`'s Ray Serve options (the rest of `serve`'s options apply to every replica)."""
    p.add_argument("--ray", metavar="local|auto|ADDRESS", default=None,
                   help="serve on Ray Serve instead of one process: Ray's HTTP proxy takes the WebSockets at "
                        "--host/--port (same protocol, URL and browser client) and replicas serve them, one "
                        "connection for its whole life on one replica. 'local' starts Ray here, 'auto' or an "
                        "address joins a cluster (docs/SCALING.md). Needs pip install -e '.[ray]'")
    p.add_argument("--replicas", default="1", metavar="N|MIN-MAX",
                   help="with --ray: N replicas, or MIN-MAX to autoscale on open connections (default 1); each "
                        "holds the models, the avatars and its batcher, and its own --max-streams")
    p.add_argument("--gpus-per-replica", type=float, default=None, metavar="G",
                   help="with --ray: GPUs per replica (default 1 when the cluster has GPUs, else 0)")
    p.add_argument("--cpus-per-replica", type=float, default=None, metavar="C",
                   help="with --ray: CPUs per replica (default 1 with GPUs, else the cluster's CPUs / replicas; "
                        "also the ONNX Runtime thread count)")


def check_serve_ray_args(args: argparse.Namespace) -> bool:
    """True for `serve --ray`; the Ray-only options without --ray are a UsageError."""
    if args.ray is None:
        given = [flag for flag, v in (("--replicas", args.replicas != "1"), ("--gpus-per-replica", args.gpus_per_replica),
                                      ("--cpus-per-replica", args.cpus_per_replica)) if v not in (None, False)]
        if given:
            raise UsageError(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --ray (the plain server is "
                             "one process)")
        return False
    _replicas(args.replicas)
    return True


def _replicas(spec: str) -> tuple[int, int]:
    lo, sep, hi = spec.partition("-")
    try:
        lo_n, hi_n = int(lo), int(hi) if sep else int(lo)
    except ValueError:
        raise UsageError(f"--replicas {spec!r}: expected N or MIN-MAX, e.g. 2 or 1-4") from None
    if lo_n < (0 if sep else 1) or hi_n < max(lo_n, 1):
        raise UsageError(f"--replicas {spec!r}: expected N >= 1 or 0 <= MIN <= MAX, MAX >= 1")
    return lo_n, hi_n


def serve_ray_plan(ray, args: argparse.Namespace) -> tuple[float, float]:
    """(GPUs, CPUs) per replica from the flags and what the connected cluster holds; checked to fit."""
    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 0)), float(total.get("GPU", 0))
    lo, hi = _replicas(args.replicas)
    g = args.gpus_per_replica if args.gpus_per_replica is not None else (1.0 if gpus >= 1 else 0.0)
    if args.cpus_per_replica is not None:
        c = args.cpus_per_replica
    else:   # whole CPUs each when they go round, else an equal share
        c = 1.0 if g > 0 else (float(cpus // hi) if cpus >= hi else cpus / hi)
    if max(lo, 1) * g > gpus + 1e-9 or max(lo, 1) * c > cpus + 1e-9:
        raise UsageError(f"{max(lo, 1)} replica(s) x ({g:g} GPU, {c:g} CPU) do not fit the Ray cluster ({gpus:g} GPUs, "
                         f"{cpus:g} CPUs); lower --replicas, --gpus-per-replica or --cpus-per-replica")
    return g, c


def preflight(cfg) -> None:
    """Check the options, avatars and checkpoints here, before Ray starts: a bad one is then one line and exit 2,
    not a failed deployment (replicas load the same files again on their nodes)."""
    from .. import avatar as avatar_mod
    from ..models import load_audio_encoder, load_generator

    cfg.check()
    for folder in cfg.avatars.values():
        avatar_mod.load(folder)
    for path in set(cfg.generators.values()):
        load_generator(path)
    load_audio_encoder(cfg.audio_encoder)
