"""Backends: availability probes, 'auto' selection, and the onnxruntime runner against the torch fp32 oracle.

The probes are the real ones (no mocks of the runtimes): what they say here is checked against what this
machine actually has (importable modules, CUDA, operating system).
"""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tolerances import reorder_atol

from conftest import SANDERS
from lipsync_trt import artifacts, backends
from lipsync_trt.backends import coreml as coreml_backend
from lipsync_trt.backends import tensorrt as trt_backend
from lipsync_trt.errors import BackendError, CheckpointError, UsageError

HAS_ORT = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None
needs_ort = pytest.mark.skipif(not HAS_ORT, reason="onnxruntime/onnx are not installed (pip install 'lipsync_trt[onnx]')")
BATCH = "1:2:3"   # the same profile as test_build.py, so the session's ONNX build is shared (a cache hit)


def _importable(module: str) -> bool:
    try:
        __import__(module)
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def onnx_dir(checkpoints, engines_dir) -> Path:
    from lipsync_trt import build as B

    return Path(B.build(*checkpoints, target="onnx", batch=BATCH, out=engines_dir, log=None, progress=False)["dir"])


# --------------------------------------------------------------------------------- availability / select

def test_available_reports_every_backend_with_the_real_reason():
    avail = backends.available()
    assert list(avail) == list(backends.NAMES)
    assert avail["torch"].usable and avail["torch"].reason == ""
    assert avail["onnxruntime"].usable == _importable("onnxruntime")
    if not avail["onnxruntime"].usable:
        assert "onnxruntime is not installed" in avail["onnxruntime"].reason
    trt_ok = _importable("tensorrt") and torch.cuda.is_available()
    assert avail["tensorrt"].usable == trt_ok
    if not _importable("tensorrt"):
        assert avail["tensorrt"].reason.startswith("TensorRT is not")
    elif not torch.cuda.is_available():
        assert "CUDA" in avail["tensorrt"].reason
    mac = platform.system() == "Darwin"
    assert avail["coreml"].usable == (mac and _importable("coremltools"))
    if not mac:
        assert "only on macOS" in avail["coreml"].reason
    for a in avail.values():
        assert a.usable == (a.reason == "")


def test_select_auto_on_cpu_prefers_onnxruntime_when_usable():
    name, dev = backends.select("auto", "cpu")
    assert dev.type == "cpu"
    if platform.system() == "Darwin" and backends.available()["coreml"].usable:
        assert name == "coreml"
    else:
        assert name == ("onnxruntime" if backends.available()["onnxruntime"].usable else "torch")


