"""The pipeline's helper threads on a CPU: they run at a lower priority than the model (x264's own threads
included), and the background sink keeps order and hands its errors to the caller."""
from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from lipsync_trt import pipeline
from lipsync_trt.video import VideoWriter

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")


def thread_nices() -> dict[int, int]:
    """tid -> nice of every thread of this process, read from /proc (field 19 of stat)."""
    out = {}
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:   # the thread ended meanwhile
            continue
        out[int(task.name)] = int(stat.rsplit(")", 1)[1].split()[16])
    return out


def in_thread(fn):
    result, errors = [], []

    def run():
        try:
            result.append(fn())
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if errors:
        raise errors[0]
    return result[0]


@linux_only
def test_yield_to_model_lowers_only_the_calling_thread(torch_runner):
    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def helper():
        pipeline.yield_to_model(torch_runner)
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    helper_nice = in_thread(helper)
    assert helper_nice == min(19, before + pipeline.HELPER_NICE)
    assert helper_nice > before
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before   # the caller keeps its own


@linux_only
def test_x264_threads_start_in_the_writing_thread_and_inherit_its_priority(tmp_path, torch_runner):
    """The encoders open at the first frame, not at __enter__ (where the audio track used to open them), so
    x264's frame threads take the lowered priority of the thread that writes."""
    main_tid = threading.get_native_id()
    base = os.getpriority(os.PRIO_PROCESS, main_tid)
    frame = np.full((64, 96, 3), 90, np.uint8)
    audio = np.zeros(16000, np.float32)
    with VideoWriter(tmp_path / "o.mp4", 96, 64, audio=audio, audio_rate=16000, threads=3) as writer:
        before = set(thread_nices())

        def write():
            pipeline.yield_to_model(torch_runner)
            for _ in range(3):
                writer.write(frame)
            me = threading.get_native_id()
            return me, {tid: nice for tid, nice in thread_nices().items() if tid not in before and tid != me}

        me, started = in_thread(write)
    assert started, "x264 started no threads of its own (threads=3 asks for frame threads)"
    assert set(started.values()) == {min(19, base + pipeline.HELPER_NICE)}, started
    assert (tmp_path / "o.mp4").stat().st_size > 0


def test_in_background_runs_every_item_in_order_before_returning():
    seen, tids = [], set()

    def fn(item):
        seen.append(item)
        tids.add(threading.get_native_id())

    with pipeline.in_background(fn, depth=2) as submit:
        for i in range(50):
            submit(i)
    assert seen == list(range(50))
    assert tids and threading.get_native_id() not in tids


def test_in_background_error_reaches_the_caller():
    def fn(item):
        if item == 3:
            raise ValueError(f"bad item {item}")

    with pytest.raises(ValueError, match="bad item 3"):
        with pipeline.in_background(fn, depth=1) as submit:
            for i in range(100):   # fails at a later submit, never blocks on the full queue
                submit(i)
    with pytest.raises(ValueError, match="bad item 3"):   # or at exit, when the failing item was the last
        with pipeline.in_background(fn) as submit:
            for i in range(4):
                submit(i)


def test_generate_to_mp4_leaves_no_file_when_the_sink_fails(demo, torch_runner, tmp_path, monkeypatch):
    """An encode error in the sink thread stops generate with that error and no output left behind."""
    import soundfile as sf

    from lipsync_trt import avatar as AV
    from lipsync_trt.errors import OutputError

    calls = []
    real_write = VideoWriter.write

    def failing_write(self, frame):
        calls.append(1)
        if len(calls) == 3:
            raise OutputError("disk full (injected)")
        return real_write(self, frame)

    monkeypatch.setattr(VideoWriter, "write", failing_write)
    samples, rate = sf.read(demo["audio"], dtype="float32")
    out = tmp_path / "o.mp4"
    with pytest.raises(OutputError, match="disk full"):
        pipeline.generate(torch_runner, AV.load(demo["avatar"]), samples, rate, out=out, progress=False)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------- the embedding process's settings (#13)

@pytest.fixture()
def thread_counts():
    """cv2 and torch thread counts set to 2 for the test (the embedding process's own choice), restored after."""
    import cv2
    import torch

    saved = cv2.getNumThreads(), torch.get_num_threads()
    cv2.setNumThreads(2)
    torch.set_num_threads(2)
    yield lambda: (cv2.getNumThreads(), torch.get_num_threads())
    cv2.setNumThreads(saved[0])
    torch.set_num_threads(saved[1])


@pytest.fixture(scope="module")
def ort_setup(demo, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from lipsync_trt import audio as A
    from lipsync_trt import avatar as AV
    from lipsync_trt import backends

    runner = backends.load("onnxruntime", demo["generator"], demo["audio_encoder"], device="cpu",
                           engines=tmp_path_factory.mktemp("engines"))
    return runner, AV.load(demo["avatar"]), pipeline.encode_features(runner, A.load_16k(demo["audio"]))


def test_overlapping_renders_restore_the_settings_of_before(ort_setup, thread_counts):
    runner, av, feats = ort_setup
    first = pipeline.iter_frames(runner, av, feats, [0, 1, 2], batch_size=1)
    next(first)
    second = pipeline.iter_frames(runner, av, feats, [0, 1, 2], batch_size=1)
    next(second)
    assert thread_counts() == (1, 1)
    first.close()
    assert thread_counts() == (1, 1), "the other render still runs"
    second.close()
    assert thread_counts() == (2, 2)


@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_concurrent_generate_calls_restore_the_settings(ort_setup, thread_counts, tmp_path, demo):
    import soundfile as sf

    runner, av, _ = ort_setup
    samples, rate = sf.read(demo["audio"], dtype="float32")
    results: list = []
    threads = [threading.Thread(target=lambda k=k: results.append(
        pipeline.generate(runner, av, samples, rate, out=tmp_path / f"{k}.mp4", progress=False))) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and all(r.frames > 0 for r in results)
    assert thread_counts() == (2, 2)


@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_public_frames_leave_the_process_alone(demo, thread_counts):
    import lipsync_trt

    ls = lipsync_trt.load(demo["avatar"], demo["generator"], demo["audio_encoder"], backend="torch", device="cpu")
    base = threading.active_count()
    seen = {thread_counts() for _ in ls.frames(demo["audio"], frames="0-3")}
    assert seen == {(2, 2)}
    it = ls.frames(demo["audio"])
    next(it)
    assert thread_counts() == (2, 2) and threading.active_count() > base   # its workers run while it lives
    it.close()                                                             # stopped early: its threads end
    assert threading.active_count() == base
    for _ in ls.frames(demo["audio"]):
        break
    assert threading.active_count() == base


@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_a_lipsync_with_streams_stops_its_worker_when_closed_or_dropped(demo):
    import gc

    import soundfile as sf

    import lipsync_trt

    samples, rate = sf.read(demo["audio"], dtype="float32")
    base = {t.name for t in threading.enumerate()}

    def used_lipsync():
        ls = lipsync_trt.load(demo["avatar"], demo["generator"], demo["audio_encoder"], backend="torch", device="cpu")
        with ls.stream(rate=rate) as s:
            got = list(s.push(samples)) + list(s.close())
        assert len(got) > 0
        assert "lipsync-batcher" in {t.name for t in threading.enumerate()} - base
        return ls

    with used_lipsync():
        pass                                                  # close() at the end of the with block
    assert "lipsync-batcher" not in {t.name for t in threading.enumerate()} - base
    ls = used_lipsync()
    del ls                                                    # dropped without close()
    gc.collect()
    assert "lipsync-batcher" not in {t.name for t in threading.enumerate()} - base
