"""`python -m lipsync_trt compare A B`: how far two renders of the same clip are apart (PSNR, SSIM, absolute
differences), per frame and in total, over the whole frame and over the face box; to check a faster backend or
precision against the reference path. SSIM is scikit-image's (`pip install 'lipsync_trt[compare]'`)."""
from __future__ import annotations

import argparse
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from . import inputs
from .errors import CompareError, OutputError
from .inputs import MAX_PNG_BYTES, MAX_VIDEO_BYTES, check_file, open_file

_PNG = re.compile(r"^(\d{6})\.png$")
PEAK = 255.0                 # uint8 frames


def psnr(mse: float) -> float:
    """PSNR in dB of 8-bit images with this mean squared error (inf when identical)."""
    return math.inf if mse == 0 else 10.0 * math.log10(PEAK * PEAK / mse)


def _ssim_fn():
    try:
        from skimage.metrics import structural_similarity
    except ImportError as exc:
        raise CompareError(f"compare needs scikit-image for SSIM ({exc}); install it with "
                           "pip install 'lipsync_trt[compare]'") from None
    return structural_similarity


SSIM_WINDOW = 11             # scikit-image's Gaussian window for sigma 1.5: 2 * int(3.5 * 1.5 + 0.5) + 1


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two uint8 (H, W, 3) images as Wang et al. define it (11x11 Gaussian window, sigma 1.5, population
    covariances), computed by scikit-image per channel and averaged."""
    if min(a.shape[:2]) < SSIM_WINDOW:
        raise CompareError(f"a {a.shape[1]}x{a.shape[0]} region is smaller than SSIM's {SSIM_WINDOW}x{SSIM_WINDOW} window")
    return float(_ssim_fn()(a, b, channel_axis=2, data_range=PEAK, gaussian_weights=True, sigma=1.5,
                            use_sample_covariance=False))


# ---------------------------------------------------------------------------------------------- reading clips

def _frames_dir(path: Path) -> list[tuple[int, Path]]:
    """The folder's {i:06d}.png frames, each checked now (a bounded regular file whose header states a size within
    the bound), before any is decoded."""
    files = sorted((int(m.group(1)), path / name) for name in os.listdir(path) if (m := _PNG.match(name)))
    if not files:
        raise CompareError(f"{path}: no frames; expected {{i:06d}}.png files as `generate --frames-dir` writes")
    for _, f in files:
        png_size(f)
    return files


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, read without decoding; CompareError when the file is not a bounded
    regular PNG file or states a size over the frame bound."""
    with open_file(path, "PNG frame", CompareError, MAX_PNG_BYTES) as f:
        head = f.read(24)
    if len(head) < 24 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise CompareError(f"{path}: not a PNG file (no PNG signature and IHDR header)")
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    check_frame_size(width, height, path, "PNG frame")
    return width, height


def check_frame_size(width: int, height: int, path: str | os.PathLike, what: str) -> None:
    """CompareError for a frame size over the bound (MAX_FRAME_SIDE a side, MAX_FRAME_PIXELS in all): checked from
    the headers, before a frame is decoded, since comparing one pair takes tens of bytes a pixel."""
    if not (0 < width <= inputs.MAX_FRAME_SIDE and 0 < height <= inputs.MAX_FRAME_SIDE
            and width * height <= inputs.MAX_FRAME_PIXELS):
        raise CompareError(f"{path}: {what}s are {width}x{height}; compare takes frames of at most "
                           f"{inputs.MAX_FRAME_SIDE} a side and at most {inputs.MAX_FRAME_PIXELS} pixels")


def read_clip(path: str | os.PathLike) -> tuple[list[int] | None, Iterator[np.ndarray]]:
    """(frame indices for a folder, None for a video; an iterator of BGR uint8 (H, W, 3) frames). Inputs are checked
    here (regular files, sizes from their headers), before anything is decoded."""
    p = Path(path)
    if p.is_dir():
        files = _frames_dir(p)
        return [i for i, _ in files], _read_pngs(files)
    if not p.exists() and not p.is_symlink():
        raise CompareError(f"{p}: not found; expected an MP4 or a folder of {{i:06d}}.png frames")
    check_file(p, "video", CompareError, MAX_VIDEO_BYTES)
    return None, _read_video(_open_video(p), p)


