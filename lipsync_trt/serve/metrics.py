"""/metrics: the server's state in Prometheus text format. prometheus_client (part of the [serve] extra) is imported
only when /metrics is asked for, and every value is read from the server when it is (a collector over its state, in
a registry of its own), so nothing is registered process-wide and several servers in one process do not collide.
docs/PROTOCOL.md lists the metrics, one line each.
"""
from __future__ import annotations

import bisect
import threading
from typing import Iterator

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)                                  # frames per generator call
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)      # seconds
TRANSPORTS = ("websocket", "webrtc")


class Histogram:
    """Observations counted under each upper bound (and +Inf), with their sum: what a Prometheus histogram exposes,
    kept without prometheus_client (only the scrape needs it). Thread-safe."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = tuple(float(b) for b in bounds)
        self._counts = [0] * (len(self.bounds) + 1)     # per bucket (not cumulative); the last is (max bound, +Inf)
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self._counts[bisect.bisect_left(self.bounds, value)] += 1    # a value equal to a bound falls under it
            self.sum += value

    def snapshot(self) -> tuple[list[tuple[str, int]], float]:
        """([(le, cumulative count)] ending with ('+Inf', count), sum)."""
        with self._lock:
            counts, total = list(self._counts), self.sum
        out, running = [], 0
        for le, n in zip([*(f"{b:g}" for b in self.bounds), "+Inf"], counts):
            running += n
            out.append((le, running))
        return out, total


def counts_histogram(sizes: dict[int, int], bounds: tuple[float, ...]) -> tuple[list[tuple[str, int]], float]:
    """The same snapshot from counts per value (the batcher's generator calls per batch size)."""
    out = [(f"{b:g}", sum(n for v, n in sizes.items() if v <= b)) for b in bounds]
    return out + [("+Inf", sum(sizes.values()))], float(sum(v * n for v, n in sizes.items()))


def transport_of(stream) -> str:
    from .session import WireStream

    return "websocket" if isinstance(stream, WireStream) else "webrtc"


def families(server: "Server") -> Iterator:
    """The metric families of `server`, as prometheus_client's collectors yield them."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    active = GaugeMetricFamily("lipsync_active_streams", "Streams open now, by transport", labels=["transport"])
    by = {t: 0 for t in TRANSPORTS}
    for s in list(server.active):
        by[transport_of(s)] = by.get(transport_of(s), 0) + 1
    for t, n in by.items():
        active.add_metric([t], n)
    yield active
    stats = server.stats
    for name, key, text in (
            ("made", "frames", "Frames the generator made"),
            ("reused", "reused", "Frames answered with the stream's previous mouth (policy skip)"),
            ("rejected", "overloaded", "Frames answered OVERLOADED instead of made (policy reject)"),
            ("late", "late", "Frames refused because they waited past --max-delay-ms (also counted reused or "
                             "rejected)")):
        yield CounterMetricFamily(f"lipsync_frames_{name}", text, value=stats.get(key, 0))
    buckets, total = counts_histogram(dict(server.packer.batcher.batch_sizes), BATCH_BUCKETS)
    yield HistogramMetricFamily("lipsync_generator_batch_size", "Frames per generator call", buckets=buckets,
                                sum_value=total)
    yield GaugeMetricFamily("lipsync_queue_depth", "Frames waiting for the generator now",
                            value=server.packer.queued())
    buckets, total = server.packer.latency_histogram.snapshot()
    yield HistogramMetricFamily("lipsync_frame_latency_seconds", "Seconds from the chunk that made a frame ready to "
                                "its answer packed (seed protocol)", buckets=buckets, sum_value=total)


def render(server: "Server") -> tuple[bytes, str]:
    """(the exposition body, its Content-Type: the text format 0.0.4, which every Prometheus reads; the names here
    need nothing newer)."""
    from prometheus_client import CollectorRegistry, exposition, generate_latest

    class Collector:
        def collect(self):
            return families(server)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())
    return generate_latest(registry), getattr(exposition, "CONTENT_TYPE_PLAIN_0_0_4",
                                              "text/plain; version=0.0.4; charset=utf-8")