def test_select_explicit_names():
    assert backends.select("torch", "cpu") == ("torch", torch.device("cpu"))
    avail = backends.available()
    for name in ("tensorrt", "coreml", "onnxruntime"):
        if avail[name].usable:
            assert backends.select(name, "cuda" if name == "tensorrt" else "cpu")[0] == name
        else:
            with pytest.raises(BackendError, match="not usable here") as exc:
                backends.select(name, "cpu")
            assert avail[name].reason in str(exc.value)
    with pytest.raises(BackendError, match="unknown backend"):
        backends.select("tensorflow", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answers")
def test_without_cuda():
    with pytest.raises(BackendError, match="torch sees no CUDA"):
        backends.select("auto", "cuda")
    assert trt_backend.probe() is not None   # not installed, or no GPU: never usable without CUDA


def test_tensorrt_and_coreml_load_fail_clearly_where_unusable(checkpoints, tmp_path):
    for name, mod, suffix in (("tensorrt", trt_backend, ".engine"), ("coreml", coreml_backend, ".mlpackage")):
        reason = mod.probe()
        if reason is None:
            continue
        with pytest.raises(BackendError, match=f"backend '{name}' is not usable here") as exc:
            backends.load(name, *checkpoints, device="cpu", engines=tmp_path)
        assert reason in str(exc.value)
        with pytest.raises(BackendError, match=f"backend '{name}' is not usable here"):   # the runner module itself
            mod.load(tmp_path / f"generator{suffix}", tmp_path / f"audio_encoder{suffix}", torch.device("cpu"))
        assert not list(tmp_path.iterdir())   # failed before anything was built


def _forge_tensorrt_build(onnx_dir: Path, engines: Path, version: str = "10.9.0", gpu: str = "Test GPU",
                          generator_sha256: str | None = None) -> Path:
    """A folder shaped like a TensorRT fp32 build made on another machine (TensorRT `version`, `gpu`): the session's
    ONNX manifest with its key turned into a tensorrt one, and two .engine files no TensorRT would load (only
    the lookup reads this folder)."""
    m = json.loads((onnx_dir / "manifest.json").read_text())
    m["key"].update(target="tensorrt", gpu=gpu)
    m["key"]["versions"]["tensorrt"] = version
    if generator_sha256:
        m["key"]["generator_sha256"] = generator_sha256
    m["artifacts"] = {"tensorrt": {"generator": "generator.engine", "audio_encoder": "audio_encoder.engine"}}
    folder = engines / f"tensorrt-fp32-{version}-{len(list(engines.glob('*'))) if engines.is_dir() else 0}"
    folder.mkdir(parents=True)
    for name in m["artifacts"]["tensorrt"].values():
        (folder / name).write_bytes(b"not an engine")
    (folder / "manifest.json").write_text(json.dumps(m))
    return folder


@needs_ort
@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_auto_picks_tensorrt_only_for_a_build_of_these_checkpoints(checkpoints, onnx_dir, tmp_path):
    """The 'auto' table with TensorRT taken as usable on a CUDA device (as on a GPU machine with TensorRT): the
    TensorRT row holds only for a build in --engines whose manifest key matches these checkpoints, the
    precision, the TensorRT version and the GPU; a stray .engine file or another build falls through to torch."""
    cuda = torch.device("cuda")   # a device object only: nothing runs on it
    usable = {"tensorrt", "torch", "onnxruntime"}

    def pick(engines: Path, precision: str = "fp32", runtime: tuple = ("10.9.0", "Test GPU")) -> str:
        def has(kind: str) -> bool:
            return artifacts.find_tensorrt(engines, *checkpoints, precision, runtime=runtime) is not None
        return backends.first_row(backends.AUTO, usable, cuda, has).backend

    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "generator.engine").write_bytes(b"x")
    (stray / "model.engine").write_bytes(b"x")
    assert pick(stray) == "torch"
    assert pick(tmp_path / "absent") == "torch"
    other = tmp_path / "other"
    _forge_tensorrt_build(onnx_dir, other, generator_sha256="0" * 64)      # a build for other checkpoints
    assert pick(other) == "torch"
    ours = tmp_path / "ours"
    _forge_tensorrt_build(onnx_dir, ours)
    assert pick(ours) == "tensorrt"                                        # the lookup can say yes
    assert pick(ours, precision="fp16") == "torch"
    assert pick(ours, runtime=("10.8.0", "Test GPU")) == "torch"           # engines do not move across versions
    assert pick(ours, runtime=("10.9.0", "Another GPU")) == "torch"        # ... nor across GPUs
    # without CUDA the TensorRT row never holds, whatever the folder holds
    assert backends.first_row(backends.AUTO, usable, torch.device("cpu"), lambda kind: True).backend == "onnxruntime"
    assert backends.select("auto", "cpu", ours, *checkpoints)[0] != "tensorrt"
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="torch sees no CUDA"):
            backends.select("auto", "cuda", ours, *checkpoints)


def test_fixed_max_batch_slices_cover_the_batch_in_order():
    """What the TensorRT and Core ML runners feed a network whose profile has a maximum batch."""
    from lipsync_trt.models.io import GENERATOR

    images, audio = torch.rand(5, 6, 320, 320), torch.rand(5, 32, 16, 16)
    feeds = list(GENERATOR.slices((images, audio), 2))
    assert [sorted(f) for f in feeds] == [["audio", "images"]] * 3
    assert [len(f["images"]) for f in feeds] == [2, 2, 1]
    assert torch.equal(torch.cat([f["images"] for f in feeds]), images)
    assert torch.equal(torch.cat([f["audio"] for f in feeds]), audio)


def test_runner_checks_inputs_and_closes_as_a_context_manager(checkpoints):
    with backends.load("torch", *checkpoints, device="cpu") as r:
        with pytest.raises(UsageError, match="generator input 'images': expected shape"):
            r.generate(torch.rand(1, 3, 320, 320), torch.rand(1, 32, 16, 16))
        with pytest.raises(UsageError, match="batch sizes differ"):
            r.generate(torch.rand(2, 6, 320, 320), torch.rand(1, 32, 16, 16))
        with pytest.raises(UsageError, match="audio_encoder input 'mel'"):
            r.encode_audio(torch.rand(4, 80, 16))
        assert r.encode_audio(torch.rand(2, 1, 80, 16)).shape == (2, 512)
    assert r.closed
    with pytest.raises(BackendError, match="closed"):
        r.encode_audio(torch.rand(1, 1, 80, 16))


