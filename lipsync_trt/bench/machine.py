"""Machine info recorded with every benchmark result: CPU, cores, memory, GPUs, library versions, git revision."""
from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path

import torch


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _physical_cores() -> int:
    from ..backends.onnxruntime import physical_cores   # (imports no onnxruntime)

    return physical_cores()


def _version(dist: str) -> str | None:
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the platform has none)."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def machine() -> dict:
    """CPU model, cores, memory, GPUs, library versions, threads, git revision, load average: what a recorded
    figure needs beside it to be read later."""
    mem = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/meminfo") as f:
            mem = round(int(f.readline().split()[1]) / 2**20, 1)
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": p.name, "memory_gb": round(p.total_memory / 2**30, 1),
                         "capability": f"{p.major}.{p.minor}", "sm_count": p.multi_processor_count})
    libs = {}
    for dist in ("torch", "numpy", "opencv-python-headless", "opencv-python", "onnxruntime", "onnxruntime-gpu",
                 "onnx", "av", "tensorrt", "coremltools", "triton", "librosa", "soxr", "matplotlib", "lipsync_trt"):
        v = _version(dist)
        if v:
            libs[dist] = v
    with contextlib.suppress(Exception):
        import cv2
        libs["cv2 (runtime)"] = cv2.__version__
    rev = None
    with contextlib.suppress(Exception):
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent).stdout.strip() or None
    return {
        "hostname": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
        "cpu_model": _cpu_model(), "arch": platform.machine(), "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "physical_cores": _physical_cores(), "memory_gb": mem, "gpus": gpus,
        "cuda": torch.version.cuda, "torch_threads": torch.get_num_threads(), "libraries": libs,
        "git_revision": rev, "loadavg_start": loadavg(),
    }
