"""Whether a job's outputs are already complete (so a rerun skips it), and the leftovers of a killed attempt."""
from __future__ import annotations

import glob
import shutil
from pathlib import Path

from .jobs import Job


def expected_frames(job: Job) -> list[int]:
    """The video frame indices the job renders: its `frames` selection, or every frame its audio makes."""
    from .. import audio as A
    from .. import recipe as R
    from ..pipeline import parse_frames

    total = R.num_frames(len(A.load_16k(job.audio)))
    return list(range(total)) if job.frames is None else parse_frames(job.frames, total)


def mp4_frames(path: str | Path) -> int | None:
    """Video frames in an MP4 (from its index, else by counting packets), or None if it is not a readable MP4."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return None
            stream = container.streams.video[0]
            if stream.frames:
                return int(stream.frames)
            return sum(1 for p in container.demux(stream) if p.size)
    except Exception:   # PyAV raises its own error types for truncated or foreign files
        return None


def is_complete(job: Job) -> bool:
    """True when every output of the job exists with all its frames: the MP4 (written atomically) holds as many
    video frames as the job renders, and frames_dir holds each {i:06d}.png. Unreadable audio -> False (the
    job then runs and reports why)."""
    if any(not Path(p).exists() for p in job.outputs):
        return False
    try:
        indices = expected_frames(job)
    except Exception:
        return False
    if job.out and mp4_frames(job.out) != len(indices):
        return False
    if job.frames_dir:
        folder = Path(job.frames_dir)
        if not all((folder / f"{i:06d}.png").is_file() for i in indices):
            return False
    return True


def remove_partials(job: Job) -> list[Path]:
    """Remove the hidden temporary files/folders (.NAME.*.part*) that a killed attempt at this job left beside its
    outputs; the outputs themselves are never half-written. Returns what was removed."""
    removed = []
    for target in job.outputs:
        target = Path(target)
        if not target.parent.is_dir():
            continue
        for leftover in target.parent.glob(f".{glob.escape(target.name)}.*.part*"):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
            removed.append(leftover)
    return removed
