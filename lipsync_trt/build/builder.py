"""`build(...)`: checkpoints -> verified ONNX (fp32, and fp16 when asked) -> TensorRT / Core ML -> manifest, cached."""
from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .. import runtimes
from ..errors import BackendError, OutputError, UsageError
from ..models.checkpoints import load_audio_encoder, load_generator, sha256
from ..models.io import AUDIO_ENCODER, GENERATOR, NETWORKS
from . import coreml, tensorrt
from .export import OPSET, check_onnx, example_inputs, export_onnx
from .manifest import FORMAT, build_key, gpu_name, key_hash, optional_version, read_manifest, write_manifest
from .verify import TOLERANCE, Log, verify

DEFAULT_BATCH = (1, 4, 16)
DEFAULT_OUT = "engines"
TARGETS = ("onnx", "tensorrt", "coreml", "all")
PRECISIONS = ("fp32", "fp16")


MAX_BATCH = 4096   # the largest batch profile accepted (as generate's --batch-size bound, cli_args.BOUNDS)


def parse_batch(text: str | tuple | list | None) -> tuple[int, int, int]:
    """'MIN:OPT:MAX' (or one number N = N:N:N) -> (min, opt, max) with 1 <= min <= opt <= max."""
    if text is None:
        return DEFAULT_BATCH
    if isinstance(text, (tuple, list)):
        parts = [str(v) for v in text]
    else:
        parts = str(text).split(":")
    if len(parts) == 1:
        parts = parts * 3
    try:
        lo, opt, hi = (int(p) for p in parts)
    except ValueError:
        raise UsageError(f"--batch {text!r}: expected MIN:OPT:MAX integers, e.g. 1:4:16") from None
    if not 1 <= lo <= opt <= hi <= MAX_BATCH:
        raise UsageError(f"--batch {text!r}: need 1 <= MIN <= OPT <= MAX <= {MAX_BATCH}")
    return lo, opt, hi


def _require_onnx() -> None:
    for name, module in (("onnx", runtimes.onnx), ("onnxruntime", runtimes.onnxruntime)):
        if module.reason():
            raise BackendError(f"building needs {name}, which is not installed: pip install 'lipsync_trt[onnx]'")


def _check_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise OutputError(f"{out}: output folder is not writable ({exc.strerror or exc})") from None


class _Steps:
    def __init__(self, log: Log):
        self.log, self.n, self.records = log, 0, []

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.n += 1
        t0 = time.perf_counter()
        note: list[str] = []
        yield note
        dt = time.perf_counter() - t0
        self.records.append({"step": name, "seconds": round(dt, 3)})
        self.log(f"[{self.n}] {name}: {'; '.join(note) or 'ok'} ({dt:.1f} s)")


def _targets(target: str) -> list[str]:
    if target not in TARGETS:
        raise UsageError(f"--target {target!r}: expected one of {', '.join(TARGETS)}")
    return ["onnx", "tensorrt", "coreml"] if target == "all" else ["onnx"] if target == "onnx" else ["onnx", target]


def build(generator: str | os.PathLike, audio_encoder: str | os.PathLike, target: str = "onnx",
          precision: str = "fp32", batch: str | tuple | None = None, out: str | os.PathLike = DEFAULT_OUT,
          force: bool = False, log: Log | None = print, progress: bool = True) -> dict:
    """Build (or reuse) the artifacts for a checkpoint pair; return the manifest (with 'dir' = its folder).

    Raises a LipsyncError subclass for bad inputs (missing/wrong checkpoint, unwritable folder, a runtime
    that is not installed, an export that differs from PyTorch beyond tolerance)."""
    log = log or (lambda _msg: None)
    targets = _targets(target)
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    batch = parse_batch(batch)
    out = Path(out)
    _require_onnx()
    steps = _Steps(log)

    with steps("load + verify checkpoints") as note:
        gen_model, enc_model = load_generator(generator), load_audio_encoder(audio_encoder)
        gen_sha, enc_sha = sha256(generator), sha256(audio_encoder)
        note.append(f"generator {Path(generator).name} sha256 {gen_sha[:12]}, "
                    f"audio encoder {Path(audio_encoder).name} sha256 {enc_sha[:12]}")
    _check_out_dir(out)
    key = build_key(gen_sha, enc_sha, target, precision, batch)
    digest = key_hash(key)
    folder = out / f"{target}-{precision}-{digest[:12]}"
    if not force:
        cached = read_manifest(folder)
        if cached is not None and cached.get("key") == key:
            log(f"cached: {folder} (same checkpoints, target, precision, batch, versions and GPU; --force rebuilds)")
            cached["reused"] = True
            return cached

    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=out))
    try:
        manifest = _build_into(tmp, gen_model, enc_model, targets, precision, batch, steps, progress)
        manifest.update({"key": key, "key_sha256": digest,
                         "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                         "steps": steps.records,
                         "checkpoints": {"generator": str(Path(generator).resolve()),
                                         "audio_encoder": str(Path(audio_encoder).resolve())}})
        write_manifest(tmp, manifest)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)   # the folder appears complete or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"[{steps.n + 1}] manifest: {folder / 'manifest.json'}")
    manifest["dir"] = str(folder)
    manifest["reused"] = False
    return manifest


