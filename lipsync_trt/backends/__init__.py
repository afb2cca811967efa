"""Runtime registry: which backends exist, which are usable here (and why not), and 'auto' selection.

Each backend module has `probe() -> str | None` (None when usable, else the reason) and
`load(generator, audio_encoder, device, precision, **options) -> Runner`. Optional runtimes are
imported only inside their module's functions.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import torch as _torch   # aliased: the submodule backends.torch would shadow the name

from ..errors import BackendError
from .base import Runner

NAMES = ("torch", "onnxruntime", "tensorrt", "coreml")


@dataclass(frozen=True)
class Availability:
    name: str
    usable: bool
    reason: str   # empty when usable


def _module(name: str):
    if name not in NAMES:
        raise BackendError(f"unknown backend {name!r}; expected one of: auto, {', '.join(NAMES)}")
    return importlib.import_module(f".{name}", __name__)


def available() -> dict[str, Availability]:
    """Every known backend with whether it can run here and, when not, why."""
    out = {}
    for name in NAMES:
        try:
            reason = _module(name).probe()
        except ImportError as exc:   # a backend module not shipped yet, or broken
            reason = f"backend module not importable: {exc}"
        out[name] = Availability(name, reason is None, reason or "")
    return out


def resolve_device(device: str | _torch.device = "auto") -> _torch.device:
    """'auto' -> cuda when torch sees a GPU, else cpu; an explicit 'cuda' without one is an error."""
    if isinstance(device, _torch.device):
        return device
    if device == "auto":
        return _torch.device("cuda" if _torch.cuda.is_available() else "cpu")
    try:
        dev = _torch.device(device)
    except RuntimeError:
        raise BackendError(f"unknown device {device!r}; expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not _torch.cuda.is_available():
        raise BackendError("device 'cuda' requested but torch sees no CUDA GPU (torch.cuda.is_available() is False)")
    return dev


def select(name: str = "auto", device: str | _torch.device = "auto", engines: str | os.PathLike | None = None
           ) -> tuple[str, _torch.device]:
    """Pick a backend: an explicit name is checked for usability; 'auto' follows DESIGN.md's order."""
    dev = resolve_device(device)
    avail = available()
    if name != "auto":
        _module(name)
        if not avail[name].usable:
            raise BackendError(f"backend {name!r} is not usable here: {avail[name].reason}")
        return name, dev
    if dev.type == "cuda":
        if avail["tensorrt"].usable and engines is not None and any(os.scandir(engines) if os.path.isdir(engines) else []):
            return "tensorrt", dev
        return "torch", dev
    import platform
    if platform.system() == "Darwin" and avail["coreml"].usable:
        return "coreml", _torch.device("cpu")
    if avail["onnxruntime"].usable:   # measured ~4x eager torch on a 2-core x86 CPU (docs/BENCHMARKS.md)
        return "onnxruntime", dev
    return "torch", dev


def load(name: str, generator: str | os.PathLike, audio_encoder: str | os.PathLike,
         device: str | _torch.device = "auto", precision: str = "fp32", **options) -> Runner:
    """Resolve 'auto' and load the chosen backend's runner."""
    name, dev = select(name, device, options.get("engines"))
    return _module(name).load(generator, audio_encoder, dev, precision=precision, **options)


__all__ = ["Availability", "NAMES", "Runner", "available", "load", "resolve_device", "select"]
