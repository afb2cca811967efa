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
    """SIGTERM or SIGHUP, raised in the main thread so that outputs are cleaned up as on Ctrl-C."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signum)
        self.signum = int(signum)


# The signals a command unwinds on (temporary outputs removed): Ctrl-C, a kill, a closed terminal or SSH session.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_stopping = threading.Event()   # a stop signal arrived: the command is unwinding, later ones must not interrupt that


def signal_exception(signum: int) -> BaseException:
    """The exception a stop signal unwinds a command with: KeyboardInterrupt for SIGINT, else Terminated."""
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


RESEND_S = 0.05   # a signal that landed where its exception would be swallowed is delivered again this much later


def _swallowed_here(frame) -> bool:
    """Whether an exception raised in this frame is swallowed ("Exception ignored in ..."): importlib runs weakref
    callbacks (its module locks') while a module is imported, and drops what they raise."""
    return frame is not None and frame.f_code.co_filename.startswith("<frozen importlib")


_resending = threading.Event()   # a resend is pending (one at a time)


def _resend(signum: int) -> None:
    """Deliver the signal again, unless the command has ended (its handler gone) or is unwinding already."""
    import os

    _resending.clear()
    if not _stopping.is_set() and signal.getsignal(signum) is _on_stop_signal:
        os.kill(os.getpid(), signum)


def _on_stop_signal(signum, frame) -> None:
    if _stopping.is_set():   # already unwinding (a second Ctrl-C, SIGHUP then SIGTERM): let the clean-up finish
        return
    if _swallowed_here(frame):   # raising here would be lost and the command run on: the signal comes again soon
        if not _resending.is_set():
            _resending.set()
            threading.Timer(RESEND_S, _resend, (signum,)).start()
        return
    _stopping.set()
    raise signal_exception(signum)


@contextlib.contextmanager
def _stop_signals_as_exceptions():
    """While a command runs, SIGINT, SIGTERM and SIGHUP unwind it (outputs cleaned up by the exception) instead of
    killing it at once; a signal that arrives while it unwinds is ignored. A signal ignored at start (nohup, a
    background job of a script) stays ignored. In the main thread only (signals are delivered there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _stopping.clear()
    previous = {}
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, _on_stop_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stop_message(signum: int) -> str:
    """The one line a command ends with when a stop signal ended it."""
    return {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated",
            signal.SIGHUP: "terminated: hangup (SIGHUP: the terminal or session closed)"}.get(
        signum, f"terminated by signal {signum}")


def run_command(command: Callable[[], int]) -> int:
    """Run a command: its own exit code, 2 with one `error: ...` line for bad input (LipsyncError), 128 + the
    signal with one line when SIGINT (130), SIGTERM (143) or SIGHUP (129) stopped it, wherever it was (imports,
    loading, export, render, encode), its temporary outputs removed as the exception unwound. Call it first:
    the command's own imports belong inside `command`."""
    try:
        with _stop_signals_as_exceptions():
            return command()
    except LipsyncError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(stop_message(signal.SIGINT), file=sys.stderr)
        return 128 + signal.SIGINT
    except Terminated as exc:
        print(stop_message(exc.signum), file=sys.stderr)
        return 128 + exc.signum
