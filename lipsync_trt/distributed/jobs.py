"""JOBS.jsonl: one `generate` job a line, parsed and checked before anything renders (a bad line names its number)."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import video as V
from ..errors import LipsyncError, UsageError
from ..avatar import avatar_inputs
from ..inputs import MAX_JOBS_BYTES, check_outputs, read_file

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

    def inputs(self) -> list[tuple[str, str]]:
        """(field, path) of what the job reads: its audio, checkpoints and the avatar's frames and landmarks."""
        return [("audio", self.audio), ("generator", self.generator), ("audio_encoder", self.audio_encoder),
                *(("avatar", os.path.realpath(p)) for p in avatar_inputs(self.avatar))]

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
        if "\0" in value:
            raise _error(source, line, f"{key} {value!r}: the path holds a NUL byte")
        fields[key] = str((base / os.path.expanduser(value)).resolve())
    frames = record.get("frames")
    if frames is not None:
        if isinstance(frames, list) and frames and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                       for i in frames):
            frames = ",".join(map(str, frames))
        elif not isinstance(frames, str) or not frames.strip():
            raise _error(source, line, f"frames must be a string like '0-99,120' or a list of frame indices, "
                                       f"got {frames!r}")
        from ..pipeline import frame_ranges

        try:
            frame_ranges(frames, "frames")   # the syntax now; the indices against the clip's length when it runs
        except UsageError as exc:
            raise _error(source, line, str(exc)) from None
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
    job = Job(line=line, **fields)
    try:   # an output that is, lies inside or contains one of the job's own inputs, or its other output
        check_outputs([("out", job.out), ("frames_dir", job.frames_dir)], job.inputs())
    except LipsyncError as exc:
        raise _error(source, line, str(exc)) from None
    return job


def load_jobs(path: str | os.PathLike) -> list[Job]:
    """Every job of a JOBS.jsonl file (blank lines ignored), each line checked whole before any job runs: a job
    whose output is, lies inside or contains another job's output or one of any job's inputs is an error."""
    path = Path(path)
    data = read_file(path, "jobs file", JobsError, MAX_JOBS_BYTES)   # a regular file, bounded: never a FIFO
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JobsError(f"{path}: cannot read the jobs file ({exc})") from None
    base = path.resolve().parent
    jobs: list[Job] = []
    outputs = _Paths()
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise _error(str(path), n, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
        except RecursionError:
            raise _error(str(path), n, "not valid JSON for a job (nested too deeply)") from None
        job = parse_job(record, n, base, str(path))
        for out in job.outputs:
            other = outputs.meets(out)
            if other:
                raise _error(str(path), n, f"writes {out}, {_which(*other)} writes too")
        for out in job.outputs:
            outputs.add(out, n)
        jobs.append(job)
    if not jobs:
        raise JobsError(f"{path}: no jobs (expected one JSON object a line)")
    inputs = _Paths()
    for job in jobs:
        for field, p in job.inputs():
            inputs.add(p, job.line, field)
    for job in jobs:
        for out in job.outputs:
            other = inputs.meets(out)
            if other:
                raise _error(str(path), job.line, f"writes {out}, {_which(*other)} reads")
    return jobs


def _which(how: str, where: str, line: str) -> str:
    return f"which line {line}" if how == "is" else f"which {how} {where}, which line {line}"


class _Paths:
    """Resolved paths with the line (and field) of each, asked whether a path is one of them, lies inside one or
    contains one: in time linear in the path's depth, so a jobs file of 200,000 lines is checked at once."""

    def __init__(self):
        self.exact: dict[str, tuple[int, str]] = {}
        self.inside: dict[str, tuple[str, int, str]] = {}   # every folder above a path -> (that path, line, field)

    def add(self, p: str, line: int, field: str = "") -> None:
        self.exact.setdefault(p, (line, field))
        for parent in Path(p).parents:
            self.inside.setdefault(str(parent), (p, line, field))

    def meets(self, p: str) -> tuple[str, str, str] | None:
        """(how, which path, 'N' or 'N (its field)') for the first path `p` is, lies inside or contains; or None."""
        def at(line: int, field: str) -> str:
            return f"{line} (its {field})" if field else str(line)
        if p in self.exact:
            return "is", p, at(*self.exact[p])
        for parent in Path(p).parents:
            if str(parent) in self.exact:
                return "lies inside", str(parent), at(*self.exact[str(parent)])
        if p in self.inside:
            q, line, field = self.inside[p]
            return "contains", q, at(line, field)
        return None