@pytest.mark.gpu
@pytest.mark.skipif(trt_backend.probe() is not None, reason=f"TensorRT backend not usable here: {trt_backend.probe()}")
@pytest.mark.parametrize("precision,cuda_graphs", [("fp32", False), ("fp16", False), ("fp16", True)])
def test_tensorrt_engines_match_torch_fp32(checkpoints, tmp_path, precision, cuda_graphs):
    """Engines built by `build` for this checkpoint pair give the torch fp32 path's outputs within the build's
    tolerance for that precision, at two batch sizes, with and without CUDA graphs (never run: TensorRT is not
    installable here)."""
    from lipsync_trt.build import TOLERANCE, real_shaped_inputs

    cuda = torch.device("cuda")
    trt_runner = backends.load("tensorrt", *checkpoints, device=cuda, precision=precision, engines=tmp_path,
                               batch="1:4:8", cuda_graphs=cuda_graphs)
    ref_runner = backends.load("torch", *checkpoints, device="cpu")   # the oracle: torch fp32 on the CPU
    windows, images, audio = real_shaped_inputs(ref_runner.audio_encoder, 3)

    def trt(fn, *xs):   # fp32 in: the runner casts to each engine input's own type
        return fn(*(x.to(cuda) for x in xs)).float().cpu()

    ref = ref_runner.generate(images, audio)
    out = trt(trt_runner.generate, images, audio)
    assert out.shape == ref.shape == (3, 3, 320, 320)
    assert float((out - ref).abs().max()) <= TOLERANCE[precision]["generator"]
    assert float((trt(trt_runner.generate, images, audio) - out).abs().max()) <= 1e-5   # a second run (replay)
    one = trt(trt_runner.generate, images[:1], audio[:1])
    assert float((one - ref[:1]).abs().max()) <= TOLERANCE[precision]["generator"]
    f_ref, f_out = ref_runner.encode_audio(windows), trt(trt_runner.encode_audio, windows)
    assert float((f_out - f_ref).abs().max()) <= TOLERANCE[precision]["audio_encoder"] * max(1.0, float(f_ref.abs().max()))


# ------------------------------------------------------------------------------------- onnxruntime runner

@needs_ort
def test_onnxruntime_runner_matches_torch_fp32(checkpoints, onnx_dir, engines_dir):
    from lipsync_trt.build import real_shaped_inputs

    ort_runner = backends.load("onnxruntime", *checkpoints, device="cpu", engines=engines_dir)
    torch_runner = backends.load("torch", *checkpoints, device="cpu")
    assert ort_runner.name == "onnxruntime" and ort_runner.device.type == "cpu"
    assert ort_runner.info["generator_onnx"] == str(onnx_dir / "generator.onnx")
    assert ort_runner.info["providers"] == ["CPUExecutionProvider"]
    windows, images, audio = real_shaped_inputs(torch_runner.audio_encoder, 2)
    ref = torch_runner.generate(images, audio)
    out = ort_runner.generate(images, audio)
    assert out.dtype == torch.float32 and out.shape == ref.shape == (2, 3, 320, 320)
    assert float((out - ref).abs().max()) <= 1e-4
    assert float(ref.std()) > 1e-3
    f_ref, f_out = torch_runner.encode_audio(windows), ort_runner.encode_audio(windows)
    assert f_out.shape == f_ref.shape == (len(windows), 512)
    assert float((f_out - f_ref).abs().max()) <= 1e-4 * max(1.0, float(f_ref.abs().max()))
    # batch size does not change the result
    one = ort_runner.generate(images[1:2], audio[1:2])
    assert float((one - out[1:2]).abs().max()) <= reorder_atol(1.0)   # another batch composition


@needs_ort
def test_onnxruntime_threads_option_and_default(checkpoints, onnx_dir, engines_dir):
    from lipsync_trt.backends import onnxruntime as ob

    assert 1 <= ob.physical_cores() <= (os.cpu_count() or 1)
    r = backends.load("onnxruntime", *checkpoints, device="cpu", engines=engines_dir, threads=1)
    assert r.threads == 1 and r.info["intra_op_threads"] == 1
    default = backends.load("onnxruntime", *checkpoints, device="cpu", engines=engines_dir)
    assert default.threads == ob.physical_cores()
    key = "session.intra_op.allow_spinning"      # read back from the sessions ONNX Runtime actually made
    for runner, want in ((default, "0"), (backends.load("onnxruntime", *checkpoints, device="cpu", engines=engines_dir,
                                                        spinning=True), "1")):
        for sess in (runner.gen.session, runner.enc.session):
            assert sess.get_session_options().get_session_config_entry(key) == want


