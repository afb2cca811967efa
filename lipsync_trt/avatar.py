"""A SyncTalk_2D avatar folder: template frames, landmarks -> face boxes, and the ping-pong frame order (RECIPE §4-5).

Everything that can be wrong with the folder (missing, extra or unreadable frames, malformed landmarks,
boxes with no area, frames of different sizes) is found by `load`, before any frame is rendered.
Frames are decoded on demand and kept in a small LRU cache, so long audio never holds the whole clip.
"""
from __future__ import annotations

import os
import re
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import recipe as R
from .errors import AvatarError
from .inputs import MAX_JPEG_BYTES, MAX_LANDMARKS_BYTES, read_file

FRAMES_DIR = "full_body_img"
LANDMARKS_DIR = "landmarks"
_NUMBERED = re.compile(r"^(0|[1-9][0-9]*)\.(jpg|lms)$")


def avatar_inputs(root: str | os.PathLike) -> list[Path]:
    """What a run reads of an avatar folder: its frames and landmarks folders (for `inputs.check_outputs`)."""
    return [Path(root) / FRAMES_DIR, Path(root) / LANDMARKS_DIR]


_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))
_SEGMENTS = frozenset(range(0xC0, 0xD0)) | {0xDA, 0xDB, 0xDC, 0xDD, 0xDE, 0xDF, 0xFE} | frozenset(range(0xE0, 0xF0))


def check_jpeg(data: bytes, path: Path) -> tuple[int, int]:
    """(height, width) of a sound JPEG: `check_structure`, then `check_entropy`. libjpeg decodes a truncated file,
    foreign bytes in the scan or a bad Huffman code with only a warning on stderr, which OpenCV cannot report."""
    size = check_structure(data, path)
    check_entropy(data, path)
    return size


def check_entropy(data: bytes, path: Path) -> None:
    """Decode the JPEG with FFmpeg's decoder (PyAV, a core dependency) in its strict mode (err_detect=explode), which
    fails on the entropy-coded errors libjpeg only warns about (bad Huffman codes, premature end of a scan)."""
    import av

    try:
        codec = av.CodecContext.create("mjpeg", "r")
        codec.options = {"err_detect": "explode"}
        frames = codec.decode(av.Packet(data)) + codec.decode(None)
    except (av.FFmpegError, ValueError) as exc:
        raise AvatarError(f"{path}: corrupt JPEG (the scan data does not decode: {str(exc).split(':')[0]})") from None
    if len(frames) != 1:
        raise AvatarError(f"{path}: corrupt JPEG (it decodes to {len(frames)} images)")


def check_structure(data: bytes, path: Path) -> tuple[int, int]:
    """(height, width) of a JPEG after checking its whole byte structure: every marker segment inside the file,
    entropy-coded data holding only stuffed 0xFF00 bytes and restart markers, and an end-of-image marker."""
    if data[:2] != b"\xff\xd8":
        raise AvatarError(f"{path}: not a JPEG file (no SOI marker)")
    arr = np.frombuffer(data, np.uint8)
    n, pos, size, scans = len(data), 2, None, 0
    while True:
        if pos + 2 > n:
            raise AvatarError(f"{path}: truncated JPEG (ends at byte {n} without an end-of-image marker)")
        if data[pos] != 0xFF:
            raise AvatarError(f"{path}: corrupt JPEG (no marker at byte {pos})")
        marker = data[pos + 1]
        if marker == 0xFF:                      # fill byte before a marker
            pos += 1
            continue
        if marker == 0xD9:                      # end of image
            break
        if marker not in _SEGMENTS:
            raise AvatarError(f"{path}: corrupt JPEG (unexpected marker 0x{marker:02X} at byte {pos})")
        if pos + 4 > n:
            raise AvatarError(f"{path}: truncated JPEG (inside a marker segment at byte {pos})")
        end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if end > n or end < pos + 4:
            raise AvatarError(f"{path}: truncated JPEG (marker 0x{marker:02X} segment runs past the end)")
        if marker in _SOF:
            if end < pos + 9:
                raise AvatarError(f"{path}: corrupt JPEG frame header")
            h, w = int.from_bytes(data[pos + 5:pos + 7], "big"), int.from_bytes(data[pos + 7:pos + 9], "big")
            if h == 0 or w == 0:
                raise AvatarError(f"{path}: JPEG with zero size {w}x{h}")
            size = (h, w)
        pos = end
        if marker == 0xDA:                      # scan: entropy-coded data up to the next real marker
            scans += 1
            ff = np.flatnonzero(arr[pos:n - 1] == 0xFF) + pos
            after = arr[ff + 1]
            real = np.flatnonzero((after != 0x00) & (after != 0xFF) & ((after < 0xD0) | (after > 0xD7)))
            if not len(real):
                raise AvatarError(f"{path}: truncated JPEG (scan data runs to the end of the file, no end-of-image "
                                  f"marker)")
            pos = int(ff[real[0]])
    if size is None or not scans:
        raise AvatarError(f"{path}: corrupt JPEG (no {'frame header' if size is None else 'scan'} before the end)")
    return size


