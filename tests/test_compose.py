"""Compositing (RECIPE §6-7) vs the reference's OpenCV steps (lipsync_trt.bench.reference), on real sanders frames."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from lipsync_trt import avatar as AV
from lipsync_trt import compose
from lipsync_trt.bench import reference


def reference_paste(img: np.ndarray, crop_ori: np.ndarray, pred: np.ndarray, box) -> np.ndarray:
    """The reference's paste into copies (it writes into both)."""
    return reference.paste(img.copy(), crop_ori.copy(), pred, box)


def agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    d = np.abs(a.astype(np.int32) - b.astype(np.int32))
    return float((d == 0).mean()), int(d.max())


def test_resize_cubic_matches_opencv_on_many_sizes():
    rng = np.random.default_rng(0)
    equal, total = 0, 0
    for _ in range(30):
        ih, iw, oh, ow = rng.integers(4, 340, size=4)
        src = cv2.GaussianBlur(rng.integers(0, 256, (ih, iw, 3), dtype=np.uint8), (5, 5), 0)
        ref = cv2.resize(src, (int(ow), int(oh)), interpolation=cv2.INTER_CUBIC)
        ours = compose.resize_cubic(torch.from_numpy(src), int(oh), int(ow)).numpy()
        d = np.abs(ref.astype(int) - ours)
        assert d.max() <= 1, (ih, iw, oh, ow)
        equal, total = equal + (d == 0).sum(), total + d.size
    assert equal / total >= 0.999


@pytest.fixture(scope="module")
def frames(sanders):
    av = AV.load(sanders)
    ids = [0, 1, 77, 260, 522]
    return av, ids, [av.frame(i).copy() for i in ids]


@pytest.mark.parametrize("impl", ["torch", "opencv", "auto"])
def test_prepare_matches_opencv_on_sanders(frames, impl):
    av, ids, imgs = frames
    boxes = [av.boxes[i] for i in ids]
    inputs, crops = compose.prepare([torch.from_numpy(f) for f in imgs], boxes, impl=impl)
    assert inputs.shape == (len(ids), 6, 320, 320) and inputs.dtype == torch.float32
    for k, (img, box) in enumerate(zip(imgs, boxes)):
        ref_in, ref_crop = reference.prepare(img, box)
        frac, worst = agreement(crops[k].numpy(), ref_crop)
        assert worst <= 1 and frac >= 0.999
        diff = np.abs(inputs[k].numpy() - ref_in)
        assert diff.max() <= 1 / 255 + 1e-7
        assert (diff == 0).mean() >= 0.999          # exact same float where the byte is the same
        assert np.all(inputs[k, 3:, 5:310, 5:315].numpy() == 0)


@pytest.mark.parametrize("impl", ["torch", "opencv", "auto"])
def test_paste_matches_opencv_on_sanders(frames, impl):
    av, ids, imgs = frames
    boxes = [av.boxes[i] for i in ids]
    torch.manual_seed(0)
    pred = torch.rand(len(ids), 3, 320, 320)       # the model output, held fixed
    _, ref_crops = zip(*[reference.prepare(img, b) for img, b in zip(imgs, boxes)])
    ours = [torch.from_numpy(f.copy()) for f in imgs]
    compose.paste(ours, torch.from_numpy(np.stack(ref_crops)), pred, boxes, impl=impl)
    for k, (img, box) in enumerate(zip(imgs, boxes)):
        ref = reference_paste(img, ref_crops[k], pred[k].numpy(), box)
        frac, worst = agreement(ours[k].numpy(), ref)
        assert worst <= 1 and frac >= 0.999
        x1, y1, x2, y2 = box
        outside = np.ones(img.shape[:2], bool)
        outside[y1:y2, x1:x2] = False
        assert np.array_equal(ours[k].numpy()[outside], img[outside])


def test_pred_is_truncated_not_rounded():
    pred = torch.full((1, 3, 2, 2), 0.999)       # 254.745 -> 254 (numpy astype truncates)
    assert compose.to_uint8(pred).unique().tolist() == [254]


def test_unknown_impl_is_an_error():
    with pytest.raises(ValueError, match="unknown impl"):
        compose.prepare([torch.zeros(8, 8, 3, dtype=torch.uint8)], [(0, 0, 4, 4)], impl="numpy")


@pytest.mark.parametrize("impl", ["torch", "opencv"])
def test_mouths_are_the_pasted_regions(frames, impl):
    """What the streaming server sends (compose.mouths) is the box region of the OpenCV-composited frame."""
    av, ids, imgs = frames
    boxes = [av.boxes[i] for i in ids]
    torch.manual_seed(1)
    pred = torch.rand(len(ids), 3, 320, 320)
    _, ref_crops = zip(*[reference.prepare(img, b) for img, b in zip(imgs, boxes)])
    got = compose.mouths(torch.from_numpy(np.stack(ref_crops)), pred, boxes, impl=impl)
    for k, (img, box) in enumerate(zip(imgs, boxes)):
        x1, y1, x2, y2 = box
        ref = reference_paste(img, ref_crops[k], pred[k].numpy(), box)[y1:y2, x1:x2]
        frac, worst = agreement(got[k].numpy(), ref)
        assert got[k].shape == ref.shape and worst <= 1 and frac >= 0.999
