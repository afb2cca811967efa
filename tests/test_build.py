"""python -m lipsync_trt.build: ONNX export + checks, cache, manifest, Core ML, bad inputs.

Oracle: the PyTorch fp32 modules (lipsync_trt.models) run on the same inputs. Checkpoints are seeded
random weights (lipsync_trt.demo.demo_checkpoints), so no download is needed.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnx", reason="onnx is not installed (pip install 'lipsync_trt[onnx]')")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'lipsync_trt[onnx]')")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from lipsync_trt import artifacts  # noqa: E402
from lipsync_trt import build as B  # noqa: E402
from lipsync_trt.errors import BackendError, CheckpointError, OutputError, UsageError  # noqa: E402
from lipsync_trt.models import load_audio_encoder, load_generator  # noqa: E402
from lipsync_trt.models.checkpoints import sha256  # noqa: E402
from lipsync_trt.models.io import AUDIO_ENCODER, GENERATOR  # noqa: E402

BATCH = "1:2:3"   # small profile: keeps the checks fast on a 2-core CPU


@pytest.fixture(scope="session")
def onnx_build(checkpoints, engines_dir) -> dict:
    """One fp32 ONNX build shared by the tests (test_backends.py asks for the same one: a cache hit)."""
    return B.build(*checkpoints, target="onnx", precision="fp32", batch=BATCH, out=engines_dir, log=None, progress=False)


@pytest.fixture(scope="session")
def models(checkpoints):
    return load_generator(checkpoints[0]), load_audio_encoder(checkpoints[1])


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_manifest_records_the_key_and_self_contained_files(onnx_build, checkpoints):
    m = onnx_build
    folder = Path(m["dir"])
    saved = json.loads((folder / "manifest.json").read_text())
    key = saved["key"]
    assert key["generator_sha256"] == sha256(checkpoints[0]) and key["audio_encoder_sha256"] == sha256(checkpoints[1])
    assert key["precision"] == "fp32" and key["target"] == "onnx"
    assert key["batch"] == {"min": 1, "opt": 2, "max": 3}
    assert key["opset"] == B.OPSET and key["versions"]["torch"] == torch.__version__
    assert key["versions"]["onnxruntime"] == ort.__version__ and "gpu" in key
    assert saved["created"].endswith("+00:00") and saved["steps"]
    assert folder.name.endswith(B.key_hash(key)[:12])
    # one file per model, nothing beside them (no external-data side files)
    assert sorted(p.name for p in folder.iterdir()) == ["audio_encoder.onnx", "generator.onnx", "manifest.json"]
    assert saved["tensors"] == {"generator": {"inputs": ["images", "audio"], "output": "output"},
                                "audio_encoder": {"inputs": ["mel"], "output": "features"}}
    for name, inputs, output in (("generator.onnx", GENERATOR.input_names, GENERATOR.output.name),
                                 ("audio_encoder.onnx", AUDIO_ENCODER.input_names, AUDIO_ENCODER.output.name)):
        proto = onnx.load(str(folder / name))
        assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
        assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {B.OPSET}
        assert [i.name for i in proto.graph.input] == list(inputs) and [o.name for o in proto.graph.output] == [output]
        assert all(i.type.tensor_type.shape.dim[0].dim_param for i in proto.graph.input)
    diffs = saved["max_abs_diff_vs_torch_fp32"]["fp32"]
    assert diffs and all(v <= 1e-4 for v in diffs.values())


@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_onnx_dynamic_batch_1_3_8_agree_with_torch(onnx_build, models):
    gen, enc = models
    folder = Path(onnx_build["dir"])
    gs, es = _session(folder / "generator.onnx"), _session(folder / "audio_encoder.onnx")
    g = torch.Generator().manual_seed(3)
    images, audio = torch.rand(8, 6, 320, 320, generator=g), torch.randn(8, 32, 16, 16, generator=g) * 0.3
    mel = torch.rand(8, 1, 80, 16, generator=g) * 8 - 4
    with torch.no_grad():
        ref_gen, ref_enc = gen(images, audio), enc(mel)
    assert float(ref_gen.std()) > 1e-3   # the comparison is not between two constants
    for b in (1, 3, 8):
        out = torch.from_numpy(gs.run(None, {"images": images[:b].numpy(), "audio": audio[:b].numpy()})[0])
        assert out.shape == (b, 3, 320, 320)
        assert float((out - ref_gen[:b]).abs().max()) <= 1e-4, b
        feats = torch.from_numpy(es.run(None, {"mel": mel[:b].numpy()})[0])
        assert feats.shape == (b, 512)
        assert float((feats - ref_enc[:b]).abs().max()) <= 1e-4 * max(1.0, float(ref_enc.abs().max())), b


def test_verify_rejects_an_onnx_that_differs_from_torch(onnx_build, models, tmp_path):
    """The tolerance check can fail: nudge the output conv's bias in a copy of the ONNX."""
    gen, enc = models
    folder = Path(onnx_build["dir"])
    proto = onnx.load(str(folder / "generator.onnx"))
    last_conv = [n for n in proto.graph.node if n.op_type == "Conv"][-1]
    bias = next(t for t in proto.graph.initializer if t.name == last_conv.input[2])
    arr = onnx.numpy_helper.to_array(bias).copy() + 0.05
    bias.CopyFrom(onnx.numpy_helper.from_array(arr, bias.name))
    bad = tmp_path / "generator.onnx"
    onnx.save(proto, str(bad))
    with pytest.raises(BackendError, match="differs from PyTorch fp32"):
        B.verify(bad, folder / "audio_encoder.onnx", gen, enc, "fp32", (1, 2, 3), progress=False)


