"""The serve benchmark (python -m lipsync_trt.bench serve): its latency/verdict arithmetic on constructed timings,
and one short real run against a server subprocess."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lipsync_trt.bench import serve as SB
from lipsync_trt.serve.protocol import Status
from lipsync_trt.serve.session import ready_chunk


def _run(chunks: int, delay: float, pace: float = 0.04, drop: set = frozenset(), status=Status.OK,
         reused: set = frozenset(), end: bool = True, flush_delay: float | None = None) -> dict:
    """One stream's timings as the client records them: chunk c sent at c * pace, END right after the last chunk;
    frame i answered `delay` s after the chunk that makes it ready (or after END for the last frames)."""
    sent = [c * pace for c in range(chunks)] + [chunks * pace]
    answers = []
    for i in range(chunks - 1):
        if i in drop:
            continue
        c = ready_chunk(i)
        t = sent[c] + delay if c < chunks else sent[-1] + (delay if flush_delay is None else flush_delay)
        answers.append((i, status, i in reused, t))
    return {"sent": sent, "late": [0.0] * (chunks + 1), "answers": answers,
            "end": {"frame_id": chunks - 1, "t": sent[-1] + delay} if end else {}}


def test_analyse_latency_is_measured_from_the_ready_chunk():
    res = SB.analyse(2, 40, [_run(40, 0.100), _run(40, 0.100)], wall=2.0, budget_ms=150)
    assert res["frames_expected"] == 78 and res["frames"]["made"] == 78
    assert res["latency_ms"]["p50"] == pytest.approx(100, abs=0.5) and res["latency_ms"]["max"] == pytest.approx(100, abs=0.5)
    assert res["keeps_up"] and res["why_not"] == [] and res["needed_fps"] == 50
    # 29 frames per stream are ready mid-stream (ready_chunk(i) <= 39), the other 10 only at END; a slow flush
    # at the end is reported apart and does not decide the verdict
    assert res["latency_ms"]["n"] == 2 * 29 and res["latency_end_flush_ms"]["n"] == 2 * 10
    slow_end = SB.analyse(1, 40, [_run(40, 0.100, flush_delay=0.900)], wall=2.0, budget_ms=150)
    assert slow_end["latency_end_flush_ms"]["p50"] == pytest.approx(900, abs=0.5)
    assert slow_end["latency_ms"]["max"] == pytest.approx(100, abs=0.5) and slow_end["keeps_up"]


def test_analyse_verdicts():
    late = SB.analyse(1, 40, [_run(40, 0.400)], wall=2.0, budget_ms=150)
    assert not late["keeps_up"] and "p99" in late["why_not"][0]
    lost = SB.analyse(1, 40, [_run(40, 0.05, drop={3, 9})], wall=2.0, budget_ms=150)
    assert not lost["keeps_up"] and lost["frames"]["missing"] == 2 and "2 missing" in lost["why_not"]
    refused = SB.analyse(1, 40, [_run(40, 0.05, status=Status.OVERLOADED)], wall=2.0, budget_ms=150)
    assert refused["frames"]["overloaded"] == 39 and refused["frames"]["made"] == 0 and not refused["keeps_up"]
    reused = SB.analyse(1, 40, [_run(40, 0.05, reused={5, 6})], wall=2.0, budget_ms=150)
    assert reused["frames"]["reused"] == 2 and reused["frames"]["made"] == 37 and not reused["keeps_up"]
    no_end = SB.analyse(1, 40, [_run(40, 0.05, end=False)], wall=2.0, budget_ms=150)
    assert no_end["frames"]["no_end"] == 1 and not no_end["keeps_up"]


@pytest.mark.slow   # a benchmark run against a server subprocess
def test_demo_run_writes_a_complete_json(tmp_path):
    """The real thing, short: a server subprocess with the demo avatar, one stream of 0.6 s (15 chunks -> 14
    frames) at one chunk per 0.2 s, slow enough for this CPU to keep up with. (But 10 of the 14 frames are ready
    only at end of stream, all at once, which a busy 2-core CPU may take more than the server's default 1 s
    deadline to make: the deadline is raised with the budget.)"""
    out = tmp_path / "serve.json"
    proc = subprocess.run([sys.executable, "-m", "lipsync_trt.bench", "serve", "--demo", "--device", "cpu",
                           "--duration", "0.6", "--streams", "1", "--pace", "0.2", "--warmup", "0.6",
                           "--budget-ms", "5000", "--max-delay-ms", "5000", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    (res,) = report["results"]
    assert res["k"] == 1 and res["frames_expected"] == 14
    assert res["frames"]["made"] == 14 and res["frames"]["missing"] == 0 and res["frames"]["no_end"] == 0
    assert 0 < res["latency_ms"]["p50"] <= res["latency_ms"]["p99"] < 5000
    assert res["server"]["frames"] == 14
    assert report["max_streams_keeping_up"] == 1 and report["server"]["backend"]
    assert "largest K keeping up: 1" in proc.stdout
