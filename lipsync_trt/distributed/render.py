"""One batch worker: loads an avatar + checkpoints once per group and renders that group's jobs with `generate`.
Plain Python (the in-process batch runs it directly); `batch` wraps the same class as a Ray actor."""
from __future__ import annotations

import os
import socket
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import LipsyncError
from .jobs import Job
from .outputs import remove_partials

DONE, SKIPPED, FAILED = "done", "skipped", "failed"


@dataclass
class JobResult:
    """What became of one job: status (done, skipped, failed), the error, frames, seconds, and which worker/node."""

    line: int
    status: str
    error: str | None = None
    frames: int = 0
    seconds: float = 0.0
    worker: str | None = None
    node: str | None = None
    outputs: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _describe(exc: BaseException) -> str:
    """One line for the summary: a LipsyncError's own message, else the exception type and message."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text if isinstance(exc, LipsyncError) else f"{type(exc).__name__}: {text}"


class Renderer:
    """Holds the loaded models of the last `keep` groups (avatar + generator + audio encoder) and renders jobs.
    `threads`: the CPU threads ONNX Runtime may use (a Ray worker's share of the node); None = its default."""

    def __init__(self, backend: str = "auto", device: str = "auto", precision: str = "fp32",
                 engines: str | None = None, batch_size: int | None = None, threads: int | None = None,
                 keep: int = 1):
        self.backend, self.device, self.precision = backend, device, precision
        self.engines, self.batch_size, self.threads, self.keep = engines, batch_size, threads, max(1, keep)
        self._loaded: OrderedDict[tuple[str, str, str], object] = OrderedDict()

    def info(self) -> dict:
        """Which process on which machine this worker is (pid, host), for the summary and for tests."""
        return {"pid": os.getpid(), "host": socket.gethostname()}

    def load(self, group: tuple[str, str, str]):
        """The LipSync of a group, loaded now unless one of the last `keep` groups (a missing avatar or checkpoint
        raises its LipsyncError here)."""
        from .. import api

        if group in self._loaded:
            self._loaded.move_to_end(group)
            return self._loaded[group]
        while len(self._loaded) >= self.keep:
            self._loaded.popitem(last=False)
        options = {"engines": self.engines} if self.engines else {}
        if self.threads:
            options["threads"] = self.threads
        avatar, generator, audio_encoder = group
        ls = api.load(avatar, generator, audio_encoder, backend=self.backend, device=self.device,
                      precision=self.precision, batch_size=self.batch_size, **options)
        self._loaded[group] = ls
        return ls

    def prepare(self, group: tuple[str, str, str]) -> str | None:
        """Load a group's models (so other workers can then load from the built artifacts); the error, or None."""
        try:
            self.load(group)
        except Exception as exc:
            return _describe(exc)
        return None

    def render(self, job: Job) -> JobResult:
        """Render one job with `generate` (outputs written atomically); any error is recorded, not raised."""
        from .. import api

        me = self.info()
        result = JobResult(line=job.line, status=FAILED, worker=f"{me['pid']}@{me['host']}", node=me["host"],
                           outputs=job.outputs)
        t0 = time.perf_counter()
        try:
            loaded = self.load(job.group)
            t0 = time.perf_counter()   # a job's seconds are its own; loading the group's models is not counted
            ls = api.LipSync(loaded.avatar, loaded.runner, batch_size=loaded.batch_size, start_frame=job.start_frame)
            for target in job.outputs:   # a batch may sort its clips into folders that do not exist yet
                Path(target).parent.mkdir(parents=True, exist_ok=True)
            remove_partials(job)   # what a killed earlier attempt left (temporary files only)
            summary = ls.generate(job.audio, job.out, frames_dir=job.frames_dir, frames=job.frames, crf=job.crf,
                                  preset=job.preset)
            result.status, result.frames = DONE, summary.frames
        except Exception as exc:
            result.error = _describe(exc)
        result.seconds = time.perf_counter() - t0
        return result
