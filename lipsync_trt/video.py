"""MP4 output with PyAV: H.264 video at 25 fps plus the input audio as AAC, written atomically."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from . import recipe as R
from .errors import OutputError

DEFAULT_CRF = 20             # the reference's ffmpeg -crf 20
REFERENCE_PRESET = "medium"  # ffmpeg's default x264 preset, what the reference encodes with
DEFAULT_PRESET = "veryfast"  # ours: less encode time than medium at a similar size (measured: docs/BENCHMARKS.md)
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")

_BT601 = 6       # AVCOL_SPC_SMPTE170M
_TV_RANGE = 1    # AVCOL_RANGE_MPEG (16-235)


def check_writable(path: str | os.PathLike) -> Path:
    """Fail early (before any rendering) when `path`'s folder does not exist or cannot be written, or when `path`
    exists and is not a regular file (a folder, device, pipe or socket is never replaced by the output)."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; expected a file name such as out.mp4")
    if path.exists() and not path.is_file():
        raise OutputError(f"{path}: exists and is not a regular file (a device, pipe or socket); refusing to "
                          f"replace it, give a file name such as out.mp4")
    if not folder.is_dir():
        raise OutputError(f"{path}: output folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: output folder {folder} is not writable")
    return path


def umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask can only set it)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1], 8) for ln in f if ln.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def file_mode() -> int:
    """The mode a plain open() would give a new file (mkstemp's files are 0600)."""
    return 0o666 & ~umask()


def io_reason(exc: BaseException) -> str:
    """A short reason for an I/O failure ('No space left on device'), for one-line errors."""
    return getattr(exc, "strerror", None) or str(exc).strip().splitlines()[0][:200] or type(exc).__name__


class VideoWriter:
    """Context manager: frames (H, W, 3) uint8 BGR in, an MP4 out. The file appears only on success;
    on any exception (Ctrl-C included) the temporary file is removed. The encoders open at the first frame,
    so `write` may run in another thread than `__enter__` (x264's threads start in the writing one)."""

    def __init__(self, path: str | os.PathLike, width: int, height: int, audio: np.ndarray | None = None,
                 audio_rate: int = R.SAMPLE_RATE, fps: int = int(R.FPS), crf: int = DEFAULT_CRF,
                 codec: str = "libx264", threads: int = 0, preset: str = DEFAULT_PRESET):
        self.path = check_writable(path)
        if width % 2 or height % 2:
            raise OutputError(f"{self.path}: H.264 yuv420p needs even frame sizes, the avatar is {width}x{height}")
        self.width, self.height, self.fps, self.crf, self.codec, self.threads = width, height, fps, crf, codec, threads
        if preset not in X264_PRESETS:
            raise OutputError(f"unknown x264 preset {preset!r}; expected one of {', '.join(X264_PRESETS)}")
        self.preset = preset
        self.audio, self.audio_rate = audio, audio_rate
        self.frames = 0
        self._container = None
        self._started = False

    def __enter__(self) -> "VideoWriter":
        import av

        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".part.mp4", dir=self.path.parent or ".")
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot create the output file ({exc.strerror})") from None
        os.close(fd)
        self._tmp = Path(tmp)
        try:
            self._container = av.open(str(self._tmp), mode="w", format="mp4")
            try:
                vs = self._container.add_stream(self.codec, rate=self.fps)
            except Exception as exc:
                raise OutputError(f"video codec {self.codec!r} is not available in this PyAV/FFmpeg ({exc})") from None
            vs.width, vs.height, vs.pix_fmt = self.width, self.height, "yuv420p"
            # what `write` produces (OpenCV's I420): BT.601 matrix, limited range; tagged so players agree
            vs.codec_context.colorspace, vs.codec_context.color_range = _BT601, _TV_RANGE
            if self.codec == "libx264":
                vs.options = {"crf": str(self.crf), "preset": self.preset}
            vs.thread_count = self.threads
            self._video = vs
            self._audio_stream = self._add_audio_stream() if self.audio is not None and len(self.audio) else None
        except BaseException:
            self._abort()
            raise
        return self

    def _add_audio_stream(self):
        samples = np.asarray(self.audio, dtype=np.float32)
        self.audio = samples[:, None] if samples.ndim == 1 else samples
        layout = "mono" if self.audio.shape[1] == 1 else "stereo"
        if self.audio.shape[1] > 2:
            self.audio, layout = self.audio.mean(axis=1, keepdims=True), "mono"
        return self._container.add_stream("aac", rate=self.audio_rate, layout=layout)

    def _start(self) -> None:
        """Open the encoders (PyAV does at the first mux) and write the audio track. Done at the first frame, in
        the thread that writes, so that x264's threads start there and inherit its priority
        (`pipeline.yield_to_model`)."""
        import av

        self._started = True
        stream = self._audio_stream
        if stream is None:
            return
        planar = np.ascontiguousarray(self.audio.T)
        chunk = 1024
        for start in range(0, planar.shape[1], chunk):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(planar[:, start:start + chunk]),
                                               format="fltp", layout=stream.layout.name)
            frame.sample_rate = self.audio_rate
            frame.pts = start
            for packet in stream.encode(frame):
                self._container.mux(packet)
        for packet in stream.encode(None):
            self._container.mux(packet)

    def write(self, frame_bgr: np.ndarray) -> None:
        """Encode one (H, W, 3) uint8 BGR frame. OpenCV converts it to I420 (BT.601, limited range, as
        FFmpeg's swscale would), several times faster than swscale's bgr24 path (docs/BENCHMARKS.md)."""
        import av
        import cv2

        if frame_bgr.shape != (self.height, self.width, 3) or frame_bgr.dtype != np.uint8:
            raise OutputError(f"{self.path}: frame {self.frames} is {frame_bgr.dtype} {tuple(frame_bgr.shape)}, "
                              f"expected uint8 ({self.height}, {self.width}, 3) BGR")
        try:
            if not self._started:
                self._start()
            yuv = cv2.cvtColor(np.ascontiguousarray(frame_bgr), cv2.COLOR_BGR2YUV_I420)
            frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
            frame.pts = self.frames
            self.frames += 1
            for packet in self._video.encode(frame):
                self._container.mux(packet)
        except (OSError, av.FFmpegError) as exc:   # disk full, file too large, I/O error
            raise OutputError(f"{self.path}: cannot write the video ({io_reason(exc)})") from None

    def _abort(self) -> None:
        try:
            if self._container is not None:
                self._container.close()
        except Exception:
            pass
        self._tmp.unlink(missing_ok=True)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._abort()
            return
        import av

        try:
            if not self._started:
                self._start()
            for packet in self._video.encode(None):
                self._container.mux(packet)
            self._container.close()
            os.chmod(self._tmp, file_mode())
            os.replace(self._tmp, self.path)
        except (OSError, av.FFmpegError) as err:
            self._abort()
            raise OutputError(f"{self.path}: cannot write the video ({io_reason(err)})") from None
        except BaseException:
            self._abort()
            raise