def read_jpeg(path: Path, checked: int | None = None) -> tuple[bytes, tuple[int, int] | None]:
    """A JPEG file's bytes and (height, width), checked by `check_jpeg`; AvatarError naming the file otherwise.
    When the bytes' CRC-32 equals `checked` (a file checked before and unchanged since), the check is skipped and
    the size is None."""
    data = read_file(path, "template frame", AvatarError, MAX_JPEG_BYTES)   # a regular file, bounded: never a FIFO
    if checked is not None and zlib.crc32(data) == checked:
        return data, None
    return data, check_jpeg(data, path)


def read_landmarks(path: Path) -> np.ndarray:
    """(110, 2) int32 landmarks from an .lms file ("x y" per line, LF or CRLF), truncated toward zero."""
    data = read_file(path, "landmarks file", AvatarError, MAX_LANDMARKS_BYTES)
    try:
        text = data.decode("ascii", errors="strict")
    except UnicodeDecodeError as exc:
        raise AvatarError(f"{path}: cannot read landmarks ({exc})") from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) != R.LANDMARK_COUNT:
        raise AvatarError(f"{path}: expected {R.LANDMARK_COUNT} landmark lines 'x y', found {len(lines)}")
    pts = np.empty((R.LANDMARK_COUNT, 2), np.float64)
    for i, ln in enumerate(lines):
        parts = ln.split()
        try:
            if len(parts) != 2:
                raise ValueError
            pts[i] = float(parts[0]), float(parts[1])
        except ValueError:
            raise AvatarError(f"{path}: line {i + 1}: expected two numbers 'x y', got {ln.strip()!r}") from None
    if not np.isfinite(pts).all():
        raise AvatarError(f"{path}: landmarks contain NaN or infinite values")
    return np.trunc(pts).astype(np.int32)


