"""Measuring: wall/CUDA-event timers, peak memory of a block, the worker thread samples run in, summaries."""
from __future__ import annotations

import contextlib
import math
import statistics
import sys
import threading
import time

import torch


def log(msg: str) -> None:
    """A progress or note line on stderr (stdout carries the table)."""
    print(msg, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Wall time of a block; on CUDA bracketed by synchronize, and `gpu_s` from CUDA events on the current stream."""

    def __init__(self, device: torch.device, events: bool = False):
        self.device, self.events = device, events and device.type == "cuda"
        self.seconds = self.gpu_s = None

    def __enter__(self):
        sync(self.device)
        if self.events:
            self._e0 = torch.cuda.Event(enable_timing=True)
            self._e1 = torch.cuda.Event(enable_timing=True)
            self._e0.record()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.events:
            self._e1.record()
            self._e1.synchronize()
        sync(self.device)
        self.seconds = time.perf_counter() - self._t0
        if self.events:
            self.gpu_s = self._e0.elapsed_time(self._e1) / 1000.0
        return False

    @property
    def best(self) -> float:
        return self.gpu_s if self.gpu_s is not None else self.seconds


class Memory:
    """Peak host RSS of a block (Linux: reset with /proc/self/clear_refs '5', read VmHWM) and, on CUDA,
    peak torch-allocated device memory. Elsewhere getrusage's ru_maxrss (process lifetime, not resettable)."""

    def __init__(self):
        self.method = "VmHWM after clear_refs"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._status("VmHWM")
        except OSError:
            self.method = "ru_maxrss (process lifetime)"

    @staticmethod
    def _status(key: str) -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
        raise OSError(key)

    def rss_mb(self) -> float:
        try:
            return self._status("VmRSS")
        except OSError:
            import resource
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    @contextlib.contextmanager
    def track(self, device: torch.device, out: dict):
        start = self.rss_mb()
        if self.method.startswith("VmHWM"):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            yield
        finally:
            if self.method.startswith("VmHWM"):
                peak = self._status("VmHWM")
            else:
                import resource
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
            out["peak_rss_mb"] = peak
            out["rss_growth_mb"] = max(0.0, peak - start)
            if device.type == "cuda":
                out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20


def in_worker(fn):
    """Run fn() in a fresh thread and return its result (or raise its exception).

    The pipeline calls the generator from a worker thread, and on a small CPU under contention PyTorch's OpenMP
    team in the main thread runs it much slower than a worker thread does; generator-only figures are therefore
    taken in a worker thread too, so that end-to-end vs generator-only compares like with like.
    """
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:   # re-raised in the caller
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def summarize(values: list[float]) -> dict:
    """n, median, min, max, mean and relative spread of the finite values ({"n": 0} when there are none)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"n": 0}
    med = statistics.median(vals)
    return {"n": len(vals), "median": med, "min": min(vals), "max": max(vals), "mean": statistics.fmean(vals),
            "rel_spread": (max(vals) - min(vals)) / med if med else None}
