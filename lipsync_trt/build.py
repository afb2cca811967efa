"""python -m lipsync_trt.build : export ONNX, check it, and build TensorRT engines / Core ML packages.

    python -m lipsync_trt.build --generator G.pth --audio-encoder A.pth --target onnx|tensorrt|coreml|all
                                [--precision fp32|fp16] [--batch MIN:OPT:MAX] [--out engines/] [--force]
    python -m lipsync_trt.build --demo --target onnx         # seeded random (untrained) weights

Steps (one line each, with timings): load + verify checkpoints -> export ONNX (both models, dynamic
batch, opset OPSET, one self-contained file each) -> onnx.checker + ONNX Runtime vs PyTorch fp32 on
random and real-shaped inputs (max abs diff printed; the build fails above tolerance) -> engines
-> manifest.json.

Layout: every build goes to `OUT/<target>-<precision>-<key12>/` where key12 is the start of the sha256
of the cache key: both checkpoints' sha256, target, precision, batch profile, opset, runtime versions,
GPU name, format version. `manifest.json` in that folder holds the key plus the creation time, the
artifact file names, the measured differences and step timings. Re-running with the same key reuses
the folder (nothing is rebuilt); `--force` rebuilds. A build is written into a temporary folder and
renamed into place, so a folder with a manifest is always complete.

From Python: `build(...)` returns the manifest dict (with `dir`); `ensure_onnx(...)` finds or produces
the ONNX pair for a checkpoint pair (what the onnxruntime backend uses); `find_build(...)` looks a
matching build up (what the tensorrt and coreml backends use).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from . import recipe as R
from .errors import BackendError, LipsyncError, OutputError, UsageError
from .models.checkpoints import load_audio_encoder, load_generator, sha256

FORMAT = 1
OPSET = 17
DEFAULT_BATCH = (1, 4, 16)
DEFAULT_OUT = "engines"
TARGETS = ("onnx", "tensorrt", "coreml", "all")
PRECISIONS = ("fp32", "fp16")

# Tensor names shared by every artifact (ONNX, TensorRT, Core ML).
GEN_INPUTS = ("images", "audio")
GEN_OUTPUT = "output"
ENC_INPUT = "mel"
ENC_OUTPUT = "features"
GEN_SHAPES = {"images": (R.GENERATOR_IN_CHANNELS, R.ROI_SIZE, R.ROI_SIZE), "audio": R.FEATURE_SHAPE}
ENC_SHAPE = (1, R.N_MELS, R.MEL_WINDOW)

# Max abs difference allowed between ONNX Runtime and PyTorch fp32 (generator output is in [0, 1]; encoder
# features are scaled by max(1, max|reference|)). fp16 applies to the generator only: the audio encoder is
# tiny and always stays fp32 so features match the reference.
TOLERANCE = {"fp32": {"generator": 1e-4, "audio_encoder": 1e-4}, "fp16": {"generator": 2e-2, "audio_encoder": 1e-4}}

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def default_cache_dir() -> Path:
    """Where backends export ONNX when no engines folder is given: $LIPSYNC_TRT_CACHE or ~/.cache/lipsync_trt."""
    env = os.environ.get("LIPSYNC_TRT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "lipsync_trt"


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
    if not 1 <= lo <= opt <= hi:
        raise UsageError(f"--batch {text!r}: need 1 <= MIN <= OPT <= MAX")
    return lo, opt, hi


def _versions(targets: list[str]) -> dict:
    import onnx

    v = {"lipsync_trt": _package_version(), "python": platform.python_version(), "torch": torch.__version__,
         "onnx": onnx.__version__, "onnxruntime": _optional_version("onnxruntime")}
    if "tensorrt" in targets:
        v["tensorrt"] = _optional_version("tensorrt")
    if "coreml" in targets:
        v["coremltools"] = _optional_version("coremltools")
    return v


def _package_version() -> str:
    from . import __version__

    return __version__


def _optional_version(module: str) -> str | None:
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


def gpu_name() -> str | None:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def _key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _require_onnx() -> None:
    for mod, pkg in (("onnx", "onnx"), ("onnxruntime", "onnxruntime")):
        try:
            __import__(mod)
        except ImportError:
            raise BackendError(f"building needs {pkg}, which is not installed: pip install 'lipsync_trt[onnx]'") from None


def _check_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise OutputError(f"{out}: output folder is not writable ({exc.strerror or exc})") from None


# ----------------------------------------------------------------------------------------------- export

def export_onnx(model: torch.nn.Module, example: tuple[torch.Tensor, ...], path: Path, input_names: tuple[str, ...],
                output_name: str, opset: int = OPSET) -> Path:
    """Export with a dynamic batch axis to one self-contained .onnx file (no external-data side files).

    Uses torch.onnx's TorchScript exporter (`dynamo=False`): it needs no onnxscript, folds BatchNorm into the
    convolutions in eval mode, and these networks have no data-dependent control flow (the Up block's pad is
    zero at 320x320, so tracing it as a constant is exact for the only input size there is).
    """
    import onnx

    path = Path(path)
    axes = {name: {0: "batch"} for name in (*input_names, output_name)}
    before = set(os.listdir(path.parent))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # TracerWarning (see above) and the exporter's deprecation notice
        with torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(model, example, str(path), input_names=list(input_names), output_names=[output_name],
                              dynamic_axes=axes, opset_version=opset, do_constant_folding=True, dynamo=False)
    extra = set(os.listdir(path.parent)) - before - {path.name}
    proto = onnx.load(str(path), load_external_data=False)
    external = [t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if extra or external:
        raise BackendError(f"{path}: ONNX export wrote external data ({sorted(extra) or external[:3]}); "
                           "expected one self-contained file")
    return path


def check_onnx(path: Path, inputs: tuple[str, ...], output: str) -> None:
    """onnx.checker (full check, with shape inference) and the expected input/output names with a dynamic batch."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise BackendError(f"{path}: onnx.checker failed: {str(exc).splitlines()[0][:300]}") from None
    graph = onnx.load(str(path), load_external_data=False).graph
    names_in = [i.name for i in graph.input]
    names_out = [o.name for o in graph.output]
    if names_in != list(inputs) or names_out != [output]:
        raise BackendError(f"{path}: expected inputs {list(inputs)} and output [{output!r}], "
                           f"got {names_in} and {names_out}")
    for vi in (*graph.input, *graph.output):
        dim0 = vi.type.tensor_type.shape.dim[0]
        if dim0.dim_value or not dim0.dim_param:
            raise BackendError(f"{path}: tensor {vi.name!r} has a fixed batch size; expected a dynamic one")