@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_same_request_reuses_the_build_and_force_rebuilds(onnx_build, checkpoints, engines_dir):
    again = B.build(*checkpoints, target="onnx", precision="fp32", batch=BATCH, out=engines_dir, log=None, progress=False)
    assert again["reused"] and again["dir"] == onnx_build["dir"] and again["created"] == onnx_build["created"]
    lines = []
    forced = B.build(*checkpoints, target="onnx", precision="fp32", batch=BATCH, out=engines_dir, force=True,
                     log=lines.append, progress=False)
    assert not forced["reused"] and forced["dir"] == onnx_build["dir"]
    assert [ln.split("]")[0] for ln in lines] == ["[1", "[2", "[3", "[4"]   # one line per step
    assert all(ln.rstrip().endswith(" s)") for ln in lines[:3]) and "max abs diff" in lines[2]
    # a different batch profile is a different key, hence a different folder
    assert B.key_hash(B.build_key("a", "b", "onnx", "fp32", (1, 2, 3))) != \
        B.key_hash(B.build_key("a", "b", "onnx", "fp32", (1, 4, 16)))


def test_ensure_onnx_finds_the_build_for_a_checkpoint_pair(onnx_build, checkpoints, engines_dir):
    gen_onnx, enc_onnx = artifacts.ensure_onnx(*checkpoints, out=engines_dir, log=None)
    assert gen_onnx == Path(onnx_build["dir"]) / "generator.onnx" and enc_onnx.name == "audio_encoder.onnx"
    assert B.find_build(engines_dir, *checkpoints, "tensorrt") is None   # looked up by artifact kind
    with pytest.raises(CheckpointError, match="not found"):
        artifacts.ensure_onnx(checkpoints[0], checkpoints[1].with_name("missing.pth"), out=engines_dir, log=None)


@pytest.mark.parametrize("text,expected", [("1:4:16", (1, 4, 16)), ("8", (8, 8, 8)), (None, B.DEFAULT_BATCH)])
def test_parse_batch(text, expected):
    assert B.parse_batch(text) == expected


@pytest.mark.parametrize("text", ["4:2:1", "0:1:2", "a:b:c", "1:2"])
def test_parse_batch_rejects(text):
    with pytest.raises(UsageError):
        B.parse_batch(text)


# ------------------------------------------------------------------------------------------ bad inputs

def _run_main(argv, capsys) -> tuple[int, str, str]:
    rc = B.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_missing_checkpoint_exits_2_with_one_line(checkpoints, tmp_path, capsys):
    rc, _, err = _run_main(["--generator", str(tmp_path / "nope.pth"), "--audio-encoder", str(checkpoints[1]),
                            "--out", str(tmp_path / "e")], capsys)
    assert rc == 2 and err.count("\n") == 1 and "nope.pth: checkpoint file not found" in err
    assert "Traceback" not in err


def test_cli_wrong_checkpoint_exits_2(checkpoints, tmp_path, capsys):
    # the audio encoder given as the generator: the key check names what is wrong
    rc, _, err = _run_main(["--generator", str(checkpoints[1]), "--audio-encoder", str(checkpoints[1]),
                            "--out", str(tmp_path / "e")], capsys)
    assert rc == 2 and err.count("\n") == 1 and "not a SyncTalk_2D generator (mode 'ave') checkpoint" in err
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a zip")
    rc, _, err = _run_main(["--generator", str(checkpoints[0]), "--audio-encoder", str(junk),
                            "--out", str(tmp_path / "e")], capsys)
    assert rc == 2 and "not a readable PyTorch state_dict" in err


