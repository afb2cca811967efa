"""The manifest cache: a build's key (everything an artifact depends on), its folder, and lookups by checkpoint pair."""
from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Callable

import torch

from ..models.checkpoints import sha256
from ..runtimes import onnx
from .export import EXPORTER, OPSET

FORMAT = 1
MANIFEST = "manifest.json"


def _package_version() -> str:
    from ..version import __version__

    return __version__


def optional_version(module: str) -> str | None:
    """The installed version, read from package metadata when possible (importing coremltools is slow and noisy)."""
    from importlib import metadata

    if module == "coremltools":
        try:
            return metadata.version(module)
        except metadata.PackageNotFoundError:
            return None
    try:
        return __import__(module).__version__
    except Exception:   # not installed, or a broken install: recorded as absent
        return None


def versions(target: str) -> dict:
    """Versions of everything the artifacts of `target` depend on."""
    v = {"lipsync_trt": _package_version(), "python": platform.python_version(), "torch": torch.__version__,
         "onnx": onnx.__version__, "onnxruntime": optional_version("onnxruntime")}
    if target in ("tensorrt", "all"):
        v["tensorrt"] = optional_version("tensorrt")
    if target in ("coreml", "all"):
        v["coremltools"] = optional_version("coremltools")
    return v


def gpu_name() -> str | None:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def key_hash(key: dict) -> str:
    """sha256 of a build key; its first 12 hex digits name the build's folder."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def build_key(gen_sha: str, enc_sha: str, target: str, precision: str, batch: tuple[int, int, int]) -> dict:
    """Everything an artifact depends on (the manifest minus creation time and results)."""
    return {"format": FORMAT, "generator_sha256": gen_sha, "audio_encoder_sha256": enc_sha, "target": target,
            "precision": precision, "batch": {"min": batch[0], "opt": batch[1], "max": batch[2]}, "opset": OPSET,
            "exporter": EXPORTER, "versions": versions(target), "gpu": gpu_name()}


def read_manifest(folder: Path) -> dict | None:
    """The manifest of a complete build folder (with 'dir' added), or None when absent, unreadable or incomplete."""
    try:
        m = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict):
        return None
    m["dir"] = str(folder)
    files = [f for group in m.get("artifacts", {}).values() for f in group.values()]
    return m if all((folder / f).exists() for f in files) else None


def write_manifest(folder: Path, manifest: dict) -> Path:
    """Write `folder`/manifest.json atomically (temporary file, then rename)."""
    path = folder / MANIFEST
    tmp = folder / f".{MANIFEST}.{os.getpid()}.part"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def find_build(out: str | os.PathLike, generator: str | os.PathLike, audio_encoder: str | os.PathLike,
               artifact: str, precision: str | None = None, match: Callable[[dict], bool] | None = None) -> dict | None:
    """The newest complete build under `out` for this checkpoint pair that has `artifact` ('onnx', 'onnx_fp16',
    'tensorrt', 'coreml') and, when given, this precision; None when there is none."""
    out = Path(out)
    if not out.is_dir():
        return None
    gen_sha, enc_sha = sha256(generator), sha256(audio_encoder)
    found = []
    for manifest_path in out.glob(f"*/{MANIFEST}"):
        m = read_manifest(manifest_path.parent)
        if not m:
            continue
        key = m.get("key", {})
        if (key.get("generator_sha256"), key.get("audio_encoder_sha256")) != (gen_sha, enc_sha):
            continue
        if artifact not in m.get("artifacts", {}) or (precision and key.get("precision") != precision):
            continue
        if match is None or match(m):
            found.append(m)
    return max(found, key=lambda m: m.get("created", "")) if found else None
