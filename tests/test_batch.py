"""`batch` (issue #15): JOBS.jsonl checking, and many demo clips rendered here and on local Ray worker actors.

The oracle is single-process `LipSync.generate` on the same inputs: every PNG frame a batch writes must be
pixel-identical to it (ONNX Runtime gives the same bits for any thread count, so a 1-thread Ray worker and a
2-thread reference agree exactly; eager torch is compared with the reference at 1 thread, as the workers run).
The Ray tests start a local Ray instance with 2 CPUs and kill a worker process (SIGKILL, as the OOM killer
does) in the middle of a job; they skip with the reason when Ray is not installed."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from lipsync_trt import api, backends  # noqa: E402
from lipsync_trt.__main__ import main  # noqa: E402
from lipsync_trt.demo import make_speech, write_wav  # noqa: E402
from lipsync_trt.distributed import INSTALL_HINT, ray_missing_reason  # noqa: E402
from lipsync_trt.distributed.jobs import JobsError, load_jobs  # noqa: E402

BACKEND = "onnxruntime" if backends.available()["onnxruntime"].usable else "torch"
SECONDS = {"short": 0.5, "long": 1.2}   # the long clip is the one whose worker gets killed mid-job


# ------------------------------------------------------------------------------------------------ inputs

def job_line(demo, tmp: Path, name: str, **extra) -> dict:
    return {"avatar": str(demo["avatar"]), "audio": str(tmp / f"{name}.wav"), "generator": str(demo["generator"]),
            "audio_encoder": str(demo["audio_encoder"]), "out": f"out/{name}.mp4", "frames_dir": f"out/{name}",
            **extra}


@pytest.fixture(scope="module")
def clips(tmp_path_factory, demo):
    """Three good demo jobs (different speech), one with an unreadable WAV, one with a missing avatar."""
    tmp = tmp_path_factory.mktemp("batch_inputs")
    for seed, (name, length) in enumerate((("a", "long"), ("b", "short"), ("c", "short"))):
        write_wav(tmp / f"{name}.wav", make_speech(SECONDS[length], seed=seed + 11))
    (tmp / "broken.wav").write_text("this is not audio\n")
    lines = [job_line(demo, tmp, "a"), job_line(demo, tmp, "b"), job_line(demo, tmp, "c", crf=18),
             job_line(demo, tmp, "broken"), {**job_line(demo, tmp, "lost"), "avatar": str(tmp / "no_such_avatar")}]
    return {"dir": tmp, "lines": lines, "good": ["a", "b", "c"], "bad": {"broken": 4, "lost": 5}}


def write_jobs(folder: Path, lines: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "out").mkdir(exist_ok=True)
    path = folder / "jobs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, demo, clips):
    """{name: folder of PNG frames} from single-process generate (at 1 thread for torch, as a Ray worker runs)."""
    import torch

    out = tmp_path_factory.mktemp("batch_reference")
    threads = torch.get_num_threads()
    if BACKEND == "torch":
        torch.set_num_threads(1)
    try:
        ls = api.load(demo["avatar"], demo["generator"], demo["audio_encoder"], backend=BACKEND, device="cpu")
        for name in clips["good"]:
            ls.generate(clips["dir"] / f"{name}.wav", None, frames_dir=out / name)
    finally:
        torch.set_num_threads(threads)
    return out


def assert_same_frames(got: Path, ref: Path) -> None:
    names = sorted(p.name for p in ref.glob("*.png"))
    assert names, f"no reference frames in {ref}"
    assert sorted(p.name for p in got.glob("*.png")) == names, f"{got}: not the reference's frame files"
    for name in names:
        a, b = cv2.imread(str(got / name), cv2.IMREAD_UNCHANGED), cv2.imread(str(ref / name), cv2.IMREAD_UNCHANGED)
        assert a is not None and np.array_equal(a, b), f"{got / name} differs from single-process generate"


def decoded_frames(path: Path) -> int:
    import av

    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


def check_outputs(folder: Path, clips, reference) -> None:
    for name in clips["good"]:
        assert_same_frames(folder / "out" / name, reference / name)
        assert decoded_frames(folder / "out" / f"{name}.mp4") == len(list((reference / name).glob("*.png")))
    for name in clips["bad"]:
        assert not (folder / "out" / f"{name}.mp4").exists() and not (folder / "out" / name).exists()
    leftovers = [p.name for p in (folder / "out").iterdir() if p.name.startswith(".")]
    assert leftovers == [], f"temporary files left behind: {leftovers}"


def check_summary(summary: dict, clips) -> None:
    by_line = {j["line"]: j for j in summary["jobs"]}
    for n, name in enumerate(clips["good"], start=1):
        assert by_line[n]["status"] == "done", by_line[n]
        assert by_line[n]["frames"] == len(list((Path(by_line[n]["frames_dir"])).glob("*.png")))
    assert "not a readable audio file" in by_line[clips["bad"]["broken"]]["error"]
    assert "no_such_avatar" in by_line[clips["bad"]["lost"]]["error"]
    assert {by_line[n]["status"] for n in clips["bad"].values()} == {"failed"}
    assert summary["totals"]["done"] == 3 and summary["totals"]["failed"] == 2


# ------------------------------------------------------------------------------------------------ JOBS.jsonl

@pytest.mark.parametrize("text, expected", [
    ('{"avatar": "a", "audio": "x.wav", "generator": "g.pth", "audio_encoder": "e.pth", "out": "o.mp4"}\n'
     '{"avatar": "a", "audio": "y.wav"\n', ":2: not valid JSON"),
    ('{"avatar": "a", "audio": "x.wav", "generator": "g.pth", "out": "o.mp4"}\n', ":1: missing audio_encoder"),
    ('{"avatar": "a", "audio": "x.wav", "generator": "g.pth", "audio_encoder": "e.pth"}\n', ":1: nothing to write"),
    ('{"avatar": "a", "audio": "x.wav", "generator": "g.pth", "audio_encoder": "e.pth", "out": "o.mp4", '
     '"crf": 99}\n', ":1: crf must be an integer 0..51"),
    ('{"avatar": "a", "audio": "x.wav", "generator": "g.pth", "audio_encoder": "e.pth", "out": "o.mp4", '
     '"fps": 30}\n', ":1: unknown field(s) 'fps'"),
    ('\n{"avatar": "a", "audio": "x.wav", "generator": "g.pth", "audio_encoder": "e.pth", "out": "o.mp4"}\n'
     '{"avatar": "b", "audio": "y.wav", "generator": "g.pth", "audio_encoder": "e.pth", "out": "o.mp4"}\n',
     ":3: writes"),
    ('["a", "x.wav"]\n', ":1: expected a JSON object"),
])
def test_bad_jobs_line_named_before_anything_runs(tmp_path, capsys, text, expected):
    path = tmp_path / "jobs.jsonl"
    path.write_text(text)
    with pytest.raises(JobsError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_jobs(path)
    assert main(["batch", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and expected in err
    assert not (tmp_path / "o.mp4").exists()


def test_relative_paths_are_relative_to_the_jobs_file(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "jobs.jsonl"
    path.write_text('{"avatar": "av", "audio": "../x.wav", "generator": "g.pth", "audio_encoder": "e.pth", '
                    '"frames_dir": "f", "frames": [0, 2, 3]}\n')
    (job,) = load_jobs(path)
    assert job.avatar == str(tmp_path / "sub" / "av") and job.audio == str(tmp_path / "x.wav")
    assert job.frames_dir == str(tmp_path / "sub" / "f") and job.frames == "0,2,3"


def test_ray_options_without_ray_flag_are_usage_errors(tmp_path, capsys):
    path = tmp_path / "jobs.jsonl"
    path.write_text('{"avatar": "a", "audio": "x.wav", "generator": "g.pth", "audio_encoder": "e.pth", "out": "o.mp4"}\n')
    assert main(["batch", str(path), "--workers", "2"]) == 2
    assert "--workers needs --ray" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["batch", "serve"])
def test_without_ray_installed_the_message_names_the_extra(tmp_path, command):
    """A real interpreter in which `import ray` fails (sys.modules['ray'] = None), as on a machine without it:
    `batch --ray` and `serve --ray` exit 2 with one line naming the extra to install."""
    path = tmp_path / "jobs.jsonl"
    path.write_text('{"avatar": "a", "audio": "x.wav", "generator": "g.pth", "audio_encoder": "e.pth", "out": "o.mp4"}\n')
    argv = {"batch": ["batch", str(path), "--ray", "local", "--quiet"],
            "serve": ["serve", "--avatar", "a=av", "--generator", "g.pth", "--audio-encoder", "e.pth", "--ray", "local",
                      "--port", "8090"]}[command]
    code = ("import sys; sys.modules['ray'] = None\n"
            "from lipsync_trt.__main__ import main\n"
            f"sys.exit(main({argv!r}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and INSTALL_HINT in lines[0] and f"{command} --ray" in lines[0], proc.stderr


# ------------------------------------------------------------------------------------------------ in-process

@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_batch_here_matches_generate_reports_failures_and_resumes(tmp_path, clips, reference, capsys):
    jobs = write_jobs(tmp_path, clips["lines"])
    summary_path = tmp_path / "summary.json"
    assert main(["batch", str(jobs), "--backend", BACKEND, "--device", "cpu", "--summary", str(summary_path),
                 "--quiet"]) == 1
    check_outputs(tmp_path, clips, reference)
    summary = json.loads(summary_path.read_text())
    check_summary(summary, clips)
    assert summary["mode"] == "local"

    stamps = {name: (tmp_path / "out" / f"{name}.mp4").stat().st_mtime_ns for name in clips["good"]}
    assert main(["batch", str(jobs), "--backend", BACKEND, "--device", "cpu", "--summary", str(summary_path),
                 "--quiet"]) == 1
    again = json.loads(summary_path.read_text())
    assert [j["status"] for j in again["jobs"][:3]] == ["skipped"] * 3
    assert {name: (tmp_path / "out" / f"{name}.mp4").stat().st_mtime_ns for name in clips["good"]} == stamps
    capsys.readouterr()


@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_incomplete_output_is_rendered_again(tmp_path, clips, reference):
    """A frames folder missing one PNG, or an MP4 that is not a whole video, is not 'complete': the job reruns."""
    good = clips["lines"][1:3]
    jobs = write_jobs(tmp_path, good)
    assert main(["batch", str(jobs), "--backend", BACKEND, "--device", "cpu", "--quiet"]) == 0
    (tmp_path / "out" / "b" / "000003.png").unlink()
    (tmp_path / "out" / "c.mp4").write_bytes((tmp_path / "out" / "c.mp4").read_bytes()[:2000])
    summary = tmp_path / "s.json"
    assert main(["batch", str(jobs), "--backend", BACKEND, "--device", "cpu", "--quiet", "--summary",
                 str(summary)]) == 0
    assert [j["status"] for j in json.loads(summary.read_text())["jobs"]] == ["done", "done"]
    for name in ("b", "c"):
        assert_same_frames(tmp_path / "out" / name, reference / name)
    assert decoded_frames(tmp_path / "out" / "c.mp4") == len(list((reference / "c").glob("*.png")))


# ------------------------------------------------------------------------------------------------ Ray

@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    reason = ray_missing_reason()
    if reason:
        pytest.skip(reason)
    import ray

    cache = tmp_path_factory.mktemp("ray_onnx_cache")
    saved = os.environ.get("LIPSYNC_TRT_CACHE")
    os.environ["LIPSYNC_TRT_CACHE"] = str(cache)   # the workers (started by this process) inherit it
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    if saved is None:
        os.environ.pop("LIPSYNC_TRT_CACHE", None)
    else:
        os.environ["LIPSYNC_TRT_CACHE"] = saved


class Killer:
    """When job `name` starts on a worker, waits for its first PNG frame and SIGKILLs that worker process."""

    def __init__(self, name: str):
        self.name, self.killed_pid, self.thread = name, None, None

    def __call__(self, kind: str, job, info) -> None:
        if kind == "start" and Path(job.frames_dir).name == self.name and self.killed_pid is None:
            self.killed_pid = info["pid"]
            self.thread = threading.Thread(target=self._kill, args=(Path(job.frames_dir), info["pid"]), daemon=True)
            self.thread.start()

    def _kill(self, frames_dir: Path, pid: int) -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if list(frames_dir.parent.glob(f".{frames_dir.name}.*.part/*.png")) or list(frames_dir.glob("*.png")):
                os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.02)


@pytest.fixture(scope="module")
def ray_batch(ray_local, tmp_path_factory, clips):
    """One batch on 2 local Ray workers, whose worker rendering job 'a' is killed after its first frame."""
    from lipsync_trt.distributed import batch

    folder = tmp_path_factory.mktemp("ray_batch")
    jobs = load_jobs(write_jobs(folder, clips["lines"]))
    killer = Killer("a")
    report = batch.run_ray(jobs, workers=2, on_event=killer, backend=BACKEND, device="cpu")
    killer.thread.join(timeout=5)
    return {"folder": folder, "jobs": jobs, "report": report, "killed": killer.killed_pid}


@pytest.mark.slow   # a local Ray instance, two workers
def test_ray_batch_matches_single_process_generate(ray_batch, clips, reference):
    check_outputs(ray_batch["folder"], clips, reference)
    summary = ray_batch["report"].summary()
    check_summary(summary, clips)
    assert summary["mode"] == "ray" and summary["workers"] == 2


@pytest.mark.slow   # a local Ray instance, two workers
def test_ray_worker_killed_mid_job_is_restarted_and_its_job_retried(ray_batch, clips, reference):
    killed = ray_batch["killed"]
    assert killed is not None, "job 'a' never started"
    with pytest.raises(ProcessLookupError):
        os.kill(killed, 0)   # the process really is gone
    a = ray_batch["report"].results[1]
    assert a.status == "done" and not a.worker.startswith(f"{killed}@"), a
    assert_same_frames(ray_batch["folder"] / "out" / "a", reference / "a")


@pytest.mark.slow   # a local Ray instance, two workers
def test_ray_batch_rerun_skips_finished_jobs(ray_batch, clips, capsys):
    """The same batch again through the command line (`batch --ray local`, joining the running instance): the
    three finished jobs are skipped untouched, the two bad ones fail again, exit code 1."""
    folder = ray_batch["folder"]
    stamps = {name: (folder / "out" / f"{name}.mp4").stat().st_mtime_ns for name in clips["good"]}
    summary_path = folder / "rerun.json"
    assert main(["batch", str(folder / "jobs.jsonl"), "--ray", "local", "--workers", "2", "--backend", BACKEND,
                 "--device", "cpu", "--summary", str(summary_path), "--quiet"]) == 1
    summary = json.loads(summary_path.read_text())
    assert [j["status"] for j in summary["jobs"]] == ["skipped"] * 3 + ["failed"] * 2
    assert summary["mode"] == "ray" and summary["totals"]["skipped"] == 3
    assert {name: (folder / "out" / f"{name}.mp4").stat().st_mtime_ns for name in clips["good"]} == stamps
    assert "3 skipped" in capsys.readouterr().out


def test_unreachable_ray_address_fails_fast_in_one_line(demo, tmp_path, capsys):
    import json
    import socket

    from lipsync_trt.__main__ import main

    with socket.socket() as s:             # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"avatar": str(demo["avatar"]), "audio": str(demo["audio"]),
                                "generator": str(demo["generator"]), "audio_encoder": str(demo["audio_encoder"]),
                                "out": str(tmp_path / "a.mp4")}) + "\n")
    assert main(["batch", str(jobs), "--ray", f"127.0.0.1:{port}", "--quiet"]) == 2
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("error")]
    assert len(err) == 1 and f"nothing answers at 127.0.0.1:{port}" in err[0]
    assert not (tmp_path / "a.mp4").exists()
