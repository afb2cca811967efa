"""Runtime registry: which backends exist, which are usable here (and why not), 'auto' selection, and `load`.

Each runner module has `probe() -> str | None` (None when usable, else the reason) and
`load(generator, audio_encoder, device, precision, **options) -> Runner`, where generator/audio_encoder
are what it runs (torch modules or checkpoints, .onnx files, engines, .mlpackages). `load` here takes a
checkpoint pair and asks the loader layer (`lipsync_trt.artifacts`) for those; runner modules never
find or build anything. Optional runtimes are declared lazily in `lipsync_trt.runtimes`.
"""
from __future__ import annotations

import importlib
import os
import platform
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from ..errors import BackendError
from .base import Runner

NAMES = ("torch", "onnxruntime", "tensorrt", "coreml")
MODULES = {"torch": "pytorch", "onnxruntime": "onnxruntime", "tensorrt": "tensorrt", "coreml": "coreml"}
# each backend's runner module (PyTorch's is backends/pytorch.py: a submodule named torch would shadow the library)


@dataclass(frozen=True)
class Availability:
    name: str
    usable: bool
    reason: str   # empty when usable


class Preference(NamedTuple):
    """One row of the 'auto' table: `backend` is chosen when it is usable here, `device` holds for the device,
    and `artifact` (when set) already exists for these checkpoints in the engines folder."""

    backend: str
    device: str
    artifact: str | None = None


# 'auto' takes the first row that holds (DESIGN.md "Backends"). On a CPU, onnxruntime runs the generator
# several times faster than eager torch (docs/BENCHMARKS.md).
AUTO: tuple[Preference, ...] = (
    Preference("tensorrt", "cuda", artifact="tensorrt"),
    Preference("torch", "cuda"),
    Preference("coreml", "macOS, not cuda"),
    Preference("onnxruntime", "not cuda"),
    Preference("torch", "any"),
)

DEVICE_CONDITIONS: dict[str, Callable[[torch.device], bool]] = {
    "cuda": lambda dev: dev.type == "cuda",
    "not cuda": lambda dev: dev.type != "cuda",
    "macOS, not cuda": lambda dev: dev.type != "cuda" and platform.system() == "Darwin",
    "any": lambda dev: True,
}


def _module(name: str):
    if name not in NAMES:
        raise BackendError(f"unknown backend {name!r}; expected one of: auto, {', '.join(NAMES)}")
    return importlib.import_module(f".{MODULES[name]}", __name__)


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


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> cuda when torch sees a GPU, else cpu; an explicit 'cuda' without one is an error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise BackendError(f"unknown device {device!r}; expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendError("device 'cuda' requested but torch sees no CUDA GPU (torch.cuda.is_available() is False)")
    return dev


def first_row(rows: tuple[Preference, ...], usable: set[str], dev: torch.device,
              has_artifact: Callable[[str], bool]) -> Preference:
    """The first row whose backend is in `usable`, whose device condition holds for `dev`, and whose artifact
    (if any) `has_artifact(kind)` says exists."""
    for row in rows:
        if row.backend not in usable or not DEVICE_CONDITIONS[row.device](dev):
            continue
        if not row.artifact or has_artifact(row.artifact):
            return row
    raise BackendError(f"no backend in the auto table holds for device {dev}")


def select(name: str = "auto", device: str | torch.device = "auto", engines: str | os.PathLike | None = None,
           generator: str | os.PathLike | None = None, audio_encoder: str | os.PathLike | None = None,
           precision: str = "fp32") -> tuple[str, torch.device]:
    """Pick a backend: an explicit name is checked for usability; 'auto' takes the first row of AUTO that holds.

    The TensorRT row needs a build for exactly these checkpoints (and precision, TensorRT version, GPU) in
    `engines`; without the checkpoints or the folder it never holds."""
    dev = resolve_device(device)
    avail = available()
    if name != "auto":
        _module(name)
        if not avail[name].usable:
            raise BackendError(f"backend {name!r} is not usable here: {avail[name].reason}")
        return name, dev

    def has_artifact(kind: str) -> bool:
        if kind != "tensorrt":
            raise BackendError(f"auto table: no lookup for artifact kind {kind!r}")
        if engines is None or generator is None or audio_encoder is None:
            return False
        from .. import artifacts   # the loader layer; asked only when a row needs an artifact

        return artifacts.find_tensorrt(engines, generator, audio_encoder, precision) is not None

    row = first_row(AUTO, {n for n, a in avail.items() if a.usable}, dev, has_artifact)
    return row.backend, (torch.device("cpu") if row.backend == "coreml" else dev)   # Core ML picks its own units


def load(name: str, generator: str | os.PathLike, audio_encoder: str | os.PathLike,
         device: str | torch.device = "auto", precision: str = "fp32", **options) -> Runner:
    """Resolve 'auto', have `lipsync_trt.artifacts` find or build what the backend runs, and load its runner.

    Options: `engines` (folder of builds), `batch` (profile of a build made here), and the runner's own
    (`threads`, `spinning`, `compile`, `cuda_graphs`, `compute_units`)."""
    name, dev = select(name, device, options.get("engines"), generator, audio_encoder, precision)
    module = _module(name)
    check = getattr(module, "check", None)
    if check is not None:
        check(dev, precision)   # a request the runner cannot serve fails before anything is exported or built
    from .. import artifacts

    found = artifacts.locate(name, generator, audio_encoder, precision, **options)
    runner_options = {k: v for k, v in options.items() if k not in ("engines", "batch")}
    return module.load(found.generator, found.audio_encoder, dev, precision=precision,
                       **{**runner_options, **found.options})


__all__ = ["AUTO", "Availability", "MODULES", "NAMES", "Preference", "Runner", "available", "first_row", "load", "resolve_device",
           "select"]