def _read_pngs(files: list[tuple[int, Path]]) -> Iterator[np.ndarray]:
    import cv2

    for _, f in files:
        png_size(f)   # again: the file may have changed since the folder was checked
        img = cv2.imread(str(f), cv2.IMREAD_COLOR)
        if img is None:
            raise CompareError(f"{f}: cannot decode PNG")
        yield img


def _open_video(path: Path):
    """The opened container, its first video stream's size checked from the header before any frame is decoded."""
    import av

    try:
        container = av.open(str(path))
    except Exception as exc:   # av.error.* for unreadable or non-video files
        raise CompareError(f"{path}: cannot open as a video ({exc})") from None
    try:
        if not container.streams.video:
            raise CompareError(f"{path}: has no video stream")
        ctx = container.streams.video[0].codec_context
        check_frame_size(int(ctx.width), int(ctx.height), path, "video frame")
    except BaseException:
        container.close()
        raise
    return container


def _read_video(container, path: Path) -> Iterator[np.ndarray]:
    with container:
        try:
            for frame in container.decode(video=0):
                yield frame.to_ndarray(format="bgr24")
        except Exception as exc:
            if isinstance(exc, CompareError):
                raise
            raise CompareError(f"{path}: cannot decode ({exc})") from None


# ---------------------------------------------------------------------------------------------- measuring

@dataclass
class Region:
    """Running totals of one region (whole frame or face box) over the frames compared."""

    sq: float = 0.0          # sum of squared differences
    absum: float = 0.0       # sum of absolute differences
    n: int = 0               # values compared
    max_abs: int = 0
    psnrs: list = field(default_factory=list)
    ssims: list = field(default_factory=list)

    def add(self, a: np.ndarray, b: np.ndarray) -> dict:
        d = a.astype(np.int32) - b.astype(np.int32)
        sq, ab, mx = float(np.square(d, dtype=np.int64).sum()), float(np.abs(d).sum()), int(np.abs(d).max())
        p, s = psnr(sq / d.size), ssim(a, b)
        self.sq, self.absum, self.n, self.max_abs = self.sq + sq, self.absum + ab, self.n + d.size, max(self.max_abs, mx)
        self.psnrs.append(p)
        self.ssims.append(s)
        return {"psnr": p, "ssim": s, "max_abs": mx, "mean_abs": ab / d.size}

    def total(self) -> dict:
        """PSNR of the pooled mean squared error, the worst frame's PSNR, mean and worst SSIM, abs differences."""
        return {"psnr": psnr(self.sq / self.n), "psnr_min": min(self.psnrs), "ssim": float(np.mean(self.ssims)),
                "ssim_min": min(self.ssims), "max_abs": self.max_abs, "mean_abs": self.absum / self.n}


def compare(a: str | os.PathLike, b: str | os.PathLike, avatar: str | os.PathLike | None = None,
            start_frame: int = 0) -> dict:
    """Compare two renders frame by frame; with `avatar`, also over frame i's face box (template order[i] of the
    recipe's ping-pong order from `start_frame`). Raises CompareError on mismatched lengths, indices or sizes."""
    _ssim_fn()   # fail before decoding anything when scikit-image is missing
    ia, fa = read_clip(a)
    ib, fb = read_clip(b)
    if ia is not None and ib is not None and ia != ib:
        raise CompareError(f"{a} has {len(ia)} frames ({_span(ia)}), {b} has {len(ib)} ({_span(ib)}): "
                           "not the same frames")
    indices = ia or ib
    av = order = None
    if avatar is not None:
        from . import avatar as avatar_mod

        av = avatar_mod.load(avatar)
    whole, face, per = Region(), Region(), []
    k = 0
    while True:
        x, y = next(fa, None), next(fb, None)
        if x is None or y is None:
            if x is not None or y is not None:
                longer, shorter = (a, b) if x is not None else (b, a)
                raise CompareError(f"{shorter} ends after {k} frames, {longer} has more: not the same clip length")
            break
        if x.shape != y.shape:
            raise CompareError(f"frame {k}: {a} is {x.shape[1]}x{x.shape[0]}, {b} is {y.shape[1]}x{y.shape[0]}")
        i = indices[k] if indices is not None else k
        row = {"frame": i, "whole": whole.add(x, y)}
        if av is not None:
            if (av.height, av.width) != x.shape[:2]:
                raise CompareError(f"{av.root}: avatar frames are {av.width}x{av.height}, the clips' "
                                   f"{x.shape[1]}x{x.shape[0]}")
            if order is None or i >= len(order):
                order = av.order(max(i + 1, 2 * len(order) if order is not None else 256), start_frame)
            x1, y1, x2, y2 = (int(v) for v in av.boxes[order[i]])
            row["box"] = [x1, y1, x2, y2]
            row["face"] = face.add(x[y1:y2, x1:x2], y[y1:y2, x1:x2])
        per.append(row)
        k += 1
    if k == 0:
        raise CompareError(f"{a}: no frames")
    result = {"a": str(a), "b": str(b), "frames": k, "whole": whole.total(), "per_frame": per}
    if av is not None:
        result.update(avatar=str(av.root), start_frame=start_frame, face=face.total())
    return result


