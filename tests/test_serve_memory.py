"""The server's memory (#20 §7c, figures in docs/PROTOCOL.md "Memory"): ONNX Runtime keeps one pre-planned block
per input shape a session runs (memory patterns); a server batching at 1..max_batch would keep one per batch size
(3.3 GB at --max-batch 8 on the demo, 2.0 GB without), so it turns them off when max_batch > 1 and keeps them at 1
(one shape, faster). Checked on the runners the server really loads."""
from __future__ import annotations

import pytest

from lipsync_trt import backends

pytestmark = pytest.mark.skipif(not backends.available()["onnxruntime"].usable, reason="needs onnxruntime")


@pytest.mark.parametrize("max_batch, patterns", [(8, False), (2, False), (1, True)])
def test_the_server_turns_memory_patterns_off_when_it_batches(demo, max_batch, patterns):
    from lipsync_trt.serve.config import ServeConfig, load_models

    cfg = ServeConfig(avatars={"demo": str(demo["avatar"])}, generators={None: str(demo["generator"])},
                      audio_encoder=str(demo["audio_encoder"]), backend="onnxruntime", device="cpu",
                      max_batch=max_batch)
    _, runner = load_models(cfg)
    try:
        assert runner.info["mem_pattern"] is patterns
        for session in (runner.gen.session, runner.enc.session):   # what ONNX Runtime itself was given
            assert session.get_session_options().enable_mem_pattern is patterns
    finally:
        runner.close()
