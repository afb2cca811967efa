"""The files a run reads and writes, checked before any work: every input must be a regular file (after following
links) of a sane size, checked without opening it (a FIFO would block the open, /dev/zero never ends), and no output
may be, lie inside or contain an input of the same run (it would be overwritten). Errors name the path."""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO, Iterable

from .errors import LipsyncError, OutputError

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30

# Size bounds, from the real data (sanders: 523 frames of 1280x720, /work/shared/datasets/sanders) with a wide margin.
MAX_JPEG_BYTES = 64 * MIB          # sanders' largest template is 57 KB; an uncompressed 4096x4096 RGB frame is 48 MiB
MAX_LANDMARKS_BYTES = 64 * KIB     # sanders' .lms are 990 bytes (110 integer "x y" lines, CRLF); 110 lines of two
                                   # 17-digit floats are under 4.5 KiB
MAX_CHECKPOINT_BYTES = 1 * GIB     # the generator's fp32 state_dict is 49 MB, the audio encoder's 11 MB; a training
                                   # checkpoint with Adam's two moments beside the weights about 150 MB
MAX_AUDIO_BYTES = 4 * GIB          # a RIFF WAV cannot be larger (32-bit sizes): 6 h of 48 kHz 16-bit stereo
MAX_JOBS_BYTES = 64 * MIB          # a batch JOBS.jsonl line is about 300 bytes: 200,000 jobs
MAX_PNG_BYTES = 256 * MIB          # compare's frames: the largest it accepts (MAX_FRAME_PIXELS) as 16-bit RGBA
                                   # uncompressed is 134 MB
MAX_VIDEO_BYTES = 64 * GIB         # compare's MP4s: 24 h of 1280x720 at 6 Mbit/s is 65 GB

# compare's frame size bound, read from the PNG header or the MP4 stream before decoding: 4096x4096 pixels in all
# (4K UHD and DCI 4K fit), 8192 a side. Comparing a pair peaks at about 150 bytes a pixel (measured at 2000x2000:
# int32/int64 differences, SSIM's float64 planes): 2.5 GB at the bound (20000x20000 would take 60 GB)
MAX_FRAME_SIDE = 8192
MAX_FRAME_PIXELS = 4096 * 4096

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a file")


def _printable(path: str | os.PathLike) -> str:
    text = os.fspath(path)
    return repr(text) if isinstance(text, bytes) or any(c in text for c in "\0\n\r") else text


def _check_stat(st: os.stat_result, path: str, what: str, error: type[LipsyncError], max_bytes: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: {what} is {_kind(st.st_mode)}, not a regular file")
    if st.st_size > max_bytes:
        raise error(f"{path}: {what} is {st.st_size} bytes; at most {max_bytes} are accepted")


def check_file(path: str | os.PathLike, what: str, error: type[LipsyncError], max_bytes: int) -> Path:
    """`path` after checking, without opening it, that it names a regular file (links followed) of at most
    `max_bytes`; else `error` naming it, the `what` ('audio file', 'template frame') and the problem."""
    shown = _printable(path)
    try:
        st = os.stat(path)
    except ValueError:   # an embedded NUL byte
        raise error(f"{shown}: {what} path holds a NUL byte") from None
    except FileNotFoundError:
        raise error(f"{shown}: {what} not found") from None
    except OSError as exc:
        raise error(f"{shown}: cannot read the {what} ({exc.strerror})") from None
    _check_stat(st, shown, what, error, max_bytes)
    return Path(path)


def open_file(path: str | os.PathLike, what: str, error: type[LipsyncError], max_bytes: int) -> BinaryIO:
    """The file opened for binary reading after `check_file`; opened without blocking and checked again on the open
    descriptor, so a file swapped for a FIFO or device in between is refused too."""
    check_file(path, what, error, max_bytes)
    shown = _printable(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise error(f"{shown}: cannot read the {what} ({exc.strerror})") from None
    try:
        _check_stat(os.fstat(fd), shown, what, error, max_bytes)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_file(path: str | os.PathLike, what: str, error: type[LipsyncError], max_bytes: int) -> bytes:
    """The bytes of a regular file of at most `max_bytes` (`open_file`); never more are read, even if it grows."""
    with open_file(path, what, error, max_bytes) as f:
        try:
            data = f.read(max_bytes + 1)
        except OSError as exc:
            raise error(f"{_printable(path)}: cannot read the {what} ({exc.strerror})") from None
    if len(data) > max_bytes:
        raise error(f"{_printable(path)}: {what} grew past {max_bytes} bytes while it was read")
    return data


# ------------------------------------------------------------------------------------------------ outputs vs inputs

def resolve(path: str | os.PathLike, label: str, error: type[LipsyncError] = OutputError) -> Path:
    """The absolute path with links and '..' resolved (as far as it exists); a NUL byte is `error`, one line."""
    try:
        return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))
    except (ValueError, TypeError):
        raise error(f"{label} {_printable(path)}: the path holds a NUL byte") from None


def clash(output: Path, input_: Path) -> str | None:
    """How a resolved output meets a resolved input: 'is', 'lies inside', 'contains', or None when apart."""
    if output == input_ or _same_file(output, input_):
        return "is"
    if output.is_relative_to(input_):
        return "lies inside"
    if input_.is_relative_to(output):
        return "contains"
    return None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)   # a bind mount or hard link of the same file
    except OSError:
        return False


def check_outputs(outputs: Iterable[tuple[str, str | os.PathLike | None]],
                  inputs: Iterable[tuple[str, str | os.PathLike | None]]) -> None:
    """OutputError, before any work, when an output is an input of the same run, lies inside one or contains one, or
    when one output lies inside another (compared with links and '..' resolved). (label, path) pairs; None skipped."""
    outs = [(label, p, resolve(p, label)) for label, p in outputs if p is not None]
    ins = [(label, p, resolve(p, label)) for label, p in inputs if p is not None]
    for label, given, out in outs:
        for in_label, in_given, inp in ins:
            how = clash(out, inp)
            if how:
                raise OutputError(f"{label} {_printable(given)}: {how} the input {in_label} {_printable(in_given)}; "
                                  f"refusing to write over an input, choose another output path")
    for i, (label, given, out) in enumerate(outs):
        for other_label, other_given, other in outs[i + 1:]:
            how = clash(out, other)
            if how:
                raise OutputError(f"{label} {_printable(given)}: {how} the output {other_label} "
                                  f"{_printable(other_given)}; give outputs that do not overlap")
