"""Shared fixtures: the real sanders data (skipped when ../shared is absent) and the synthetic demo avatar."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LIPSYNC_SHARED", REPO.parent / "shared"))
SANDERS = SHARED / "datasets" / "sanders"


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def sanders() -> Path:
    if not (SANDERS / "full_body_img").is_dir():
        pytest.skip(f"real data not found at {SANDERS} (../shared absent)")
    return SANDERS


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> dict:
    """Synthetic avatar, seeded checkpoints and a 2 s speech-like WAV (lipsync_trt.demo)."""
    from lipsync_trt.demo import make_demo

    return make_demo(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def checkpoints(demo) -> tuple[Path, Path]:
    return demo["generator"], demo["audio_encoder"]


@pytest.fixture(scope="session")
def engines_dir(tmp_path_factory) -> Path:
    """The --engines/--out folder the build and backend tests share (one ONNX build per session)."""
    return tmp_path_factory.getbasetemp() / "lipsync_engines"


@pytest.fixture(scope="session")
def torch_runner(checkpoints):
    import torch

    from lipsync_trt.backends import pytorch as tb

    return tb.load(*checkpoints, device=torch.device("cpu"))
