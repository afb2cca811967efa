"""JOBS.jsonl: one `generate` job a line, parsed and checked before anything renders (a bad line names its number)."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import video as V
from ..errors import UsageError
from ..inputs import MAX_JOBS_BYTES, read_file

PATH_FIELDS = ("avatar", "audio", "generator", "audio_encoder", "out", "frames_dir")
REQUIRED = ("avatar", "audio", "generator", "audio_encoder")
FIELDS = (*PATH_FIELDS, "frames", "start_frame", "crf", "preset")


class JobsError(UsageError):
    """A JOBS.jsonl file that cannot be used: unreadable, or a line that is not a valid job."""


@dataclass(frozen=True)
class Job:
    """One clip to render, as `generate` takes it; paths absolute (relative ones are resolved against the
    JOBS file's folder, so the file means the same on every node of a cluster with a shared filesystem)."""

    line: int
    avatar: str
    audio: str
    generator: str
    audio_encoder: str
    out: str | None = None
    frames_dir: str | None = None
    frames: str | None = None
    start_frame: int = 0
    crf: int = V.DEFAULT_CRF
    preset: str = V.DEFAULT_PRESET

    @property
    def group(self) -> tuple[str, str, str]:
        """What a worker loads once and reuses for every job of the group: avatar + both checkpoints."""
        return self.avatar, self.generator, self.audio_encoder

    @property
    def outputs(self) -> list[str]:
        return [p for p in (self.out, self.frames_dir) if p]

    def to_dict(self) -> dict:
        return asdict(self)


def _error(source: str, line: int, what: str) -> JobsError:
    return JobsError(f"{source}:{line}: {what}")


def parse_job(record: object, line: int, base: Path, source: str = "JOBS") -> Job:
    """One decoded JSON value -> a Job, or JobsError naming `source:line` and what was expected."""
    if not isinstance(record, dict):
        raise _error(source, line, f"expected a JSON object with {', '.join(REQUIRED)} and out and/or frames_dir, "
                                   f"got {type(record).__name__}")
    unknown = sorted(set(record) - set(FIELDS))
    if unknown:
        raise _error(source, line, f"unknown field(s) {', '.join(map(repr, unknown))}; expected some of "
                                   f"{', '.join(FIELDS)}")
    missing = [k for k in REQUIRED if not record.get(k)]
    if missing:
        raise _error(source, line, f"missing {', '.join(missing)} (every job needs {', '.join(REQUIRED)})")
    if not record.get("out") and not record.get("frames_dir"):
        raise _error(source, line, "nothing to write: give out (an .mp4 path) and/or frames_dir")
    fields: dict = {}
    for key in PATH_FIELDS:
        value = record.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            raise _error(source, line, f"{key} must be a non-empty path string, got {value!r}")
        fields[key] = str((base / os.path.expanduser(value)).resolve())
    frames = record.get("frames")
    if frames is not None:
        if isinstance(frames, list) and frames and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                       for i in frames):
            frames = ",".join(map(str, frames))
        elif not isinstance(frames, str) or not frames.strip():
            raise _error(source, line, f"frames must be a string like '0-99,120' or a list of frame indices, "
                                       f"got {frames!r}")
        fields["frames"] = frames
    for key, lo, hi in (("start_frame", 0, None), ("crf", 0, 51)):
        if key in record:
            value = record[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < lo or (hi is not None and value > hi):
                bound = f"{lo}..{hi}" if hi is not None else f">= {lo}"
                raise _error(source, line, f"{key} must be an integer {bound}, got {value!r}")
            fields[key] = value
    if "preset" in record:
        if record["preset"] not in V.X264_PRESETS:
            raise _error(source, line, f"preset must be one of {', '.join(V.X264_PRESETS)}, got {record['preset']!r}")
        fields["preset"] = record["preset"]
    return Job(line=line, **fields)


def load_jobs(path: str | os.PathLike) -> list[Job]:
    """Every job of a JOBS.jsonl file (blank lines ignored); two jobs writing the same output are an error."""
    path = Path(path)
    data = read_file(path, "jobs file", JobsError, MAX_JOBS_BYTES)   # a regular file, bounded: never a FIFO
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JobsError(f"{path}: cannot read the jobs file ({exc})") from None
    base = path.resolve().parent
    jobs: list[Job] = []
    owners: dict[str, int] = {}
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise _error(str(path), n, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
        job = parse_job(record, n, base, str(path))
        for out in job.outputs:
            if out in owners:
                raise _error(str(path), n, f"writes {out}, which line {owners[out]} writes too")
            owners[out] = n
        jobs.append(job)
    if not jobs:
        raise JobsError(f"{path}: no jobs (expected one JSON object a line)")
    return jobs
