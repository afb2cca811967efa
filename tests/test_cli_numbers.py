"""Numbers that are not bounded (#20 §5): every numeric option of every command is checked right after parsing,
before anything loads (inf, nan, negative, absurd -> exit 2, one line naming the option and its range); and a model
worker (batcher) whose thread dies for any reason ends its streams with an error answer, never a silent hang.

The option list is read from the parsers themselves (every int/float option of generate, features, serve, batch,
compare, build and each benchmark), so an option added later without a bound fails here."""
from __future__ import annotations

import importlib
import subprocess
import sys
import threading
import time

import pytest

from lipsync_trt import api
from lipsync_trt import avatar as AV
from lipsync_trt import cli_args
from lipsync_trt.__main__ import build_parser
from lipsync_trt.errors import StreamError


def _parsers() -> dict[str, object]:
    """command -> its parser: the top level's subcommands, build, and each benchmark's (built as its main does)."""
    import argparse

    out = {}
    top = build_parser()
    for action in top._actions:
        if isinstance(action, argparse._SubParsersAction):
            out.update(action.choices)
    from lipsync_trt.build.cli import build_parser as build_build
    out["build"] = build_build()
    return out


def _numeric(parser) -> list[tuple[str, type]]:
    return [(max(a.option_strings, key=len), a.type) for a in parser._actions
            if a.type in (int, float) and a.option_strings]


OPTIONS = sorted({(cmd, name, kind) for cmd, p in _parsers().items() for name, kind in _numeric(p)})


def test_every_numeric_option_has_a_bound():
    missing = sorted({name for _, name, _ in OPTIONS if name not in cli_args.BOUNDS})
    assert missing == [] and len(OPTIONS) > 20


def test_every_benchmark_option_has_a_bound():
    """The benchmarks build their parsers inside main(): read their add_argument calls from the source."""
    import ast
    from pathlib import Path

    import lipsync_trt.bench as bench

    missing = []
    for path in Path(bench.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument" and node.args
                    and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("--")
                    and any(k.arg == "type" and getattr(k.value, "id", None) in ("int", "float")
                            for k in node.keywords)
                    and node.args[0].value not in cli_args.BOUNDS):
                missing.append(f"{path.name}: {node.args[0].value}")
        text = path.read_text()
        if ("type=int" in text or "type=float" in text) and "ArgumentParser(" in text:   # its parser must check them
            missing.append(f"{path.name}: argparse.ArgumentParser instead of cli_args.Parser")
    assert missing == []


def _run(cmd: str, name: str, value: str) -> int:
    """The command in this process (as `python -m` runs it: inside errors.run_command); its exit code."""
    from lipsync_trt.__main__ import main
    from lipsync_trt.build.cli import main as build_main

    positional = {"compare": ["a", "b"], "batch": ["jobs.jsonl"]}.get(cmd, [])
    argv = positional + [f"{name}={value}"]   # (NAME=VALUE: '-inf' would read as an option)
    try:
        return build_main(argv) if cmd == "build" else main([cmd, *argv])
    except SystemExit as exc:                 # argparse's own errors ('invalid int value')
        return exc.code


BAD = {int: ["-1", "99999999999", "inf", "nan", "1.5"], float: ["inf", "nan", "-inf", "1e300", "-1e300"]}