def _build_into(tmp: Path, gen_model: torch.nn.Module, enc_model: torch.nn.Module, targets: list[str],
                precision: str, batch: tuple[int, int, int], steps: _Steps, progress: bool) -> dict:
    artifacts: dict[str, dict[str, str]] = {}
    skipped: dict[str, str] = {}
    gen_example, enc_example = example_inputs(GENERATOR, batch[0]), example_inputs(AUDIO_ENCODER, batch[0])

    with steps(f"export ONNX (opset {OPSET}, dynamic batch, fp32)") as note:
        export_onnx(gen_model, gen_example, tmp / "generator.onnx", GENERATOR)
        export_onnx(enc_model, enc_example, tmp / "audio_encoder.onnx", AUDIO_ENCODER)
        artifacts["onnx"] = {"generator": "generator.onnx", "audio_encoder": "audio_encoder.onnx"}
        note.append(f"generator.onnx {_mb(tmp / 'generator.onnx')}, audio_encoder.onnx {_mb(tmp / 'audio_encoder.onnx')}")
    with steps("onnx.checker + ONNX Runtime vs PyTorch fp32") as note:
        check_onnx(tmp / "generator.onnx", GENERATOR)
        check_onnx(tmp / "audio_encoder.onnx", AUDIO_ENCODER)
        diffs = verify(tmp / "generator.onnx", tmp / "audio_encoder.onnx", gen_model, enc_model, "fp32", batch,
                       progress=progress)
        note.append(_fmt_diffs(diffs))
    verification = {"fp32": diffs}

    # The fp16 ONNX feeds ONNX Runtime and TensorRT; Core ML converts from torch.export with fp16 compute instead.
    if precision == "fp16" and targets != ["onnx", "coreml"]:
        with steps(f"export fp16 generator ONNX (opset {OPSET}, fp16 weights and I/O)") as note:
            half = copy.deepcopy(gen_model).half()
            export_onnx(half, tuple(t.half() for t in gen_example), tmp / "generator.fp16.onnx", GENERATOR)
            artifacts["onnx_fp16"] = {"generator": "generator.fp16.onnx"}
            note.append(f"generator.fp16.onnx {_mb(tmp / 'generator.fp16.onnx')}")
        with steps("onnx.checker + ONNX Runtime fp16 vs PyTorch fp32") as note:
            check_onnx(tmp / "generator.fp16.onnx", GENERATOR)
            diffs = verify(tmp / "generator.fp16.onnx", tmp / "audio_encoder.onnx", gen_model, enc_model, "fp16",
                           batch, progress=progress, which=("generator",))
            note.append(_fmt_diffs(diffs))
        verification["fp16"] = diffs

    explicit = len(targets) == 2   # --target tensorrt / coreml: a missing runtime is an error; 'all' skips it
    gen_onnx = tmp / ("generator.fp16.onnx" if precision == "fp16" else "generator.onnx")
    if "tensorrt" in targets:
        reason = tensorrt.build_probe()
        if reason:
            if explicit:
                keep = f"--target onnx{' --precision fp16' if precision == 'fp16' else ''}"
                raise BackendError(f"cannot build TensorRT engines here: {reason} (the {gen_onnx.name} it would "
                                   f"consume was exported and passed the ONNX Runtime check; {keep} keeps it)")
            skipped["tensorrt"] = reason
            steps.log(f"[-] TensorRT engines: skipped ({reason})")
        else:
            with steps(f"TensorRT engines ({precision}, batch {batch[0]}:{batch[1]}:{batch[2]})") as note:
                timing_cache = tmp.parent / f"timing-{optional_version('tensorrt')}-{_slug(gpu_name())}.cache"
                tensorrt.build_engine(gen_onnx, tmp / "generator.engine", batch, timing_cache)
                tensorrt.build_engine(tmp / "audio_encoder.onnx", tmp / "audio_encoder.engine", batch, timing_cache)
                artifacts["tensorrt"] = {"generator": "generator.engine", "audio_encoder": "audio_encoder.engine"}
                note.append(f"timing cache {timing_cache.name}")
    if "coreml" in targets:
        reason = coreml.convert_probe()
        if reason:
            if explicit:
                raise BackendError(f"cannot convert to Core ML here: {reason}")
            skipped["coreml"] = reason
            steps.log(f"[-] Core ML packages: skipped ({reason})")
        else:
            with steps(f"Core ML packages ({precision} compute, batch {batch[0]}..{batch[2]})") as note:
                coreml.convert(gen_model, enc_model, tmp, precision, batch)
                artifacts["coreml"] = {"generator": "generator.mlpackage", "audio_encoder": "audio_encoder.mlpackage"}
                note.append("generator.mlpackage, audio_encoder.mlpackage")

    return {"format": FORMAT,
            "tensors": {n.name: {"inputs": list(n.input_names), "output": n.output.name} for n in NETWORKS.values()},
            "artifacts": artifacts, "skipped": skipped, "max_abs_diff_vs_torch_fp32": verification,
            "tolerance": TOLERANCE}


def _mb(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.1f} MB"


def _slug(text: str | None) -> str:
    return "".join(c if c.isalnum() else "-" for c in (text or "nogpu")).strip("-").lower()


def _fmt_diffs(diffs: dict[str, float]) -> str:
    return "max abs diff " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())
