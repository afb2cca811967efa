"""The benchmark harness: `--demo --quick` end to end in a subprocess (what CI runs), plus its pure helpers."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import numpy as np

from lipsync_trt.bench import reference
from lipsync_trt.backends import Availability
from lipsync_trt.bench.cli import parse_args
from lipsync_trt.bench.configs import backend_names, configurations, runner_options
from lipsync_trt.bench.inputs import frames_for_samples
from lipsync_trt.bench.measure import summarize
from lipsync_trt.bench.report import check_report, compare
from lipsync_trt.errors import UsageError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lipsync_trt.bench", "--demo", "--quick", "--devices", "cpu",
                           "--json", str(out / "quick.json"), "--plot", str(out / "quick.png"), "--no-progress"],
                          capture_output=True, text=True, timeout=900, cwd=out)
    return proc, out, time.perf_counter() - t0


@pytest.mark.slow   # the --demo --quick benchmark in a subprocess
def test_demo_quick_completes_with_complete_json(quick_run):
    proc, out, seconds = quick_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "quick.json").read_text())
    assert check_report(report) == [], check_report(report)
    keys = set(report["results"])
    assert "baseline/cpu/fp32/b1" in keys
    assert "torch/cpu/fp32/b1" in keys, (keys, report["skipped"])
    for key, res in report["results"].items():
        assert res["summary"]["e2e_memory_fps"]["median"] > 0
        assert len(res["samples"]["e2e_memory_fps"]) == report["config"]["repeat"]
        if not key.startswith("baseline"):
            assert res["speedup_vs_baseline"]["e2e_memory_fps"] > 0
            assert "e2e_memory" in res["pipeline_overhead"]
            assert 0 < res["fraction_of_peak"]
    m = report["machine"]
    assert m["cpu_model"] and m["usable_cpus"] >= 1 and m["libraries"]["torch"]
    assert report["flops"]["generator_per_frame"] > 1e9 and report["flops"]["audio_encoder_per_window"] > 1e6
    assert report["peak_gflops"]["cpu"]["fp32"] > 0
    assert report["targets"] and report["inputs"]["seeded_weights"]
    print(f"bench --demo --quick: {seconds:.1f} s wall ({report['total_seconds']:.1f} s inside)")


@pytest.mark.slow   # the --demo --quick benchmark in a subprocess
def test_demo_quick_prints_table_and_writes_plot(quick_run):
    proc, out, _ = quick_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "baseline/cpu/fp32/b1" in proc.stdout and "e2e mem f/s" in proc.stdout
    pytest.importorskip("matplotlib")
    png = out / "quick.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow   # the --demo --quick benchmark in a subprocess
def test_compare_against_itself(quick_run):
    proc, out, _ = quick_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "quick.json").read_text())
    text, rows = compare(report, report)
    assert rows and all(abs(r["improvement"]) < 1e-9 for r in rows)
    assert "+0.0%" in text


@pytest.mark.parametrize("argv, prog", [
    ([], "python -m lipsync_trt.bench [offline]"),
    (["offline"], "python -m lipsync_trt.bench [offline]"),
    (["serve"], "python -m lipsync_trt.bench serve"),
    (["distributed", "batch"], "python -m lipsync_trt.bench distributed batch"),
    (["distributed", "serve"], "python -m lipsync_trt.bench distributed serve"),
    (["template-cache"], "python -m lipsync_trt.bench template-cache"),
    (["live"], "python -m lipsync_trt.bench live"),
    (["webrtc"], "python -m lipsync_trt.bench webrtc"),
    (["pipecat"], "python -m lipsync_trt.bench pipecat"),
])
def test_one_entry_point_runs_every_benchmark(argv, prog, capsys):
    """python -m lipsync_trt.bench NAME runs that benchmark (its own --help), the offline one without a NAME; the
    default help lists every benchmark of the package."""
    from lipsync_trt.bench import commands

    with pytest.raises(SystemExit) as exc:
        commands.main([*argv, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {prog} ")
    if not argv:
        listed = out[out.index("benchmarks:"):]
        for name in ("offline", "serve", "distributed", "template-cache", "live", "webrtc", "pipecat"):
            assert f"\n  {name} " in listed, (name, listed)


def test_frames_for_samples_matches_the_reference():
    """The reference's own loop as the oracle: its centred STFT gives 1 + n // 200 mel frames, its AudioDataset one
    window per idx, and the padding one row more at each end."""
    for n in (3000, 3199, 3200, 12345, 718147):
        t = 1 + n // 200
        assert frames_for_samples(n) == len(reference.mel_windows(np.zeros((t, 80), np.float32))) + 2
    assert frames_for_samples(2999) == 0


def test_summarize_and_check_report():
    s = summarize([3.0, 1.0, 2.0])
    assert s["median"] == 2.0 and s["min"] == 1.0 and s["max"] == 3.0 and s["n"] == 3
    assert summarize([])["n"] == 0
    problems = check_report({"results": {"x": {"samples": {"e2e_memory_fps": [0.0]}}}})
    assert any("missing machine" in p for p in problems)
    assert any("non-positive e2e_memory_fps" in p for p in problems)
    assert any("no samples of generator_fps" in p for p in problems)


def test_quick_defaults():
    args = parse_args(["--demo", "--quick"])
    assert (args.frames, args.repeat, args.warmup) == (1, 2, 0)
    args = parse_args(["--demo"])
    assert (args.frames, args.repeat, args.warmup) == (32, 3, 1)
    with pytest.raises(UsageError, match=r"--frames must be within 1\.\.1000000"):   # (cli_args.BOUNDS)
        parse_args(["--demo", "--frames", "0"])


def test_reference_imports_nothing_of_the_package():
    """The baseline is also the tests' oracle: it may use the reference's tools, never lipsync_trt's own code."""
    allowed = {"__future__", "time", "collections", "pathlib", "cv2", "numpy", "torch", "librosa"}
    for node in ast.walk(ast.parse(Path(reference.__file__).read_text())):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and node.module.split(".")[0] in allowed, ast.unparse(node)
        elif isinstance(node, ast.Import):
            assert all(a.name.split(".")[0] in allowed for a in node.names), ast.unparse(node)


