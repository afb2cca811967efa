"""Avatar folder loading, validation, boxes and frame order vs the recipe's own loop."""
from __future__ import annotations

import shutil

import cv2
import numpy as np
import pytest

from lipsync_trt import avatar as AV
from lipsync_trt.bench import reference
from lipsync_trt.demo import landmarks_for, make_avatar
from lipsync_trt.errors import AvatarError


@pytest.mark.parametrize("count", [2, 3, 7, 523])
def test_frame_order_matches_reference_loop(count):
    assert AV.frame_order(3 * count + 5, count).tolist() == reference.frame_order(count, 3 * count + 5)


def test_start_frame_runs_the_ping_pong_over_the_tail():
    assert AV.frame_order(6, 10, start=7).tolist() == [8, 9, 8, 7, 8, 9]
    with pytest.raises(AvatarError, match="at least 2"):
        AV.frame_order(3, 10, start=9)


def test_sanders_boxes_match_the_recipe(sanders):
    av = AV.load(sanders)
    assert (av.count, av.height, av.width) == (523, 720, 1280)
    for n in (0, 100, 522):
        lines = (sanders / "landmarks" / f"{n}.lms").read_text().split()
        pts = np.array(lines, dtype=float).reshape(-1, 2).astype(np.int32)
        xmin, ymin, xmax = pts[1, 0], pts[52, 1], pts[31, 0]
        assert tuple(av.boxes[n]) == (xmin, ymin, xmax, ymin + xmax - xmin)
    assert np.array_equal(av.frame(3), cv2.imread(str(sanders / "full_body_img" / "3.jpg")))


@pytest.fixture
def small(tmp_path):
    return make_avatar(tmp_path / "av", count=4)


def test_lf_and_crlf_landmarks_agree(small):
    a = AV.load(small)
    p = small / "landmarks" / "2.lms"
    p.write_bytes(p.read_bytes().replace(b"\n", b"\r\n"))
    b = AV.load(small)
    assert np.array_equal(a.landmarks, b.landmarks) and np.array_equal(a.boxes, b.boxes)


def test_box_past_an_edge_is_clipped(small):
    lms = landmarks_for(10, 50, 60)            # box x from -20, y from 20
    (small / "landmarks" / "1.lms").write_text("".join(f"{x} {y}\n" for x, y in lms))
    av = AV.load(small)
    assert tuple(av.boxes[1]) == (0, 20, 40, 80)


@pytest.mark.parametrize("damage,match", [
    (lambda r: (r / "full_body_img" / "2.jpg").unlink(), r"2\.jpg: missing"),
    (lambda r: (r / "landmarks" / "1.lms").unlink(), r"1\.lms: missing landmarks"),
    (lambda r: (r / "full_body_img" / "notes.txt").write_text("x"), "unexpected file"),
    (lambda r: shutil.copy(r / "landmarks" / "0.lms", r / "landmarks" / "9.lms"), "landmarks without a frame"),
    (lambda r: (r / "landmarks" / "3.lms").write_text("1 2\n" * 109), "expected 110 landmark lines"),
    (lambda r: (r / "landmarks" / "3.lms").write_text("1 2\n" * 109 + "1 x\n"), "two numbers .x y., got .1 x."),
    (lambda r: (r / "landmarks" / "3.lms").write_text("1 2\n" * 109 + "1 2 3\n"), "line 110"),
    (lambda r: (r / "landmarks" / "0.lms").write_text(
        "".join(f"{x} {y}\n" for x, y in landmarks_for(1000, 1000, 50))), "lies outside"),
    (lambda r: (r / "landmarks" / "0.lms").write_text(
        "".join(f"{x} {y}\n" for x, y in landmarks_for(100, 100, -5))), "empty face box"),
    (lambda r: cv2.imwrite(str(r / "full_body_img" / "1.jpg"), np.zeros((100, 100, 3), np.uint8)),
     r"1\.jpg: frame is 100x100, expected 256x192"),
    (lambda r: (r / "full_body_img" / "2.jpg").write_bytes(b"not a jpeg"), r"2\.jpg: not a JPEG"),
    (lambda r: shutil.rmtree(r / "landmarks"), "folder not found"),
])
def test_bad_folders_are_rejected_at_load(small, damage, match):
    damage(small)
    with pytest.raises(AvatarError, match=match):
        AV.load(small)


def test_single_frame_avatar_is_rejected(tmp_path):
    root = make_avatar(tmp_path / "one", count=1)
    with pytest.raises(AvatarError, match="at least 2"):
        AV.load(root)


def test_decoded_frames_are_bounded(sanders):
    av = AV.load(sanders, cache_size=5)
    for n in range(12):
        av.frame(n)
    assert len(av._cache) == 5