class FramesDir:
    """Context manager for a `--frames-dir` folder written all or nothing: PNGs go into a hidden temporary folder
    beside it, moved into place when the block succeeds and removed when it fails or is interrupted. A new folder
    appears whole (renamed into place; missing parent folders are created, and removed again on failure); into an
    existing folder the new frames are moved at the end, replacing same-numbered files and leaving the others."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise OutputError(f"{self.path}: exists and is not a folder; expected a folder for the PNG frames")
        self.parent = self.path.parent if str(self.path.parent) else Path(".")
        existing = self.parent
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise OutputError(f"{self.path}: {existing} is not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise OutputError(f"{self.path}: folder {existing} is not writable")
        self.tmp: Path | None = None
        self._made: list[Path] = []     # parent folders this run created (removed again on failure)

    def __enter__(self) -> "FramesDir":
        missing = [p for p in [self.parent, *self.parent.parents] if not p.exists()]
        try:
            for folder in reversed(missing):
                folder.mkdir()
                self._made.append(folder)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".part", dir=self.parent))
        except OSError as exc:
            self._undo()
            raise OutputError(f"{self.path}: cannot create the frames folder ({exc.strerror})") from None
        return self

    def write(self, index: int, frame_bgr: np.ndarray) -> None:
        """Write frame `index` as {index:06d}.png (lossless)."""
        write_png(self.tmp / f"{index:06d}.png", frame_bgr, final=self.path / f"{index:06d}.png")

    def _undo(self) -> None:
        import shutil

        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        for folder in reversed(self._made):
            try:
                folder.rmdir()
            except OSError:
                break

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._undo()
            return
        try:
            os.chmod(self.tmp, 0o777 & ~umask())   # mkdtemp's folders are 0700; a mkdir's are not
            if not self.path.exists():
                os.rename(self.tmp, self.path)
                return
            for entry in sorted(os.scandir(self.tmp), key=lambda e: e.name):
                os.replace(entry.path, self.path / entry.name)
            self.tmp.rmdir()
        except OSError as err:
            self._undo()
            raise OutputError(f"{self.path}: cannot move the frames into place ({err.strerror})") from None


def write_png(path: Path, frame_bgr: np.ndarray, final: Path | None = None) -> None:
    """Lossless PNG of a BGR frame (RGB in the file), written atomically; errors name `final` when given."""
    import cv2

    ok, buf = cv2.imencode(".png", frame_bgr)
    if not ok:
        raise OutputError(f"{path}: PNG encoding failed")
    tmp = path.with_name(f".{path.name}.part")
    try:
        tmp.write_bytes(buf.tobytes())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{final or path}: cannot write ({exc.strerror})") from None
