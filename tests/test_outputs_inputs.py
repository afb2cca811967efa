"""Outputs that are inputs (#20.2): an output that is, lies inside or contains an input of the same run is refused
before any work with one line and exit 2 (paths compared after resolving links and '..'), the input left as it was;
batch finds nesting and one job's output that is another's input up front, and every line is checked whole (NUL bytes,
deep nesting, a bad frames selection) before any job runs; a NUL byte in an API output path is an OutputError."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from lipsync_trt import api
from lipsync_trt.__main__ import main
from lipsync_trt.distributed.jobs import JobsError, load_jobs
from lipsync_trt.errors import OutputError


def one_line_error(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path -> sha256): what must not change."""
    return {str(p.relative_to(folder)): digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def run_copy(demo, tmp_path) -> dict:
    """Copies of the demo's avatar, audio and checkpoints, which the cases name as outputs."""
    d = {"avatar": Path(shutil.copytree(demo["avatar"], tmp_path / "avatar"))}
    for key, name in (("audio", "in.wav"), ("generator", "g.pth"), ("audio_encoder", "a.pth")):
        d[key] = Path(shutil.copy(demo[key], tmp_path / name))
    return d


def generate_argv(d: dict, *extra) -> list[str]:
    return ["generate", "--avatar", str(d["avatar"]), "--audio", str(d["audio"]), "--generator", str(d["generator"]),
            "--audio-encoder", str(d["audio_encoder"]), "--backend", "torch", "--quiet", *map(str, extra)]


def _cases(d: dict, tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (argv, what the error line must say)."""
    frames = d["avatar"] / "full_body_img"
    (tmp / "sub").mkdir(exist_ok=True)
    (tmp / "link_to_frames").symlink_to(frames)
    return {
        "generate --out is --audio": (generate_argv(d, "--out", d["audio"]), "is the input --audio"),
        "generate --out is --audio through '..'": (generate_argv(d, "--out", tmp / "sub" / ".." / "in.wav"),
                                                   "is the input --audio"),
        "features --out is --audio": (["features", "--audio", str(d["audio"]), "--out", str(d["audio"])],
                                      "is the input --audio"),
        "generate --out is a template JPEG": (generate_argv(d, "--out", frames / "0.jpg"),
                                              "lies inside the input --avatar"),
        "generate --out is the generator": (generate_argv(d, "--out", d["generator"]), "is the input --generator"),
        "generate --out is the audio encoder": (generate_argv(d, "--out", d["audio_encoder"]),
                                                "is the input --audio-encoder"),
        "--frames-dir inside full_body_img": (generate_argv(d, "--frames-dir", frames / "out"),
                                              "lies inside the input --avatar"),
        "--frames-dir inside full_body_img through a link": (generate_argv(d, "--frames-dir", tmp / "link_to_frames"),
                                                             "is the input --avatar"),
        "--frames-dir contains the avatar": (generate_argv(d, "--frames-dir", d["avatar"]),
                                             "contains the input --avatar"),
        "--out inside --frames-dir": (generate_argv(d, "--out", tmp / "fr" / "000001.png", "--frames-dir", tmp / "fr"),
                                      "lies inside the output --frames-dir"),
    }


CASES = ["generate --out is --audio", "generate --out is --audio through '..'", "features --out is --audio",
         "generate --out is a template JPEG", "generate --out is the generator", "generate --out is the audio encoder",
         "--frames-dir inside full_body_img", "--frames-dir inside full_body_img through a link",
         "--frames-dir contains the avatar", "--out inside --frames-dir"]


@pytest.mark.parametrize("case", CASES)
def test_output_that_is_an_input_is_refused_before_any_work(run_copy, tmp_path, capsys, case):
    argv, expected = _cases(run_copy, tmp_path)[case]
    before = tree(tmp_path)
    assert main(argv) == 2
    line = one_line_error(capsys.readouterr().err)
    assert expected in line, line
    assert tree(tmp_path) == before                      # every input as it was, nothing written
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["avatar", "in.wav", "g.pth", "a.pth", "sub",
                                                                 "link_to_frames"])


def _frames(folder: Path) -> Path:
    import cv2
    import numpy as np

    folder.mkdir()
    for i in range(2):
        assert cv2.imwrite(str(folder / f"{i:06d}.png"), np.full((32, 32, 3), 50 * i, np.uint8))
    return folder


@pytest.mark.parametrize("where", ["an MP4 input", "inside a folder input", "inside the avatar"])
def test_compare_json_naming_an_input_is_refused(demo, tmp_path, capsys, where):
    pytest.importorskip("skimage")
    import numpy as np

    from lipsync_trt.video import VideoWriter

    a, b = _frames(tmp_path / "a"), _frames(tmp_path / "b")
    argv = ["compare", str(a), str(b)]
    if where == "an MP4 input":
        for name in ("a.mp4", "b.mp4"):
            with VideoWriter(tmp_path / name, 32, 32) as w:
                w.write(np.zeros((32, 32, 3), np.uint8))
        argv = ["compare", str(tmp_path / "a.mp4"), str(tmp_path / "b.mp4"), "--json", str(tmp_path / "a.mp4")]
    elif where == "inside a folder input":
        argv += ["--json", str(b / "000001.png")]
    else:
        avatar = Path(shutil.copytree(demo["avatar"], tmp_path / "avatar"))
        argv += ["--avatar", str(avatar), "--json", str(avatar / "landmarks" / "r.json")]
    before = tree(tmp_path)
    assert main(argv) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "--json" in line and "the input" in line, line
    assert tree(tmp_path) == before


# ------------------------------------------------------------------------------------------------ the API

@pytest.fixture(scope="module")
def ls(demo):
    return api.load(demo["avatar"], demo["generator"], demo["audio_encoder"], backend="torch", device="cpu")


@pytest.mark.parametrize("where", ["out", "frames_dir"])
def test_api_path_with_a_nul_byte_is_an_output_error(ls, demo, tmp_path, where):
    bad = str(tmp_path / "a\0b")
    kwargs = {"out": bad + ".mp4"} if where == "out" else {"out": None, "frames_dir": bad}
    with pytest.raises(OutputError) as info:
        ls.generate(demo["audio"], **kwargs)
    assert "NUL" in str(info.value) and len(str(info.value).splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_api_output_that_is_its_audio_or_in_the_avatar_is_refused(ls, demo, tmp_path):
    wav = Path(shutil.copy(demo["audio"], tmp_path / "in.wav"))
    before = digest(wav)
    with pytest.raises(OutputError, match="is the input audio"):
        ls.generate(wav, out=wav)
    with pytest.raises(OutputError, match="lies inside the input avatar"):
        ls.generate(wav, out=None, frames_dir=Path(demo["avatar"]) / "full_body_img" / "x")
    assert digest(wav) == before and not (Path(demo["avatar"]) / "full_body_img" / "x").exists()


# ------------------------------------------------------------------------------------------------ batch

def _job(demo, **over) -> dict:
    return {"avatar": str(demo["avatar"]), "audio": str(demo["audio"]), "generator": str(demo["generator"]),
            "audio_encoder": str(demo["audio_encoder"]), **over}


def _write(tmp: Path, lines: list) -> Path:
    path = tmp / "jobs.jsonl"
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


BATCH = {
    "frames_dir of one job holds another's out": (
        lambda d, t: [_job(d, frames_dir="fr"), _job(d, out="fr/000001.png")], ":2: writes", "line 1"),
    "out of one job inside another's frames_dir (other order)": (
        lambda d, t: [_job(d, out="fr/000001.png"), _job(d, frames_dir="fr")], ":2: writes", "line 1"),
    "one job's output is another's audio": (
        lambda d, t: [_job(d, out="o.mp4"), _job(d, audio=str(t / "o.mp4"), out="p.mp4")], ":1: ", "line 2"),
    "an output in the avatar's landmarks": (
        lambda d, t: [_job(d, out=str(Path(d["avatar"]) / "landmarks" / "x.mp4"))], ":1: ", "avatar"),
    "an output that is the generator": (lambda d, t: [_job(d, out=str(d["generator"]))], ":1: ", "generator"),
    "a NUL in a path": (lambda d, t: [_job(d, out="o.mp4"), _job(d, out="p\u0000.mp4")], ":2: ", "NUL"),
    "100,000 nested arrays": (lambda d, t: [_job(d, out="o.mp4"), "[" * 100_000 + "]" * 100_000], ":2: ",
                              "nested too deeply"),
    "frames that are not a selection": (lambda d, t: [_job(d, out="o.mp4"), _job(d, out="p.mp4", frames="abc")],
                                        ":2: ", "'abc'"),
    "frames that run backwards": (lambda d, t: [_job(d, out="o.mp4"), _job(d, out="p.mp4", frames="9-3")],
                                  ":2: ", "backwards"),
}


@pytest.mark.parametrize("case", list(BATCH))
def test_batch_jobs_checked_whole_before_any_job_runs(demo, tmp_path, capsys, case):
    make, where, what = BATCH[case]
    path = _write(tmp_path, make(demo, tmp_path))
    with pytest.raises(JobsError) as info:
        load_jobs(path)
    text = str(info.value)
    assert len(text.splitlines()) == 1 and text.startswith(f"{path}{where}") and what in text, text
    assert main(["batch", str(path), "--backend", "torch", "--quiet"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert line == f"error: {text}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jobs.jsonl"]   # job 1 (a good one) did not run