def test_cli_unwritable_out_dir_exits_2(checkpoints, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    rc, _, err = _run_main(["--generator", str(checkpoints[0]), "--audio-encoder", str(checkpoints[1]),
                            "--out", str(blocker / "engines")], capsys)
    assert rc == 2 and err.count("\n") == 1 and "output folder is not writable" in err
    with pytest.raises(OutputError):   # the same error from the Python API
        B.build(*checkpoints, out=blocker / "engines", log=None)


def test_cli_usage_errors_exit_2(checkpoints, tmp_path, capsys):
    rc, _, err = _run_main(["--generator", str(checkpoints[0]), "--out", str(tmp_path)], capsys)
    assert rc == 2 and "--audio-encoder" in err
    rc, _, err = _run_main(["--generator", str(checkpoints[0]), "--audio-encoder", str(checkpoints[1]), "--batch", "4:2:1",
                            "--out", str(tmp_path)], capsys)
    assert rc == 2 and "MIN <= OPT <= MAX" in err


@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_cli_subprocess_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lipsync_trt.build", "--generator", str(tmp_path / "g.pth"),
                           "--audio-encoder", str(tmp_path / "a.pth"), "--out", str(tmp_path / "e")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'g.pth'}: checkpoint file not found"]


# ------------------------------------------------------------------------------------ TensorRT target

@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_tensorrt_target_checks_the_fp16_onnx_then_fails_clearly_without_tensorrt(checkpoints, tmp_path, capsys):
    from lipsync_trt.build import tensorrt as trt_build

    if trt_build.build_probe() is None:
        pytest.skip("TensorRT and a GPU are present: the build would run (covered by the -m gpu benchmarks)")
    rc, out, err = _run_main(["--generator", str(checkpoints[0]), "--audio-encoder", str(checkpoints[1]), "--target", "tensorrt",
                              "--precision", "fp16", "--batch", BATCH, "--out", str(tmp_path / "e"), "--quiet"], capsys)
    assert rc == 2 and err.count("\n") == 1
    assert "cannot build TensorRT engines here" in err and "generator.fp16.onnx" in err
    assert trt_build.build_probe() in err
    # the fp16 ONNX was exported and compared with PyTorch fp32 before the TensorRT step
    steps = [ln for ln in out.splitlines() if ln.startswith("[")]
    assert any("export fp16 generator ONNX" in ln for ln in steps)
    fp16_check = next(ln for ln in steps if "ONNX Runtime fp16 vs PyTorch fp32" in ln)
    diffs = [float(tok.rstrip(",")) for tok in fp16_check.split("max abs diff")[1].split() if "e-" in tok]
    assert diffs and max(diffs) <= B.TOLERANCE["fp16"]["generator"]
    # nothing half-built is left behind
    assert not [p for p in (tmp_path / "e").iterdir() if p.is_dir()]


# -------------------------------------------------------------------------------------- Core ML target

@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_coreml_packages_round_trip(models, tmp_path):
    """Convert both networks (fp16 compute, flexible batch 1..3), save, reload the spec, check names and shapes."""
    from lipsync_trt.build import coreml

    reason = coreml.convert_probe()
    if reason:
        pytest.skip(reason)
    gen_pkg, enc_pkg = coreml.convert(*models, tmp_path, precision="fp16", batch=(1, 2, 3))
    assert gen_pkg.name == "generator.mlpackage" and (gen_pkg / "Manifest.json").is_file()
    gen, enc = coreml.describe(gen_pkg), coreml.describe(enc_pkg)
    assert gen["type"] == enc["type"] == "mlProgram"
    assert list(gen["inputs"]) == ["images", "audio"] and gen["outputs"] == ["output"]
    assert gen["inputs"]["images"]["ranges"] == [(1, 3), (6, 6), (320, 320), (320, 320)]
    assert gen["inputs"]["audio"]["ranges"] == [(1, 3), (32, 32), (16, 16), (16, 16)]
    assert list(enc["inputs"]) == ["mel"] and enc["outputs"] == ["features"]
    assert enc["inputs"]["mel"]["ranges"] == [(1, 3), (1, 1), (80, 80), (16, 16)]
    assert gen["inputs"]["images"]["dtype"] == enc["inputs"]["mel"]["dtype"] == "FLOAT32"