def _span(ix: list[int]) -> str:
    return f"{ix[0]}..{ix[-1]}" if ix else "none"


# ---------------------------------------------------------------------------------------------- command line

def _db(v: float) -> str:
    return "inf" if math.isinf(v) else f"{v:.2f}"


def summary(result: dict) -> str:
    """A few lines: frames compared, then whole frame and face box figures."""
    lines = [f"{result['frames']} frames: {result['a']} vs {result['b']}"]
    for name in ("whole", "face"):
        if name in result:
            t = result[name]
            lines.append(f"{name:5s} PSNR {_db(t['psnr'])} dB (worst frame {_db(t['psnr_min'])}), SSIM {t['ssim']:.6f} "
                         f"(worst {t['ssim_min']:.6f}), |diff| max {t['max_abs']} mean {t['mean_abs']:.3g}")
    return "\n".join(lines)


def _jsonable(v):
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    return v


def write_json(result: dict, path: str | os.PathLike) -> None:
    """The result as JSON (an infinite PSNR, identical frames, as the string "inf"), written atomically."""
    from .video import check_writable

    path = check_writable(path)
    tmp = path.with_name(f".{path.name}.part")
    try:
        tmp.write_text(json.dumps(_jsonable(result), indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None


def add_parser(sub) -> None:
    """Register `compare` on the main command line's subparsers."""
    p = sub.add_parser(
        "compare", help="PSNR/SSIM/abs difference between two renders of a clip (MP4s or --frames-dir folders)",
        description="Compare two renders of the same clip frame by frame: PSNR and SSIM (scikit-image) of the whole "
                    "frame and, with --avatar, of the face box, plus the largest and mean absolute difference, per "
                    "frame and in total. Use it to check a backend or precision against the reference path (torch "
                    "fp32). Compare --frames-dir folders (lossless PNG) to see the model's difference alone; MP4s "
                    "add H.264's own loss. Exits 2 when the clips differ in length, frame indices or size.")
    p.add_argument("a", metavar="A", help="an MP4, or a folder of {i:06d}.png frames (generate --frames-dir)")
    p.add_argument("b", metavar="B", help="the same clip rendered another way (an MP4 or a folder too)")
    p.add_argument("--avatar", metavar="DIR", help="the avatar folder both were rendered from: adds the face-box "
                                                   "figures (frame i's box is its template's, in the ping-pong order)")
    p.add_argument("--start-frame", type=int, default=0, metavar="K",
                   help="the --start-frame both were rendered with (default 0), for the face boxes")
    p.add_argument("--json", metavar="OUT.json", help="also write every figure, per frame and in total, as JSON "
                                                      "(an infinite PSNR is written as \"inf\")")
    p.add_argument("--per-frame", action="store_true", help="print one line per frame too")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.json:
        from .avatar import avatar_inputs
        from .inputs import check_outputs
        from .video import check_writable

        check_outputs([("--json", args.json)], [("A", args.a), ("B", args.b), *(
            ("--avatar", p) for p in (avatar_inputs(args.avatar) if args.avatar else ()))])
        check_writable(args.json)
    result = compare(args.a, args.b, avatar=args.avatar, start_frame=args.start_frame)
    if args.per_frame:
        for row in result["per_frame"]:
            parts = [f"{k} PSNR {_db(row[k]['psnr'])} SSIM {row[k]['ssim']:.6f} max {row[k]['max_abs']}"
                     for k in ("whole", "face") if k in row]
            print(f"frame {row['frame']:6d}: " + ", ".join(parts))
    print(summary(result))
    if args.json:
        write_json(result, args.json)
    return 0

