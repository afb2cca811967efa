"""The server's models and its side of batching: `ModelEntry` (an avatar served, its generator's runner and its
template cache) and `Packer`: the library's `batcher.Batcher` (one model worker for every stream: encoder and
generator in batches, queue bound, deadline, reject/skip) plus a small thread pool that packs the mouths it makes
into JPEG + ZIP answers, off the event loop. It schedules nothing itself: the batcher decides what runs when.
"""
from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from ..avatar import Avatar
from ..backends.base import Runner
from ..batcher import POLICIES, Batcher
from ..compose import TemplateCrops
from .metrics import LATENCY_BUCKETS, Histogram
from .protocol import Status, encode_response, error_response, frame_zip
from .session import FRAME, WireStream

__all__ = ["POLICIES", "ModelEntry", "Packer", "encode_jpeg"]


@dataclass
class ModelEntry:
    """An avatar the server was started with, the runner of its generator (runners may be shared) and its
    prepared-template cache on the runner's device."""

    name: str
    avatar: Avatar
    runner: Runner
    cache_size: int | None = None                  # templates kept (None: all of them)
    _templates: TemplateCrops | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def templates(self) -> TemplateCrops:
        with self._lock:
            if self._templates is None:
                self._templates = TemplateCrops(self.avatar, self.runner.device, self.cache_size)
            return self._templates


def encode_jpeg(img: np.ndarray, quality: int) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


class Packer:
    """The server's Batcher (`batcher`, shared by its streams) and the JPEG/ZIP pool their mouths go through, with the
    ready-to-answer latency of each packed frame (`latency`: the recent ones; `latency_histogram`: all, /metrics)."""

    def __init__(self, encoder: Runner, max_batch: int = 8, max_wait: float = 0.010, max_queue: int = 50,
                 policy: str = "reject", jpeg_quality: int = 95, encode_threads: int = 2,
                 max_delay: float | None = None):
        self.batcher = Batcher(encoder, max_batch=max_batch, max_wait=max_wait, max_queue=max_queue, policy=policy,
                               max_delay=max_delay)
        self.jpeg_quality = jpeg_quality
        self._pool = ThreadPoolExecutor(max_workers=max(1, encode_threads), thread_name_prefix="lipsync-jpeg")
        self.stats = self.batcher.stats
        self.latency = collections.deque(maxlen=10000)     # seconds from frame ready to ZIP done
        self.latency_histogram = Histogram(LATENCY_BUCKETS)

    def start(self) -> "Packer":
        self.batcher.start()
        return self

    def stop(self) -> None:
        self.batcher.stop()
        self._pool.shutdown(wait=True)

    def queued(self) -> int:
        return self.batcher.queued()

    def pack(self, stream: WireStream, i: int, img: torch.Tensor, box: tuple, t_ready: float) -> None:
        """A mouth made by the batcher -> its JPEG + ZIP answer, in the pool."""
        self._pool.submit(self._pack, stream, i, img, box, t_ready)

    def _pack(self, stream: WireStream, i: int, img: torch.Tensor, box: tuple, t_ready: float) -> None:
        try:
            jpeg = encode_jpeg(img.cpu().numpy(), self.jpeg_quality)
            msg = encode_response(Status.OK, i, frame_zip(jpeg, box))
        except Exception as exc:
            jpeg, msg = None, error_response(Status.INTERNAL, i, f"encoding failed: {exc}"[:200])
        dt = time.perf_counter() - t_ready
        self.latency.append(dt)
        self.latency_histogram.observe(dt)
        stream.post(i, (FRAME, msg, jpeg, box))