# ----------------------------------------------------------------------------------------- verification

def real_shaped_inputs(encoder: torch.nn.Module, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs built by the package's own stages, so their statistics are those of a real run:
    a drawn face frame through compose.prepare (roi + masked copy), and a speech-like signal through
    audio.mel -> mel windows -> the audio encoder -> padded feature windows. Returns (mel windows,
    images (B,6,320,320), audio (B,32,16,16))."""
    import numpy as np

    from . import audio, compose

    g = torch.Generator().manual_seed(seed)
    h, w = 400, 360
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    frame = torch.stack([60 + 0.3 * yy, 90 + 0.2 * xx, 150 - 0.1 * (xx + yy)], dim=-1)
    face = ((xx - 180) / 110) ** 2 + ((yy - 210) / 140) ** 2 < 1
    frame[face] = torch.tensor([110.0, 150.0, 205.0])
    mouth = ((xx - 180) / 40) ** 2 + ((yy - 280) / 12) ** 2 < 1
    frame[mouth] = torch.tensor([60.0, 50.0, 150.0])
    frame = (frame + 6 * torch.randn(frame.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    box = (30, 60, 330, 360)
    images, _ = compose.prepare([frame] * batch, [box] * batch)

    t = np.arange(int(R.SAMPLE_RATE * 1.0)) / R.SAMPLE_RATE
    rng = np.random.default_rng(seed)
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)
    wav = (0.3 * envelope * sum(np.sin(2 * np.pi * f * t) / k for k, f in enumerate((140, 280, 420, 700), 1))
           + 0.01 * rng.standard_normal(t.shape)).astype(np.float32)
    windows = audio.mel_windows(audio.mel(wav))
    with torch.no_grad():
        feats = audio.pad_features(encoder(windows))
    feature_windows = audio.feature_windows(feats, range(batch))
    return windows, images, feature_windows


class _Ort:
    """Tiny ONNX Runtime wrapper for the checks (the backend has its own, with thread settings)."""

    def __init__(self, path: Path):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.types = {i.name: i.type for i in self.session.get_inputs()}

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        feed = {k: v.detach().cpu().numpy().astype("float16" if self.types[k] == "tensor(float16)" else "float32")
                for k, v in inputs.items()}
        return torch.from_numpy(self.session.run(None, feed)[0]).float()


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise BackendError(f"ONNX Runtime output shape {tuple(a.shape)} != PyTorch {tuple(b.shape)}")
    return float((a.float() - b.float()).abs().max())


def verify(gen_onnx: Path, enc_onnx: Path, generator: torch.nn.Module, encoder: torch.nn.Module, precision: str,
           batch: tuple[int, int, int], log: Log = _stderr, progress: bool = True,
           which: tuple[str, ...] = ("generator", "audio_encoder")) -> dict[str, float]:
    """ONNX Runtime vs PyTorch fp32 on random and real-shaped inputs at two batch sizes; raise above tolerance."""
    from tqdm import tqdm

    tol = TOLERANCE[precision]
    gen_rt, enc_rt = _Ort(gen_onnx), _Ort(enc_onnx)
    lo, _, hi = batch
    b2 = min(max(lo + 2, 3), hi)  # a second, different batch size exercises the dynamic axis
    g = torch.Generator().manual_seed(1)
    windows, images, feats = real_shaped_inputs(encoder, b2)
    cases = [
        ("generator", f"random b{lo}", lambda: (torch.rand(lo, *GEN_SHAPES["images"], generator=g),
                                                torch.randn(lo, *GEN_SHAPES["audio"], generator=g))),
        ("generator", f"real-shaped b{b2}", lambda: (images, feats)),
        ("audio_encoder", f"random b{lo}", lambda: (torch.rand(lo, *ENC_SHAPE, generator=g) * 8 - 4,)),
        ("audio_encoder", f"real-shaped b{len(windows)}", lambda: (windows,)),
    ]
    cases = [c for c in cases if c[0] in which]
    diffs = {}
    for what, label, make in tqdm(cases, desc="verify", unit="case", leave=False, disable=not progress or None):
        args = make()
        with torch.no_grad():
            if what == "generator":
                ref = generator(*args)
                got = gen_rt(images=args[0], audio=args[1])
                scale = 1.0
            else:
                ref = encoder(*args)
                got = enc_rt(mel=args[0])
                scale = max(1.0, float(ref.abs().max()))
        d = _max_abs(got, ref)
        diffs[f"{what} {label}"] = d
        if d > tol[what] * scale:
            raise BackendError(f"ONNX Runtime {what} ({precision}) differs from PyTorch fp32 by {d:.3g} on {label} "
                               f"inputs (tolerance {tol[what] * scale:.3g}); not writing a bad artifact")
    return diffs


# ------------------------------------------------------------------------------------------------ build

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


def build_key(gen_sha: str, enc_sha: str, target: str, precision: str, batch: tuple[int, int, int]) -> dict:
    """Everything an artifact depends on (the manifest minus creation time and results)."""
    return {"format": FORMAT, "generator_sha256": gen_sha, "audio_encoder_sha256": enc_sha, "target": target,
            "precision": precision, "batch": {"min": batch[0], "opt": batch[1], "max": batch[2]}, "opset": OPSET,
            "exporter": "torch.onnx (TorchScript, dynamo=False)", "versions": _versions(_targets(target)),
            "gpu": gpu_name()}


def _read_manifest(folder: Path) -> dict | None:
    try:
        m = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    m["dir"] = str(folder)
    files = [f for group in m.get("artifacts", {}).values() for f in group.values()]
    return m if all((folder / f).exists() for f in files) else None


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
    key_hash = _key_hash(key)
    folder = out / f"{target}-{precision}-{key_hash[:12]}"
    if not force:
        cached = _read_manifest(folder)
        if cached is not None and cached.get("key") == key:
            log(f"cached: {folder} (same checkpoints, target, precision, batch, versions and GPU; --force rebuilds)")
            cached["reused"] = True
            return cached

    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=out))
    try:
        manifest = _build_into(tmp, gen_model, enc_model, targets, precision, batch, steps, progress)
        manifest.update({"key": key, "key_sha256": key_hash,
                         "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                         "steps": steps.records,
                         "checkpoints": {"generator": str(Path(generator).resolve()),
                                         "audio_encoder": str(Path(audio_encoder).resolve())}})
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
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
    gen_example = (torch.rand(batch[0], *GEN_SHAPES["images"]), torch.rand(batch[0], *GEN_SHAPES["audio"]))
    enc_example = (torch.rand(batch[0], *ENC_SHAPE),)

    with steps(f"export ONNX (opset {OPSET}, dynamic batch, fp32)") as note:
        export_onnx(gen_model, gen_example, tmp / "generator.onnx", GEN_INPUTS, GEN_OUTPUT)
        export_onnx(enc_model, enc_example, tmp / "audio_encoder.onnx", (ENC_INPUT,), ENC_OUTPUT)
        artifacts["onnx"] = {"generator": "generator.onnx", "audio_encoder": "audio_encoder.onnx"}
        note.append(f"generator.onnx {_mb(tmp / 'generator.onnx')}, audio_encoder.onnx {_mb(tmp / 'audio_encoder.onnx')}")
    with steps("onnx.checker + ONNX Runtime vs PyTorch fp32") as note:
        check_onnx(tmp / "generator.onnx", GEN_INPUTS, GEN_OUTPUT)
        check_onnx(tmp / "audio_encoder.onnx", (ENC_INPUT,), ENC_OUTPUT)
        diffs = verify(tmp / "generator.onnx", tmp / "audio_encoder.onnx", gen_model, enc_model, "fp32", batch,
                       progress=progress)
        note.append(_fmt_diffs(diffs))
    verification = {"fp32": diffs}

    # The fp16 ONNX feeds ONNX Runtime and TensorRT; Core ML converts from torch.export with fp16 compute instead.
    if precision == "fp16" and targets != ["onnx", "coreml"]:
        with steps(f"export fp16 generator ONNX (opset {OPSET}, fp16 weights and I/O)") as note:
            half = copy.deepcopy(gen_model).half()
            export_onnx(half, tuple(t.half() for t in gen_example), tmp / "generator.fp16.onnx", GEN_INPUTS, GEN_OUTPUT)
            artifacts["onnx_fp16"] = {"generator": "generator.fp16.onnx"}
            note.append(f"generator.fp16.onnx {_mb(tmp / 'generator.fp16.onnx')}")
        with steps("onnx.checker + ONNX Runtime fp16 vs PyTorch fp32") as note:
            check_onnx(tmp / "generator.fp16.onnx", GEN_INPUTS, GEN_OUTPUT)
            diffs = verify(tmp / "generator.fp16.onnx", tmp / "audio_encoder.onnx", gen_model, enc_model, "fp16",
                           batch, progress=progress, which=("generator",))
            note.append(_fmt_diffs(diffs))
        verification["fp16"] = diffs

    explicit = len(targets) == 2   # --target tensorrt / coreml: a missing runtime is an error; 'all' skips it
    gen_onnx = tmp / ("generator.fp16.onnx" if precision == "fp16" else "generator.onnx")
    if "tensorrt" in targets:
        from .backends import tensorrt as trt_backend

        reason = trt_backend.build_probe()
        if reason:
            if explicit:
                keep = f"--target onnx{' --precision fp16' if precision == 'fp16' else ''}"
                raise BackendError(f"cannot build TensorRT engines here: {reason} (the {gen_onnx.name} it would "
                                   f"consume was exported and passed the ONNX Runtime check; {keep} keeps it)")
            skipped["tensorrt"] = reason
            steps.log(f"[-] TensorRT engines: skipped ({reason})")
        else:
            with steps(f"TensorRT engines ({precision}, batch {batch[0]}:{batch[1]}:{batch[2]})") as note:
                timing_cache = tmp.parent / f"timing-{_optional_version('tensorrt')}-{_slug(gpu_name())}.cache"
                trt_backend.build_engine(gen_onnx, tmp / "generator.engine", batch, timing_cache)
                trt_backend.build_engine(tmp / "audio_encoder.onnx", tmp / "audio_encoder.engine", batch, timing_cache)
                artifacts["tensorrt"] = {"generator": "generator.engine", "audio_encoder": "audio_encoder.engine"}
                note.append(f"timing cache {timing_cache.name}")
    if "coreml" in targets:
        from .backends import coreml as coreml_backend

        reason = coreml_backend.convert_probe()
        if reason:
            if explicit:
                raise BackendError(f"cannot convert to Core ML here: {reason}")
            skipped["coreml"] = reason
            steps.log(f"[-] Core ML packages: skipped ({reason})")
        else:
            with steps(f"Core ML packages ({precision} compute, batch {batch[0]}..{batch[2]})") as note:
                coreml_backend.convert(gen_model, enc_model, tmp, precision, batch)
                artifacts["coreml"] = {"generator": "generator.mlpackage", "audio_encoder": "audio_encoder.mlpackage"}
                note.append("generator.mlpackage, audio_encoder.mlpackage")

    return {"format": FORMAT, "tensors": {"generator": {"inputs": list(GEN_INPUTS), "output": GEN_OUTPUT},
                                          "audio_encoder": {"inputs": [ENC_INPUT], "output": ENC_OUTPUT}},
            "artifacts": artifacts, "skipped": skipped, "max_abs_diff_vs_torch_fp32": verification,
            "tolerance": TOLERANCE}


def _mb(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.1f} MB"


def _slug(text: str | None) -> str:
    return "".join(c if c.isalnum() else "-" for c in (text or "nogpu")).strip("-").lower()


def _fmt_diffs(diffs: dict[str, float]) -> str:
    return "max abs diff " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())


# ----------------------------------------------------------------------------------- lookups for backends

def find_build(out: str | os.PathLike, generator: str | os.PathLike, audio_encoder: str | os.PathLike,
               artifact: str, precision: str | None = None, match: Callable[[dict], bool] | None = None) -> dict | None:
    """The newest complete build under `out` for this checkpoint pair that has `artifact` ('onnx', 'onnx_fp16',
    'tensorrt', 'coreml') and, when given, this precision; None when there is none."""
    out = Path(out)
    if not out.is_dir():
        return None
    gen_sha, enc_sha = sha256(generator), sha256(audio_encoder)
    found = []
    for manifest_path in out.glob("*/manifest.json"):
        m = _read_manifest(manifest_path.parent)
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


def ensure_onnx(generator: str | os.PathLike, audio_encoder: str | os.PathLike, out: str | os.PathLike | None = None,
                precision: str = "fp32", log: Log | None = _stderr) -> tuple[Path, Path]:
    """(generator ONNX, audio encoder ONNX) for a checkpoint pair: an existing verified build under `out`
    (default default_cache_dir()) when there is one, else a fresh `build(target='onnx')` there."""
    if precision not in PRECISIONS:
        raise BackendError(f"onnxruntime backend: unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    for path in (generator, audio_encoder):
        if not Path(path).is_file():
            from .errors import CheckpointError

            raise CheckpointError(f"{path}: checkpoint file not found")
    out = Path(out) if out is not None else default_cache_dir()
    artifact = "onnx_fp16" if precision == "fp16" else "onnx"
    m = find_build(out, generator, audio_encoder, artifact, precision if precision == "fp16" else None)
    if m is None:
        m = build(generator, audio_encoder, target="onnx", precision=precision, out=out, log=log,
                  progress=log is not None)
    folder = Path(m["dir"])
    return folder / m["artifacts"][artifact]["generator"], folder / m["artifacts"]["onnx"]["audio_encoder"]


# -------------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lipsync_trt.build",
        description="Export the generator and audio encoder to ONNX, check them against PyTorch, and build "
                    "TensorRT engines or Core ML packages. Artifacts go to OUT/<target>-<precision>-<key>/ "
                    "with a manifest.json; an identical request reuses them.")
    p.add_argument("--generator", metavar="G.pth", help="SyncTalk_2D generator checkpoint (Model(6, 'ave') state_dict)")
    p.add_argument("--audio-encoder", metavar="A.pth", help="SyncTalk audio encoder checkpoint")
    p.add_argument("--demo", action="store_true",
                   help="use seeded random (untrained) checkpoints from lipsync_trt.demo instead of --generator/--audio-encoder")
    p.add_argument("--target", default="onnx", choices=TARGETS,
                   help="onnx (default); tensorrt (needs TensorRT and CUDA); coreml (needs coremltools; runs on macOS); "
                        "all (onnx + every engine kind this machine can build; the others are reported as skipped)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="generator precision of the engines (the audio encoder stays fp32); default fp32")
    p.add_argument("--batch", default=":".join(map(str, DEFAULT_BATCH)), metavar="MIN:OPT:MAX",
                   help="batch profile for TensorRT / Core ML (ONNX batch is always dynamic); default %(default)s")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help="output folder (default %(default)s/)")
    p.add_argument("--force", action="store_true", help="rebuild even when a matching build exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.demo:
            if args.generator or args.audio_encoder:
                raise UsageError("--demo makes its own checkpoints; leave out --generator/--audio-encoder")
            from .demo import demo_checkpoints

            args.generator, args.audio_encoder = demo_checkpoints(Path(args.out) / "demo-checkpoints")
        elif not (args.generator and args.audio_encoder):
            raise UsageError("give --generator G.pth and --audio-encoder A.pth (or --demo)")
        t0 = time.perf_counter()
        m = build(args.generator, args.audio_encoder, target=args.target, precision=args.precision, batch=args.batch,
                  out=args.out, force=args.force, progress=not args.quiet)
        print(f"done in {time.perf_counter() - t0:.1f} s: {m['dir']}"
              + "".join(f"\n  {kind}: {', '.join(files.values())}" for kind, files in m["artifacts"].items())
              + "".join(f"\n  skipped {kind}: {why}" for kind, why in m.get("skipped", {}).items()))
        return 0
    except LipsyncError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
