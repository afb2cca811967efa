"""The server's HTTP answers as plain data, for any transport: the aiohttp app (`server.Server.app`) and the Ray
Serve replica (`distributed.serve_app`) each turn them into their own responses. A name or frame that does not
exist raises `NotFound` (a 404 with its one-line text).
"""
from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .. import recipe as R
from .protocol import CHUNK_SAMPLES, STREAM_RATE
from .session import ready_chunk, ready_chunk_period

if TYPE_CHECKING:
    from .scheduler import ModelEntry

STATIC = Path(__file__).resolve().parent / "static"   # index.html and its assets


class NotFound(LookupError):
    """HTTP 404; str() is the body."""


@functools.lru_cache(maxsize=1)
def ready_rule() -> dict:
    """meta.json's readiness rule: frame i is made once chunk i + offsets[i % period] has arrived (one period)."""
    period = ready_chunk_period()
    return {"ready_chunk_offsets": [ready_chunk(i) - i for i in range(period or 64)],
            "ready_chunk_period": period,
            "ready_chunk_note": "video frame i is made once chunk i + ready_chunk_offsets[i % ready_chunk_period] "
                                "has arrived" if period else "the first 64 frames only; after them 12 at most"}


def entry(server: "Server", name: str) -> "ModelEntry":
    e = server.entries.get(name)
    if e is None:
        raise NotFound("unknown avatar")
    return e


def avatars(server: "Server") -> dict:
    """/avatars.json: the model names, and the chunk size and rate clients send."""
    return {"avatars": sorted(server.entries), "chunk_samples": CHUNK_SAMPLES, "rate": STREAM_RATE}


def meta(server: "Server", name: str) -> dict:
    """/avatar/NAME/meta.json: sizes, boxes, the template order of one ping-pong period and the readiness rule."""
    e = entry(server, name)
    a = e.avatar
    period = R.template_period(a.count)
    return {"name": e.name, "width": a.width, "height": a.height, "count": a.count, "fps": R.FPS,
            "boxes": a.boxes.tolist(), "order": [int(v) for v in a.order(period)],
            "order_note": "video frame i uses template order[i % len(order)]", **ready_rule()}


def frame_path(server: "Server", name: str, n: str | int) -> Path:
    """/avatar/NAME/frame/N.jpg: the template JPEG's path (N: decimal digits, within the avatar's count)."""
    e = entry(server, name)
    if not str(n).isdigit() or len(str(n)) > 7 or not 0 <= int(n) < e.avatar.count:
        raise NotFound("no such frame")
    return e.avatar.frame_path(int(n))


def stats(server: "Server") -> dict:
    """/stats: open streams, frames waiting, the counters and the ready-to-ZIP percentiles of recent frames."""
    lat = np.asarray(server.packer.latency, np.float64) * 1000
    pct = {f"p{q}": round(float(np.percentile(lat, q)), 2) for q in (50, 90, 99)} if lat.size else {}
    return {"active_streams": len(server.active), "queued_frames": server.packer.queued(),
            "counters": dict(server.stats), "ready_to_zip_ms": pct, "uptime_s": round(time.time() - server.started, 1)}


def metrics(server: "Server") -> tuple[bytes, str]:
    """/metrics: (Prometheus text exposition, its Content-Type); see serve/metrics.py."""
    from .metrics import render

    return render(server)