@pytest.mark.parametrize("cmd, name, kind", OPTIONS)
def test_a_bad_number_is_one_line_and_exit_2_before_anything_loads(cmd, name, kind, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    lo, hi, _ = cli_args.BOUNDS[name]
    for value in BAD[kind]:
        if kind is float and value.lstrip("-").replace("e", "").isdigit() and lo <= float(value) <= hi:
            continue
        rc = _run(cmd, name, value)
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and name in lines[0], (value, err)
        assert list(tmp_path.iterdir()) == []
        if "invalid" not in lines[0]:    # (argparse's own 'invalid int value' for 'inf' into an int option)
            assert f"within {cli_args._num(lo)}..{cli_args._num(hi)}" in lines[0], lines[0]


def test_the_check_runs_before_anything_is_made_or_loaded(tmp_path):
    """serve --demo makes its avatar and checkpoints in TMPDIR and loads them; a bad number stops it before that."""
    import os

    env = dict(os.environ, TMPDIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "lipsync_trt", "serve", "--demo", "--max-wait-ms", "inf"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2
    assert r.stderr == "error: --max-wait-ms must be within 0..10000 (ms), got inf\n"
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ the worker dies

class WorkerKilled(BaseException):
    """Not an Exception: what a runtime's fatal error or an interpreter-level exit looks like to the worker."""


class DyingRunner:
    """The real runner whose generator raises `error` from its `after`-th call on (a real failure in the worker)."""

    def __init__(self, runner, error: BaseException, after: int = 1):
        self._runner, self.error, self.after, self.calls = runner, error, after, 0

    def __getattr__(self, name):
        return getattr(self._runner, name)

    def generate(self, images, audio):
        self.calls += 1
        if self.calls >= self.after:
            raise self.error
        return self._runner.generate(images, audio)


@pytest.fixture(scope="module")
def runner(checkpoints):
    from lipsync_trt import backends

    return backends.load("torch", *checkpoints, device="cpu")


def _within(fn, seconds: float = 120):
    """fn() in a thread; its result or exception, or a failure if it is still waiting after `seconds`."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:   # noqa: BLE001 (the test inspects it)
            box["error"] = exc
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still waiting after {seconds} s: a silent hang"
    return box


@pytest.mark.parametrize("error", [WorkerKilled("runtime aborted"), OverflowError("timestamp out of range"),
                                   SystemExit(3)], ids=["BaseException", "OverflowError", "SystemExit"])
def test_a_stream_whose_worker_dies_gets_an_error_not_a_hang(runner, demo, error):
    from lipsync_trt.demo import make_speech

    ls = api.LipSync(AV.load(demo["avatar"]), DyingRunner(runner, error, after=2), batch_size=2)
    speech = make_speech(1.0, 16000)
    with ls.stream(rate=16000) as s:
        got = _within(lambda: (s.push(speech), s.close()))
    if isinstance(error, Exception):   # an Exception is answered per frame (ERROR) or, escaping, kills the worker
        assert "error" in got or "value" in got
    else:
        assert isinstance(got.get("error"), StreamError), got
        assert "model worker died" in str(got["error"]) and type(error).__name__ in str(got["error"])
        dead = s.core.batcher
        assert not dead.alive
        with pytest.raises(StreamError, match="model worker died"):   # later work on it is refused at once
            with ls.stream(rate=16000, batcher=dead) as s2:
                s2.push(speech)
        assert ls.batcher is not dead and ls.batcher.alive           # the LipSync's new streams get a new worker
    ls.close()


def test_a_live_stream_whose_worker_dies_gets_an_error_not_a_hang(runner, demo):
    from lipsync_trt.demo import make_speech

    ls = api.LipSync(AV.load(demo["avatar"]), DyingRunner(runner, WorkerKilled("boom"), after=1), batch_size=2)
    with ls.live(rate=16000) as live:
        live.push(make_speech(1.0, 16000))
        got = _within(lambda: [live.next() for _ in range(40)])
    assert isinstance(got.get("error"), StreamError) and "model worker died" in str(got["error"]), got
    ls.close()


def test_a_batcher_refuses_an_infinite_wait():
    """serve --max-wait-ms inf used to reach Condition.wait(inf) and kill the worker (OverflowError); the option is
    bounded, and the batcher itself refuses a wait that is not finite (and waits at most 1 s at a time)."""
    from lipsync_trt.batcher import Batcher

    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="finite"):
            Batcher(None, max_wait=bad)


@pytest.mark.slow   # an in-process server; the client waits out its own 20 s timeout (no END follows the error)
def test_server_streams_get_an_error_answer_when_the_worker_dies(runner, demo):
    """Through the server: a stream whose batcher dies gets an INTERNAL answer naming the cause (no silent wait)."""
    pytest.importorskip("aiohttp")
    import asyncio

    from lipsync_trt.demo import make_speech
    from lipsync_trt.serve import client as C
    from lipsync_trt.serve import protocol as P
    from lipsync_trt.serve.config import ModelEntry, ServeConfig
    from lipsync_trt.serve.server import ServerThread

    cfg = ServeConfig(avatars={"demo": str(demo["avatar"])}, generators={None: str(demo["generator"])},
                      audio_encoder=str(demo["audio_encoder"]), backend="torch", device="cpu", port=0)
    dying = DyingRunner(runner, WorkerKilled("runtime aborted"), after=1)
    srv = ServerThread(cfg, {"demo": ModelEntry("demo", AV.load(demo["avatar"]), dying)}, runner)
    res = C.StreamResult()
    try:
        try:
            asyncio.run(C.stream(srv.ws_url, "demo", make_speech(1.0, P.STREAM_RATE), result=res, timeout=20))
        except Exception:   # noqa: BLE001 (no END follows the error answer: the client's own timeout)
            pass
        errors = [r.error for r in res.responses if r.status == P.Status.INTERNAL]
        assert any("model worker died" in (e or "") and "WorkerKilled" in (e or "") for e in errors), res.responses
        assert not srv.server.packer.batcher.alive   # (the health check reads it)
    finally:
        srv.stop()
