"""One exception type per kind of bad input; the CLI turns any of them into exit code 2 and one line."""


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
