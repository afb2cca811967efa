"""The inputs of an offline benchmark run: avatar, checkpoints (seeded when none are given) and the audio cut to
the first --frames video frames."""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path

from .. import audio as A
from .. import recipe as R


def frames_for_samples(n16k: int) -> int:
    """Video frames that `n16k` samples at 16 kHz make (recipe.num_frames; 0 when there is not one window)."""
    return R.num_frames(n16k) if n16k >= R.MIN_SAMPLES else 0


@dataclass
class Inputs:
    """What every configuration runs on: the avatar, the checkpoints and the audio cut for each metric."""
    avatar_dir: Path
    audio_src: Path
    generator: Path
    audio_encoder: Path
    e2e_wav: Path            # the audio under the first `frames` video frames
    audio_wav: Path          # `audio_seconds` of audio for the audio-path metric
    frames: int
    indices: list[int] | None   # None: the trimmed clip makes exactly `frames` frames
    audio_seconds: float
    demo: bool
    seeded_weights: bool
    notes: list[str] = field(default_factory=list)


def make_inputs(args: argparse.Namespace, tmp: Path) -> Inputs:
    """The avatar, checkpoints and WAVs of the run from --demo or --avatar/--audio (written under tmp)."""
    from .. import demo as D

    notes = []
    if args.demo:
        d = D.make_demo(tmp / "demo", seconds=max(2.0, args.frames / R.FPS + 1.0, args.audio_seconds + 0.5))
        avatar_dir, audio_src, gen, enc = d["avatar"], d["audio"], d["generator"], d["audio_encoder"]
        notes.append(D.UNTRAINED_NOTE)
        seeded = True
    else:
        if not args.avatar or not args.audio:
            raise SystemExit("bench: give --avatar DIR and --audio WAV (an avatar folder in SyncTalk_2D's layout "
                             "and a speech WAV), or --demo")
        avatar_dir, audio_src = Path(args.avatar), Path(args.audio)
        seeded = not (args.generator and args.audio_encoder)
        if seeded:
            if args.generator or args.audio_encoder:
                raise SystemExit("bench: give both --generator and --audio-encoder, or neither (seeded weights)")
            gen, enc = D.demo_checkpoints(tmp / "weights")
            notes.append("no --generator/--audio-encoder given: using seeded random weights from "
                         "lipsync_trt.demo.demo_checkpoints (same architecture; speed does not depend on weight values)")
        else:
            gen, enc = Path(args.generator), Path(args.audio_encoder)
    data, rate = A.load(audio_src)
    # the first `frames` video frames: trim the audio to the shortest span that makes them
    n16 = R.MIN_SAMPLES
    while frames_for_samples(n16) < args.frames:
        n16 += R.HOP_LENGTH
    exact = frames_for_samples(n16) == args.frames
    n_src = int(math.ceil(n16 * rate / R.SAMPLE_RATE))
    if n_src > len(data):
        raise SystemExit(f"bench: {audio_src} is {len(data) / rate:.2f} s; --frames {args.frames} needs "
                         f"{n_src / rate:.2f} s")
    e2e = D.write_wav(tmp / "e2e.wav", data[:n_src], rate)
    e2e_frames = frames_for_samples(len(A.load_16k(e2e)))
    indices = None if (exact and e2e_frames == args.frames) else list(range(args.frames))
    secs = min(args.audio_seconds, len(data) / rate)
    aud = D.write_wav(tmp / "audio_path.wav", data[:int(secs * rate)], rate)
    return Inputs(avatar_dir, audio_src, Path(gen), Path(enc), e2e, aud, args.frames, indices, secs, args.demo,
                  seeded, notes)