def test_reference_steps_follow_the_recipe_text():
    # RECIPE §4: 1, 2, ..., count-1, count-2, ..., 0, 1, ...
    assert reference.frame_order(4, 9) == [1, 2, 3, 2, 1, 0, 1, 2, 3]
    # RECIPE §3: rows [i-8, i+8) of the padded features, zeros outside
    padded = np.arange(10 * 512, dtype=np.float32).reshape(10, 512) + 1
    w = reference.feature_window(padded, 2).reshape(16, 512)
    assert not w[:6].any() and np.array_equal(w[6:], padded[:10])
    # RECIPE §5: xmin = lm[1].x, ymin = lm[52].y, xmax = lm[31].x, ymax = ymin + width
    lms = np.zeros((110, 2), np.int32)
    lms[1, 0], lms[52, 1], lms[31, 0] = 10, 20, 50
    assert reference.face_box(lms) == (10, 20, 50, 60)


def test_configurations_from_the_options():
    avail = {"torch": Availability("torch", True, ""), "tensorrt": Availability("tensorrt", False, "no CUDA")}
    assert backend_names(None, avail) == ["torch"]
    assert backend_names("torch:reduce-overhead,tensorrt", avail) == ["torch:reduce-overhead", "tensorrt"]
    for bad in ("tflite", "tensorrt:spin", "torch,onnxruntime"):
        with pytest.raises(SystemExit):
            backend_names(bad, avail)
    assert runner_options("torch:max-autotune", None) == ("torch", {"compile": "max-autotune"})
    assert runner_options("onnxruntime:spin", "eng") == ("onnxruntime", {"engines": "eng", "spinning": True})
    args = parse_args(["--demo", "--batch-sizes", "1,4", "--precisions", "fp32,fp16"])
    configs, skipped = configurations(args, ["torch", "tensorrt"], avail, [torch.device("cpu")])
    assert [c.key for c in configs] == ["baseline/cpu/fp32/b1", "torch/cpu/fp32/b1", "torch/cpu/fp32/b4",
                                        "torch/cpu/fp16/b1", "torch/cpu/fp16/b4"]
    assert skipped == [{"backend": "tensorrt", "device": "cpu", "reason": "no CUDA"}]
    quick, _ = configurations(parse_args(["--demo", "--quick"]), ["torch"], avail, [torch.device("cpu")])
    assert [c.key for c in quick] == ["baseline/cpu/fp32/b1", "torch/cpu/fp32/b1"]