def face_box(lms: np.ndarray, height: int, width: int, source: str = "landmarks") -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2) per RECIPE §5, clipped to the frame; AvatarError when nothing is left inside it."""
    xmin, ymin, xmax = int(lms[R.LM_XMIN, 0]), int(lms[R.LM_YMIN, 1]), int(lms[R.LM_XMAX, 0])
    side = xmax - xmin
    if side <= 0:
        raise AvatarError(f"{source}: empty face box: lm[{R.LM_XMAX}].x={xmax} is not right of lm[{R.LM_XMIN}].x={xmin}")
    x1, y1, x2, y2 = max(xmin, 0), max(ymin, 0), min(xmax, width), min(ymin + side, height)
    if x2 <= x1 or y2 <= y1:
        raise AvatarError(f"{source}: face box ({xmin}, {ymin}, {xmax}, {ymin + side}) lies outside the "
                          f"{width}x{height} frame")
    return x1, y1, x2, y2


def frame_order(num_frames: int, count: int, start: int = 0) -> np.ndarray:
    """Template image for each video frame: ping-pong 1, 2, …, count-1, count-2, …, 0, 1, … over images
    start..count-1 (RECIPE §4)."""
    m = count - start
    if m < 2:
        raise AvatarError(f"start frame {start} leaves {m} template frame(s) of {count}; at least 2 are needed")
    return R.template_of(np.arange(num_frames, dtype=np.int64), count, start)


@dataclass
class Avatar:
    """A loaded avatar: frame paths, boxes (count, 4) as (x1, y1, x2, y2), frame size; frames decoded lazily."""

    root: Path
    height: int
    width: int
    boxes: np.ndarray
    landmarks: np.ndarray
    cache_size: int = 32
    checksums: dict[int, int] = field(default_factory=dict, repr=False)   # CRC-32 of each frame as `load` checked it
    _cache: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def count(self) -> int:
        return len(self.boxes)

    @property
    def name(self) -> str:
        return self.root.name

    def frame_path(self, n: int) -> Path:
        return self.root / FRAMES_DIR / f"{n}.jpg"

    def frame(self, n: int) -> np.ndarray:
        """Template frame n as uint8 (H, W, 3) BGR (read-only; copy before drawing on it)."""
        with self._lock:
            if n in self._cache:
                self._cache.move_to_end(n)
                return self._cache[n]
        img = decode(self.frame_path(n), self.height, self.width, self.checksums.get(n))
        img.setflags(write=False)
        with self._lock:
            self._cache[n] = img
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return img

    def order(self, num_frames: int, start: int = 0) -> np.ndarray:
        if not 0 <= start < self.count:
            raise AvatarError(f"{self.root}: start frame {start} is outside 0..{self.count - 1}")
        return frame_order(num_frames, self.count, start)


def decode(path: Path, height: int, width: int, checked: int | None = None) -> np.ndarray:
    """Template frame as uint8 (H, W, 3) BGR, with OpenCV as the reference decodes it, after `check_jpeg` (so a
    frame damaged since `load` fails here with AvatarError instead of rendering libjpeg's best guess). `checked`: the
    CRC-32 of the bytes `load` checked, so that an unchanged file is not checked twice."""
    import cv2

    data, _ = read_jpeg(path, checked)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise AvatarError(f"{path}: cannot decode JPEG")
    if img.shape[:2] != (height, width):
        raise AvatarError(f"{path}: frame is {img.shape[1]}x{img.shape[0]}, expected {width}x{height} like 0.jpg")
    return img


def _numbered(folder: Path, ext: str) -> dict[int, Path]:
    if not folder.is_dir():
        raise AvatarError(f"{folder}: folder not found (an avatar has {FRAMES_DIR}/N.jpg and {LANDMARKS_DIR}/N.lms)")
    found = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        m = _NUMBERED.match(entry.name)
        if not m or m.group(2) != ext:
            raise AvatarError(f"{folder / entry.name}: unexpected file; {folder.name}/ must hold only 0.{ext} .. N.{ext}")
        found[int(m.group(1))] = Path(entry.path)
    return found


def load(root: str | os.PathLike, cache_size: int = 32) -> Avatar:
    """Validate and load an avatar folder (SyncTalk_2D layout)."""
    root = Path(root)
    if not root.is_dir():
        raise AvatarError(f"{root}: avatar folder not found")
    frames = _numbered(root / FRAMES_DIR, "jpg")
    lms = _numbered(root / LANDMARKS_DIR, "lms")
    count = len(frames)
    if count < 2:
        raise AvatarError(f"{root / FRAMES_DIR}: {count} frame(s); an avatar needs at least 2")
    for n in range(count):
        if n not in frames:
            raise AvatarError(f"{root / FRAMES_DIR / f'{n}.jpg'}: missing (frames must be numbered 0..{count - 1} "
                              f"without gaps; found {count} files up to {max(frames)}.jpg)")
        if n not in lms:
            raise AvatarError(f"{root / LANDMARKS_DIR / f'{n}.lms'}: missing landmarks for frame {n}")
    extra = sorted(set(lms) - set(frames))
    if extra:
        raise AvatarError(f"{root / LANDMARKS_DIR / f'{extra[0]}.lms'}: landmarks without a frame "
                          f"({FRAMES_DIR}/{extra[0]}.jpg does not exist)")
    marks = np.empty((count, R.LANDMARK_COUNT, 2), np.int32)
    boxes = np.empty((count, 4), np.int64)
    checksums: dict[int, int] = {}
    for n in range(count):   # every frame checked whole now (structure + strict decode), before anything renders
        data, size = read_jpeg(frames[n])
        checksums[n] = zlib.crc32(data)
        if n == 0:
            height, width = size
        elif size != (height, width):
            raise AvatarError(f"{frames[n]}: frame is {size[1]}x{size[0]}, expected {width}x{height} like 0.jpg")
        marks[n] = read_landmarks(lms[n])
        boxes[n] = face_box(marks[n], height, width, source=str(lms[n]))
    return Avatar(root=root, height=height, width=width, boxes=boxes, landmarks=marks, cache_size=cache_size,
                  checksums=checksums)
