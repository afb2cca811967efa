"""Whole frames computed the SyncTalk_2D reference's way (lipsync_trt.bench.reference: OpenCV decode, resize and
rectangle, the torch model called per frame), as an independent oracle for the pipeline's output."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lipsync_trt.bench import reference


def reference_frames(avatar_dir: Path, padded_features: np.ndarray, indices: list[int], generator: torch.nn.Module
                     ) -> dict[int, np.ndarray]:
    """Composited BGR frames for the given video frame indices, computed the reference's way."""
    return dict(reference.frames(avatar_dir, padded_features, indices, generator))


def agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    """(fraction of identical bytes, largest absolute difference) of two uint8 images."""
    d = np.abs(a.astype(np.int32) - b.astype(np.int32))
    return float((d == 0).mean()), int(d.max())


def render_batch(runner, avatar, audio_windows: torch.Tensor, template_ids) -> list[torch.Tensor]:
    """One batch the plain way, from the public compositing steps: each template frame decoded, `compose.prepare`,
    one generator call on `audio_windows`, `compose.paste`: composited frames (H, W, 3) uint8 BGR on the runner's
    device (what the offline pipeline overlaps in threads)."""
    from lipsync_trt import compose

    ids = [int(t) for t in template_ids]
    frames = [torch.from_numpy(avatar.frame(t).copy()).to(runner.device) for t in ids]
    boxes = [avatar.boxes[t] for t in ids]
    inputs, crops = compose.prepare(frames, boxes, runner.dtype)
    return compose.paste(frames, crops, runner.generate(inputs, audio_windows), boxes)
