"""The loader layer: what a backend runs, for a checkpoint pair, found in the manifest cache or built there.

`backends.load` asks `locate(backend, ...)` for the files (or modules) and hands them to the runner module,
which only loads and runs them. Building is `lipsync_trt.build`; nothing here imports `lipsync_trt.backends`.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .build import DEFAULT_OUT, PRECISIONS, build, find_build, gpu_name
from .errors import BackendError, CheckpointError
from .runtimes import tensorrt as trt

PathLike = str | os.PathLike


@dataclass(frozen=True)
class Located:
    """What a runner is handed: its two networks (files, or the checkpoints for torch) and options from the build."""

    generator: Path
    audio_encoder: Path
    options: dict = field(default_factory=dict)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def default_cache_dir() -> Path:
    """Where ONNX is exported when no engines folder is given: $LIPSYNC_TRT_CACHE or ~/.cache/lipsync_trt."""
    env = os.environ.get("LIPSYNC_TRT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "lipsync_trt"


def _require_checkpoints(*paths: PathLike) -> None:
    for path in paths:
        if not Path(path).is_file():
            raise CheckpointError(f"{path}: checkpoint file not found")


def ensure_onnx(generator: PathLike, audio_encoder: PathLike, out: PathLike | None = None,
                precision: str = "fp32", log: Callable[[str], None] | None = _stderr) -> tuple[Path, Path]:
    """(generator ONNX, audio encoder ONNX) for a checkpoint pair: an existing verified build under `out`
    (default default_cache_dir()) when there is one, else a fresh `build(target='onnx')` there."""
    if precision not in PRECISIONS:
        raise BackendError(f"onnxruntime backend: unknown precision {precision!r}; "
                           f"expected one of {', '.join(PRECISIONS)}")
    _require_checkpoints(generator, audio_encoder)
    out = Path(out) if out is not None else default_cache_dir()
    artifact = "onnx_fp16" if precision == "fp16" else "onnx"
    m = find_build(out, generator, audio_encoder, artifact, precision if precision == "fp16" else None)
    if m is None:
        m = build(generator, audio_encoder, target="onnx", precision=precision, out=out, log=log,
                  progress=log is not None)
    folder = Path(m["dir"])
    return folder / m["artifacts"][artifact]["generator"], folder / m["artifacts"]["onnx"]["audio_encoder"]


def find_tensorrt(engines: PathLike | None, generator: PathLike, audio_encoder: PathLike, precision: str,
                  runtime: tuple[str, str | None] | None = None) -> dict | None:
    """The manifest of a TensorRT build in `engines` for exactly these checkpoints and precision, made by
    `runtime` = (TensorRT version, GPU name), by default this machine's (engines are portable across neither)."""
    if engines is None or not all(Path(p).is_file() for p in (generator, audio_encoder)):
        return None
    if runtime is None:
        if trt.reason():
            return None
        runtime = (trt.__version__, gpu_name())
    version, gpu = runtime
    return find_build(engines, generator, audio_encoder, "tensorrt", precision,
                      match=lambda m: m["key"]["versions"].get("tensorrt") == version and m["key"].get("gpu") == gpu)


def _torch(generator: PathLike, audio_encoder: PathLike, precision: str, **_: object) -> Located:
    return Located(Path(generator), Path(audio_encoder))


def _onnx(generator: PathLike, audio_encoder: PathLike, precision: str, engines: PathLike | None = None,
          **_: object) -> Located:
    if precision == "bf16":
        raise BackendError("onnxruntime backend: bf16 is not supported; use fp32 or fp16 (or --backend torch for bf16)")
    _require_checkpoints(generator, audio_encoder)
    out = engines
    if engines is not None and find_build(engines, generator, audio_encoder,
                                          "onnx_fp16" if precision == "fp16" else "onnx") is None:
        out = None   # nothing usable in --engines: use (and fill) the cache rather than writing into it
    return Located(*ensure_onnx(generator, audio_encoder, out, precision))


def _tensorrt(generator: PathLike, audio_encoder: PathLike, precision: str, engines: PathLike | None = None,
              batch: str | tuple | None = None, **_: object) -> Located:
    _require_checkpoints(generator, audio_encoder)
    out = engines or DEFAULT_OUT
    m = find_tensorrt(out, generator, audio_encoder, precision)
    if m is None:
        m = build(generator, audio_encoder, target="tensorrt", precision=precision, batch=batch, out=out, log=_stderr)
    folder, files = Path(m["dir"]), m["artifacts"]["tensorrt"]
    return Located(folder / files["generator"], folder / files["audio_encoder"],
                   {"info": {"engines": str(folder), "tensorrt": trt.__version__}})


def _coreml(generator: PathLike, audio_encoder: PathLike, precision: str, engines: PathLike | None = None,
            batch: str | tuple | None = None, **_: object) -> Located:
    _require_checkpoints(generator, audio_encoder)
    out = engines or DEFAULT_OUT
    m = find_build(out, generator, audio_encoder, "coreml", precision)
    if m is None:
        m = build(generator, audio_encoder, target="coreml", precision=precision, batch=batch, out=out, log=_stderr)
    folder, files, b = Path(m["dir"]), m["artifacts"]["coreml"], m["key"]["batch"]
    return Located(folder / files["generator"], folder / files["audio_encoder"],
                   {"batch": (b["min"], b["opt"], b["max"])})


LOCATORS: dict[str, Callable[..., Located]] = {"torch": _torch, "onnxruntime": _onnx, "tensorrt": _tensorrt,
                                               "coreml": _coreml}


def locate(backend: str, generator: PathLike, audio_encoder: PathLike, precision: str = "fp32",
           **options: object) -> Located:
    """Find (or build, then find) what `backend` runs for this checkpoint pair; options: engines, batch."""
    if backend not in LOCATORS:
        raise BackendError(f"unknown backend {backend!r}; expected one of {', '.join(LOCATORS)}")
    return LOCATORS[backend](generator, audio_encoder, precision, **options)


__all__ = ["LOCATORS", "Located", "default_cache_dir", "ensure_onnx", "find_tensorrt", "locate"]
