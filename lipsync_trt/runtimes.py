"""The optional runtimes, each declared once as a lazy module (after Polygraphy's `mod.lazy_import`).

Nothing is imported until an attribute is used or `reason()` is asked; a runtime that is missing or
broken says why (`reason()`), and using it then raises BackendError with that reason.
"""
from __future__ import annotations

import importlib
import logging
import platform
import sys
import threading
from typing import Callable

from .errors import BackendError


class LazyModule:
    """A module imported on first use; `reason()` is None when it imports (and passes `check`), else why not."""

    def __init__(self, name: str, missing: str, check: Callable[[object], str | None] | None = None,
                 label: str | None = None, quiet_loggers: tuple[str, ...] = ()):
        self._name, self._missing, self._check, self._quiet = name, missing, check, quiet_loggers
        self._label = label or name
        self._module = None
        self._reason: str | None = None
        self._tried = False
        self._lock = threading.Lock()

    def _load(self) -> None:
        with self._lock:
            if self._tried:
                return
            saved = {n: logging.getLogger(n).level for n in self._quiet}
            if self._name not in sys.modules:
                for n in self._quiet:
                    logging.getLogger(n).setLevel(logging.ERROR)
            try:
                module = importlib.import_module(self._name)
                self._reason = self._check(module) if self._check else None
                self._module = None if self._reason else module
            except ImportError:
                self._reason = self._missing
            except Exception as exc:   # a stub that fails at import, a broken native library (OSError), ...
                first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
                self._reason = f"{self._label} is not usable: {first}"
            finally:
                for n, level in saved.items():
                    logging.getLogger(n).setLevel(level)
                self._tried = True

    def reason(self) -> str | None:
        """None when the module imports and is usable, else the reason."""
        self._load()
        return self._reason

    def __getattr__(self, attr: str):
        if attr.startswith("_") and attr != "__version__":   # copy/pickle probes, or before __init__ ran
            raise AttributeError(attr)
        self._load()
        if self._module is None:
            raise BackendError(self._reason)
        return getattr(self._module, attr)

    def __repr__(self) -> str:
        return f"LazyModule({self._name!r})"


def lazy_import(name: str, missing: str, check: Callable[[object], str | None] | None = None,
                label: str | None = None, quiet_loggers: tuple[str, ...] = ()) -> LazyModule:
    """Declare an optional dependency: `missing` is the reason given when it is not installed."""
    return LazyModule(name, missing, check, label, quiet_loggers)


def _trt_version(trt) -> str | None:
    if int(trt.__version__.split(".")[0]) < 10:
        return f"TensorRT {trt.__version__} is too old; this backend uses the TensorRT 10/11 API"
    return None


ORT_MISSING = "onnxruntime is not installed (pip install 'lipsync_trt[onnx]')"
TRT_MISSING = ("TensorRT is not installed (its libraries are not on PyPI; install TensorRT 10 or 11 from "
               "NVIDIA, e.g. the pip wheels from pypi.nvidia.com or a TensorRT container)")
COREML_MISSING = "coremltools is not installed (pip install 'lipsync_trt[coreml]')"

onnx = lazy_import("onnx", "onnx is not installed (pip install 'lipsync_trt[onnx]')")
onnxruntime = lazy_import("onnxruntime", ORT_MISSING)
tensorrt = lazy_import("tensorrt", TRT_MISSING, check=_trt_version, label="TensorRT")
# on Linux the coremltools import warns that the Core ML runtime proxies are absent (by design: conversion only)
coremltools = lazy_import("coremltools", COREML_MISSING,
                          quiet_loggers=("coremltools",) if platform.system() != "Darwin" else ())



def tensorrt_reason() -> str | None:
    """None when TensorRT 10+ imports and torch sees a CUDA GPU (what building and running engines need), else why."""
    reason = tensorrt.reason()
    if reason:
        return reason
    import torch

    if not torch.cuda.is_available():
        return "TensorRT needs a CUDA GPU and torch sees none"
    return None
