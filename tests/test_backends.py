"""Backends: availability probes, 'auto' selection, and the onnxruntime runner against the torch fp32 oracle.

The probes are the real ones (no mocks of the runtimes): what they say here is checked against what this
machine actually has (importable modules, CUDA, operating system).
"""
from __future__ import annotations

import importlib.util
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tolerances import reorder_atol

from lipsync_trt import backends
from lipsync_trt.backends import coreml as coreml_backend
from lipsync_trt.backends import tensorrt as trt_backend
from lipsync_trt.errors import BackendError, CheckpointError

HAS_ORT = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None
needs_ort = pytest.mark.skipif(not HAS_ORT, reason="onnxruntime/onnx are not installed (pip install 'lipsync_trt[onnx]')")
SANDERS = Path(os.environ.get("LIPSYNC_SANDERS", "/work/shared/datasets/sanders"))
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


def test_tensorrt_and_coreml_load_fail_clearly_where_unusable(checkpoints):
    for name, mod in (("tensorrt", trt_backend), ("coreml", coreml_backend)):
        reason = mod.probe()
        if reason is None:
            continue
        with pytest.raises(BackendError, match=f"backend '{name}' is not usable here"):
            mod.load(*checkpoints, torch.device("cpu"))


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
    r = ob.load(*checkpoints, torch.device("cpu"), engines=engines_dir, threads=1)
    assert r.threads == 1 and r.info["intra_op_threads"] == 1
    default = ob.load(*checkpoints, torch.device("cpu"), engines=engines_dir)
    assert default.threads == ob.physical_cores()
    key = "session.intra_op.allow_spinning"      # read back from the sessions ONNX Runtime actually made
    for runner, want in ((default, "0"), (ob.load(*checkpoints, torch.device("cpu"), engines=engines_dir,
                                                   spinning=True), "1")):
        for sess in (runner.gen.session, runner.enc.session):
            assert sess.get_session_options().get_session_config_entry(key) == want


@needs_ort
def test_onnxruntime_uses_the_cache_folder_when_no_engines_given(checkpoints, onnx_dir, engines_dir, monkeypatch):
    from lipsync_trt.backends import onnxruntime as ob

    monkeypatch.setenv("LIPSYNC_TRT_CACHE", str(engines_dir))   # where the session's build already is
    r = ob.load(*checkpoints, torch.device("cpu"))
    assert Path(r.info["generator_onnx"]).parent == onnx_dir
    with pytest.raises(CheckpointError, match="not found"):
        ob.load(checkpoints[0], checkpoints[1].with_name("nope.pth"), torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(BackendError):
            ob.OrtRunner(onnx_dir / "generator.onnx", onnx_dir / "audio_encoder.onnx", torch.device("cuda"))


# ----------------------------------------------------------------------------------- end to end (sanders)

def _frames_png(folder: Path) -> list[np.ndarray]:
    import cv2

    return [cv2.imread(str(p)) for p in sorted(folder.glob("*.png"))]


@needs_ort
@pytest.mark.skipif(not (SANDERS / "talk_hb.wav").is_file(), reason=f"real data not present at {SANDERS}")
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
