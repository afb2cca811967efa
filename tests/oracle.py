"""The SyncTalk_2D reference's per-frame structure (inference_328.py), written with OpenCV and numpy, used as
an independent oracle for whole frames: cv2 decode/resize/rectangle, the torch model called per frame."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from test_audio import reference_feature_window
from test_avatar import reference_order
from test_compose import cv2_paste, cv2_prepare


def reference_frames(avatar_dir: Path, padded_features: np.ndarray, indices: list[int], generator: torch.nn.Module
                     ) -> dict[int, np.ndarray]:
    """Composited BGR frames for the given video frame indices, computed the reference's way."""
    count = len(list((avatar_dir / "full_body_img").glob("*.jpg")))
    order = reference_order(count, max(indices) + 1)
    out = {}
    for i in indices:
        n = order[i]
        img = cv2.imread(str(avatar_dir / "full_body_img" / f"{n}.jpg"))
        pts = np.loadtxt(avatar_dir / "landmarks" / f"{n}.lms").astype(np.int32)
        xmin, ymin, xmax = pts[1, 0], pts[52, 1], pts[31, 0]
        box = (xmin, ymin, xmax, ymin + xmax - xmin)
        inp, crop_ori = cv2_prepare(img, box)
        audio = reference_feature_window(padded_features, i)
        with torch.no_grad():
            pred = generator(torch.from_numpy(inp)[None], torch.from_numpy(audio)[None])[0].numpy()
        out[i] = cv2_paste(img, crop_ori, pred, box)
    return out


def agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    d = np.abs(a.astype(np.int32) - b.astype(np.int32))
    return float((d == 0).mean()), int(d.max())