@needs_ort
def test_onnxruntime_uses_the_cache_folder_when_no_engines_given(checkpoints, onnx_dir, engines_dir, monkeypatch):
    from lipsync_trt.backends import onnxruntime as ob

    monkeypatch.setenv("LIPSYNC_TRT_CACHE", str(engines_dir))   # where the session's build already is
    r = backends.load("onnxruntime", *checkpoints, device="cpu")
    assert Path(r.info["generator_onnx"]).parent == onnx_dir
    with pytest.raises(CheckpointError, match="not found"):
        backends.load("onnxruntime", checkpoints[0], checkpoints[1].with_name("nope.pth"), device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(BackendError):
            ob.OrtRunner(onnx_dir / "generator.onnx", onnx_dir / "audio_encoder.onnx", torch.device("cuda"))


@needs_ort
def test_onnxruntime_runner_runs_only_the_onnx_files_it_is_given(checkpoints, onnx_dir):
    from lipsync_trt.backends import onnxruntime as ob

    cpu = torch.device("cpu")
    with pytest.raises(BackendError, match=r"runs \.onnx files"):
        ob.load(*checkpoints, cpu)                                   # checkpoints: finding/exporting is not its job
    with pytest.raises(BackendError, match="ONNX file not found"):
        ob.load(onnx_dir / "nope.onnx", onnx_dir / "audio_encoder.onnx", cpu)
    with pytest.raises(BackendError, match="are not the generator's"):
        ob.load(onnx_dir / "audio_encoder.onnx", onnx_dir / "audio_encoder.onnx", cpu)
    with ob.load(onnx_dir / "generator.onnx", onnx_dir / "audio_encoder.onnx", cpu, threads=1) as r:
        assert r.info["generator_onnx"] == str(onnx_dir / "generator.onnx") and r.threads == 1


# ----------------------------------------------------------------------------------- end to end (sanders)

def _frames_png(folder: Path) -> list[np.ndarray]:
    import cv2

    return [cv2.imread(str(p)) for p in sorted(folder.glob("*.png"))]


@needs_ort
@pytest.mark.skipif(not (SANDERS / "talk_hb.wav").is_file(), reason=f"real data not present at {SANDERS}")
@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_generate_cli_onnxruntime_equals_torch_on_sanders(checkpoints, onnx_dir, engines_dir, tmp_path):
    """`python -m lipsync_trt generate --backend onnxruntime` on real frames: composited pixels within +-1 of torch."""
    if importlib.util.find_spec("lipsync_trt.pipeline") is None:
        pytest.skip("lipsync_trt.pipeline is not there yet")
    outs = {}
    for backend in ("torch", "onnxruntime"):
        frames_dir = tmp_path / backend
        cmd = [sys.executable, "-m", "lipsync_trt", "generate", "--avatar", str(SANDERS),
               "--audio", str(SANDERS / "talk_hb.wav"), "--generator", str(checkpoints[0]),
               "--audio-encoder", str(checkpoints[1]), "--frames", "0-3", "--frames-dir", str(frames_dir),
               "--backend", backend, "--device", "cpu", "--engines", str(engines_dir), "--quiet"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"backend {backend}" in proc.stdout
        outs[backend] = _frames_png(frames_dir)
    assert len(outs["torch"]) == len(outs["onnxruntime"]) == 4
    for a, b in zip(outs["torch"], outs["onnxruntime"]):
        assert a.shape == b.shape
        assert int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()) <= 1


# ------------------------------------------------------------------------------------------ helper threads

@needs_ort
def test_helper_threads_are_single_while_onnxruntime_renders_and_restored_after(demo, checkpoints, onnx_dir,
                                                                               engines_dir):
    import cv2

    from lipsync_trt import audio as A
    from lipsync_trt import avatar as AV
    from lipsync_trt import pipeline

    av = AV.load(demo["avatar"])
    ort_runner = backends.load("onnxruntime", *checkpoints, device="cpu", engines=engines_dir)
    torch_runner = backends.load("torch", *checkpoints, device="cpu")
    feats = pipeline.encode_features(torch_runner, A.load_16k(demo["audio"]))
    saved = cv2.getNumThreads(), torch.get_num_threads()
    cv2.setNumThreads(2)
    torch.set_num_threads(2)
    try:
        for runner, torch_during in ((ort_runner, 1), (torch_runner, 2)):
            seen = {(cv2.getNumThreads(), torch.get_num_threads())
                    for _ in pipeline.iter_frames(runner, av, feats, [0, 1, 2], batch_size=2)}
            assert seen == {(1, torch_during)}, runner.name
            assert (cv2.getNumThreads(), torch.get_num_threads()) == (2, 2), f"{runner.name}: not restored"
        it = pipeline.iter_frames(ort_runner, av, feats, [0, 1, 2], batch_size=1)
        next(it)
        it.close()                                                    # abandoned early: restored too
        assert (cv2.getNumThreads(), torch.get_num_threads()) == (2, 2)
    finally:
        cv2.setNumThreads(saved[0])
        torch.set_num_threads(saved[1])
