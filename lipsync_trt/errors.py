"""One exception type per kind of bad input; the CLI turns any of them into exit code 2 and one line
(`run_command`, shared by every command)."""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Callable


class LipsyncError(Exception):
    """Base class: a problem with the user's input or environment, reported without a traceback."""


class AudioError(LipsyncError):
    """The audio file or array cannot be used (unreadable, empty, too short, non-finite)."""


class AvatarError(LipsyncError):
    """The avatar folder is incomplete or inconsistent (frames, landmarks, boxes)."""


class CheckpointError(LipsyncError):
    """A checkpoint file is missing, unreadable or does not fit the model."""


class BackendError(LipsyncError):
    """A backend was asked for that cannot run here, or an engine artifact is unusable."""


class OutputError(LipsyncError):
    """An output path cannot be written."""


class UsageError(LipsyncError):
    """Command-line arguments that contradict each other or are out of range."""


class StreamError(LipsyncError):
    """A live stream used out of order (a push after close) or failed while making its frames."""


class CompareError(LipsyncError):
    """Two clips that `compare` cannot compare: unreadable, of different lengths or frame sizes, or no SSIM library."""


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that outputs are cleaned up as on Ctrl-C."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


@contextlib.contextmanager
def _sigterm_as_exception():
    """While a command runs, SIGTERM unwinds like Ctrl-C (temporary outputs removed) instead of killing at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_command(command: Callable[[], int]) -> int:
    """Run a command: its own exit code, 2 with one `error: ...` line for bad input (LipsyncError), 130 on
    Ctrl-C, 143 on SIGTERM (outputs cleaned up as the exception unwinds)."""
    try:
        with _sigterm_as_exception():
            return command()
    except LipsyncError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
