"""Bad input: exit code 2, one clear line naming the file and the problem, and no output file."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from lipsync_trt.__main__ import main


@pytest.fixture
def job(demo, tmp_path):
    """A working generate command line (demo avatar copy, demo checkpoints) whose parts the cases break."""
    import shutil

    avatar = shutil.copytree(demo["avatar"], tmp_path / "avatar")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = {"--avatar": avatar, "--audio": demo["audio"], "--generator": demo["generator"],
            "--audio-encoder": demo["audio_encoder"], "--out": out_dir / "x.mp4"}
    return args, out_dir, tmp_path


def run(args: dict, capsys) -> tuple[int, str]:
    argv = ["generate", "--backend", "torch", "--quiet"] + [str(x) for kv in args.items() for x in kv]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def write_wav(path, samples, rate=16000, subtype="FLOAT"):
    sf.write(path, samples, rate, subtype=subtype)
    return path


CASES = {
    "garbage wav": (lambda t: {"--audio": (t / "bad.wav").write_bytes(b"RIFF\x00\x00not a wave") and t / "bad.wav"},
                    r"bad\.wav: not a readable audio file"),
    "missing wav": (lambda t: {"--audio": t / "nope.wav"}, r"nope\.wav: audio file not found"),
    "empty wav": (lambda t: {"--audio": write_wav(t / "empty.wav", np.zeros(0, np.float32))}, r"empty\.wav: the audio is empty"),
    "short wav": (lambda t: {"--audio": write_wav(t / "short.wav", np.zeros(2000, np.float32))}, r"short\.wav: too short"),
    "nan wav": (lambda t: {"--audio": write_wav(t / "nan.wav", np.r_[np.zeros(8000), np.nan].astype(np.float32))},
                r"nan\.wav: 1 samples are NaN or infinite"),
    "huge samples wav": (lambda t: {"--audio": write_wav(t / "huge.wav", np.r_[np.zeros(8000), 3e38, -3e38].astype(np.float32))},
                         r"huge\.wav: 2 samples exceed \+-64"),
    "missing landmarks": (lambda t: (t / "avatar" / "landmarks" / "3.lms").unlink() or {},
                          r"3\.lms: missing landmarks for frame 3"),
    "malformed landmarks": (lambda t: (t / "avatar" / "landmarks" / "2.lms").write_text("1 2\n" * 50) and {},
                            r"2\.lms: expected 110 landmark lines"),
    "output folder missing": (lambda t: {"--out": t / "no" / "such" / "dir" / "x.mp4"}, r"output folder .* does not exist"),
    "output parent is a file": (lambda t: (t / "file").write_text("x") and {"--out": t / "file" / "x.mp4"},
                                r"does not exist|not a directory"),
    "bad frames": (lambda t: {"--frames": "0,9999"}, r"--frames: index 9999 is outside 0\.\.48"),
    "bad start frame": (lambda t: {"--start-frame": "7"}, r"start frame 7 leaves 1 template frame"),
    "bad compile mode": (lambda t: {"--compile": "bogus"}, r"cannot compile with mode 'bogus'.*reduce-overhead"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exit_2_one_line_no_output(job, capsys, case):
    args, out_dir, tmp = job
    make, pattern = CASES[case]
    args.update(make(tmp) or {})
    code, err = run(args, capsys)
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert __import__("re").search(pattern, err), err
    assert list(out_dir.iterdir()) == []


def test_wrong_checkpoint(job, capsys):
    args, out_dir, _ = job
    args["--generator"], args["--audio-encoder"] = args["--audio-encoder"], args["--generator"]
    code, err = run(args, capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert "demo_audio_encoder.pth: not a SyncTalk_2D generator (mode 'ave') checkpoint: missing key 'audio_model" in err
    assert list(out_dir.iterdir()) == []


@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_real_process_exit_code_and_no_traceback(job):
    args, out_dir, tmp = job
    args["--audio"] = write_wav(tmp / "short.wav", np.zeros(100, np.float32))
    r = subprocess.run([sys.executable, "-m", "lipsync_trt", "generate", "--quiet"] +
                       [str(x) for kv in args.items() for x in kv], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.strip().startswith("error: ")
    assert list(out_dir.iterdir()) == []


def test_missing_required_inputs_name_the_flags(capsys):
    assert main(["generate", "--audio", "x.wav"]) == 2
    assert "--avatar, --generator, --audio-encoder" in capsys.readouterr().err


class _Payload:
    """A pickle that runs code when unpickled (it would create `marker`)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def test_malicious_checkpoint_is_refused_in_one_line_without_running_it(job, capsys):
    import torch

    args, out_dir, tmp = job
    marker = tmp / "PWNED"
    torch.save({"inc.inconv.0.conv.0.weight": _Payload(marker)}, tmp / "evil.pth")
    args["--generator"] = tmp / "evil.pth"
    code, err = run(args, capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "evil.pth: not a plain state_dict" in err and "will not be unpickled" in err
    assert "weights_only" not in err      # no advice to load it unsafely
    assert not marker.exists() and list(out_dir.iterdir()) == []
