"""The MP4 writer: the x264 preset reaches the encoder (x264 writes its settings into the stream), bad presets
are refused before anything is written."""
from __future__ import annotations

import re

import numpy as np
import pytest

from lipsync_trt import recipe as R
from lipsync_trt.errors import OutputError
from lipsync_trt.video import VideoWriter


def x264_settings(path) -> dict[str, str]:
    """The 'options:' string x264 embeds in its SEI user data, as a dict."""
    text = path.read_bytes().decode("latin-1")
    m = re.search(r"x264 - core \d+.*? options: ([^\x00]*)", text)
    assert m, "no x264 settings SEI in the file"
    return dict(kv.split("=", 1) for kv in m.group(1).split() if "=" in kv)


@pytest.mark.parametrize("preset, subme", [("medium", "7"), ("veryfast", "2")])   # x264's preset table
def test_preset_reaches_the_encoder(tmp_path, preset, subme):
    out = tmp_path / f"{preset}.mp4"
    rng = np.random.default_rng(0)
    with VideoWriter(out, 64, 48, preset=preset) as w:
        for _ in range(5):
            w.write(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    opts = x264_settings(out)
    assert opts["subme"] == subme and opts["crf"].startswith(f"{R.DEFAULT_CRF}.")


def test_unknown_preset_is_refused_and_nothing_written(tmp_path):
    with pytest.raises(OutputError, match="unknown x264 preset 'quick'"):
        VideoWriter(tmp_path / "x.mp4", 64, 48, preset="quick")
    assert list(tmp_path.iterdir()) == []
