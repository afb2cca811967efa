"""bench/gpu-check.sh --dry-run: the GPU check's steps on this CPU with tiny sizes, so the script cannot rot
between GPU loans. One run serves every test here (90 s of CPU time; 280 s of wall time on a 2-core VM under
load average ~13); each test reads what the script left under $OUT, the folder the device tool brings back
(at most 8 files)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu-check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check_out")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)   # a hang guard, not a speed check
    return proc, out


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow   # runs bench/gpu-check.sh --dry-run (minutes)
def test_dry_run_passes_and_every_step_ran(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    steps = {s["step"]: s for s in _summary(out)["steps"]}
    for name in ("setup/imports", "setup/inputs", "info", "pytest-gpu", "bench", "e2e-device", "serve", "frames/cpu/fp32",
                 "frames/cpu/fp32/b2"):
        assert steps.get(name, {}).get("status") == "ok", (name, steps.get(name))
    # what needs CUDA is skipped with a line that says so, not left out silently
    assert steps["bench-compile"]["status"] == "skipped" and "CUDA" in steps["bench-compile"]["note"]
    assert steps["compare/cpu/fp32/b2"]["status"] == "ok", steps["compare/cpu/fp32/b2"]   # compare exists (#16)
    assert "== bench-compile: skipped: torch:reduce-overhead" in proc.stdout
    assert "targets:" in proc.stdout   # the summary table closes the output


@pytest.mark.slow   # runs bench/gpu-check.sh --dry-run (minutes)
def test_out_holds_what_the_device_tool_brings_back(dry_run):
    _, out = dry_run
    files = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert len(files) <= 8, files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files), files
    for name in ("gpu-check.log", "summary.json", "bench.json", "serve.json", "compare.json", "pytest.xml"):
        assert name in files, (name, files)
    assert not [f for f in files if f.endswith(".part")]
    assert "== summary" in (out / "gpu-check.log").read_text()


@pytest.mark.slow   # runs bench/gpu-check.sh --dry-run (minutes)
def test_pytest_step_selected_the_gpu_tests(dry_run):
    """On a CPU every gpu-marked test is collected and skipped (none deselected away, none run)."""
    _, out = dry_run
    cases = list(ET.parse(out / "pytest.xml").getroot().iter("testcase"))
    marked = [p.name for p in (REPO / "tests").glob("test_*.py") if re.search(r"pytest\.mark\.gpu\b", p.read_text())]
    assert {"test_gpu.py", "test_kernels.py"} <= set(marked)
    files = {c.get("classname").split(".")[-1] + ".py" for c in cases}
    assert set(marked) == files
    assert cases and all(c.find("skipped") is not None for c in cases)
    summary = _summary(out)["pytest"]
    assert summary["skipped"] == len(cases) and summary["passed"] == summary["failed"] == summary["error"] == 0


@pytest.mark.slow   # runs bench/gpu-check.sh --dry-run (minutes)
def test_bench_json(dry_run):
    _, out = dry_run
    report = json.loads((out / "bench.json").read_text())
    assert set(report["results"]) == {"baseline/cpu/fp32/b1", "torch/cpu/fp32/b1"}
    for key, res in report["results"].items():
        for metric in ("generator_fps", "e2e_memory_fps", "e2e_mp4_fps"):
            vals = res["samples"][metric]
            assert len(vals) == 1 and vals[0] > 0, (key, metric, vals)


@pytest.mark.slow   # runs bench/gpu-check.sh --dry-run (minutes)
def test_e2e_device_rows(dry_run):
    """The on-device end-to-end step: frames 0-1 of the demo clip, one warm-up and one timed pass."""
    _, out = dry_run
    e2e = _summary(out)["e2e_device"]
    [row] = e2e["results"]
    assert row["config"] == "torch/cpu/fp32/b1" and row["frames"] == 2
    assert len(row["fps"]) == 1 and row["fps"][0] > 0
    stages = row["stages"][0]
    assert stages["frames"] == 2 and {"audio", "prepare", "model", "paste"} <= set(stages)
    assert all(stages[k] <= stages["seconds"] for k in ("audio", "prepare", "model", "paste"))


@pytest.mark.slow   # runs bench/gpu-check.sh --dry-run (minutes)
def test_serve_json(dry_run):
    _, out = dry_run
    report = json.loads((out / "serve.json").read_text())
    [run] = report["results"]
    assert run["k"] == 2
    f = run["frames"]
    # every frame of both streams answered (made, or refused under this CPU's load), every stream ended
    assert f["missing"] == 0 and f["no_end"] == 0, f
    answered = f["made"] + f["reused"] + f["overloaded"] + f["internal"] + f["other"]
    assert answered == run["frames_expected"] > 0
    assert f["made"] > 0


@pytest.mark.slow   # runs bench/gpu-check.sh --dry-run (minutes)
def test_compare_json_and_summary(dry_run):
    _, out = dry_run
    comp = json.loads((out / "compare.json").read_text())
    assert comp["available"] is True and comp["frames"] == "0-1"
    result = comp["results"].get("cpu/fp32/b2")
    assert isinstance(result, dict) and result, comp
    s = _summary(out)
    assert s["mode"] == "dry-run" and s["data"] == "demo"
    assert [t["target"][:12] for t in s["targets"]] == ["generator fp", "audio -> com", ">= 150 concu"]
    assert all(t["met"] is None for t in s["targets"])   # no verdict from a CPU dry run


def test_bad_option_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), "--bogus"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OUT": str(tmp_path)})
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--bogus" in proc.stderr
