"""The Python API: load an avatar and its checkpoints once, then render many clips."""
from __future__ import annotations

import os
import threading
import weakref
from typing import Iterator

import numpy as np
import torch

from . import audio as A
from . import avatar as avatar_mod
from . import backends
from . import compose
from . import pipeline
from . import recipe as R
from . import video
from .batcher import Batcher
from .errors import UsageError
from .live import Live
from .stream import Stream


class LipSync:
    """A loaded avatar + backend. Frames are uint8 (H, W, 3) in BGR order (OpenCV's); use [..., ::-1] for RGB."""

    def __init__(self, avatar: avatar_mod.Avatar, runner: backends.Runner, batch_size: int | None = None,
                 start_frame: int = 0, blend: str = "none"):
        self.avatar = avatar
        self.feather = compose.parse_blend(blend)   # default edge blend in pixels (0: the reference's hard paste)
        self.runner = runner
        self.batch_size = batch_size or pipeline.default_batch_size(runner)
        self.start_frame = start_frame
        avatar.order(2, start_frame)   # validate now, not at the first clip
        self._lock = threading.Lock()
        self._templates: compose.TemplateCrops | None = None
        self._batcher: Batcher | None = None

    def _feather(self, blend: str | None) -> int:
        """A call's `blend` as feather pixels; None keeps the one given to `load`."""
        return self.feather if blend is None else compose.parse_blend(blend)

    def features(self, audio: str | os.PathLike | np.ndarray, rate: int | None = None) -> pipeline.Features:
        """Mel and audio-encoder features of a WAV path or a sample array (with its rate)."""
        return pipeline.encode_features(self.runner, _to_16k(audio, rate))

    def frames(self, audio: str | os.PathLike | np.ndarray, rate: int | None = None,
               frames: str | list[int] | None = None, as_tensor: bool = False, blend: str | None = None
               ) -> Iterator[tuple[int, np.ndarray | torch.Tensor]]:
        """Yield (video frame index, frame) for the audio: BGR uint8 (H, W, 3) numpy arrays, or torch tensors on
        the backend's device with as_tensor=True. `frames` picks indices ('0-99,120' or a list); `blend`
        ('none', 'feather', 'feather:PX') overrides the one given to `load` for this call."""
        feather = self._feather(blend)
        feats = self.features(audio, rate)
        indices = None
        if frames is not None:
            spec = frames if isinstance(frames, str) else ",".join(map(str, frames))
            indices = pipeline.parse_frames(spec, feats.num_frames)
        for i, frame in pipeline.iter_frames(self.runner, self.avatar, feats, indices, self.start_frame,
                                             self.batch_size, feather=feather, tune_threads=False,
                                             templates=self.templates):
            yield i, (frame if as_tensor else frame.cpu().numpy())

    def stream(self, rate: int = R.SAMPLE_RATE, mouths: bool = False, as_tensor: bool = False,
               start_frame: int | None = None, blend: str | None = None, batcher: Batcher | None = None) -> Stream:
        """A live stream, for audio that arrives in pieces (TTS, a call): `push(chunk)` returns every frame the chunk
        made ready, `close()` the last ones; a context manager. Chunks are 1-D float32 in [-1, 1] or int16 at
        `rate`, any length. Frames are (i, frame) as `frames()` yields them, or (i, box, mouth crop) with
        mouths=True (what the server sends); `blend` overrides the one given to `load`. Streams share this
        LipSync's `batcher` (or the one given), so streams pushed from several threads share generator calls."""
        start = self.start_frame if start_frame is None else start_frame
        feather = self._feather(blend)
        return Stream(self.runner, self.avatar, self.templates, batcher or self.batcher, rate, mouths=mouths,
                      as_tensor=as_tensor, start_frame=start, feather=feather)

    def live(self, rate: int = R.SAMPLE_RATE, idle: str = "template", as_tensor: bool = False,
             start_frame: int | None = None, blend: str | None = None, batcher: Batcher | None = None) -> Live:
        """A clocked live stream (`lipsync_trt.live`): `push(chunk)` any time, `next()` once per video frame returns
        the next frame of the 25 fps timeline with its own audio (`LiveFrame`), `interrupt()` drops the audio not
        yet played. Frames with no pushed audio in reach are the template itself (idle="template", no generator
        call) or generated too (idle="generate"). `rate` must be divisible by 25; a context manager."""
        if batcher is not None and not isinstance(batcher, Batcher):
            raise UsageError(f"batcher={batcher!r}: expected a lipsync_trt.batcher.Batcher (or None: ls.batcher)")
        start = self.start_frame if start_frame is None else start_frame
        return Live(self.runner, self.avatar, self.templates, batcher or self.batcher, rate, idle=idle,
                    as_tensor=as_tensor, start_frame=start, feather=self._feather(blend))

    @property
    def templates(self) -> compose.TemplateCrops:
        """The prepared-template cache of this avatar on the backend's device (shared by its streams, and by
        `frames`/`generate` when the pipeline caches templates: on CUDA when the avatar fits)."""
        with self._lock:
            if self._templates is None:
                self._templates = compose.TemplateCrops(self.avatar, self.runner.device)
            return self._templates

    @property
    def batcher(self) -> Batcher:
        """The model worker this LipSync's streams share (max batch = batch_size), started on first use."""
        with self._lock:
            if self._batcher is None or not self._batcher.alive:   # (a worker that died is replaced: new streams
                self._batcher = Batcher(self.runner, max_batch=self.batch_size)   # work again; its own got FAILED)
                weakref.finalize(self, self._batcher.stop)   # a LipSync dropped without close() stops it too
            return self._batcher

    def close(self) -> None:
        """Stop the streams' model worker (if a stream started one) and drop the template cache. The LipSync still
        renders afterwards (a new stream starts a new worker); `with lipsync_trt.load(...) as ls:` calls this."""
        with self._lock:
            batcher, self._batcher, self._templates = self._batcher, None, None
        if batcher is not None:
            batcher.stop()

    def __enter__(self) -> "LipSync":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, audio: str | os.PathLike | np.ndarray, out: str | os.PathLike | None = None,
                 rate: int | None = None, frames_dir: str | os.PathLike | None = None,
                 frames: str | list[int] | None = None, crf: int = video.DEFAULT_CRF, codec: str = "libx264",
                 preset: str = video.DEFAULT_PRESET,
                 progress: bool = False, blend: str | None = None) -> pipeline.Summary:
        """Render to an MP4 (H.264 + AAC of the input audio) and/or a folder of PNGs; returns a Summary.
        `blend` overrides the one given to `load` for this call. An output that is, lies inside or contains the
        audio file or the avatar's folders is an OutputError before any work (as a path holding a NUL byte)."""
        from .avatar import avatar_inputs
        from .inputs import check_outputs

        feather = self._feather(blend)
        check_outputs([("out", out), ("frames_dir", frames_dir)],
                      [("audio", audio if isinstance(audio, (str, os.PathLike)) else None),
                       *(("avatar", p) for p in avatar_inputs(self.avatar.root))])
        if isinstance(audio, (str, os.PathLike)):
            samples, rate, source = *A.load(audio), str(audio)
        else:
            if rate is None:
                raise UsageError("rate= is required when audio is an array of samples (its sample rate in Hz)")
            samples, source = A.pcm_samples(audio, "audio array"), "audio array"   # int16: scaled by 1/32768
        return pipeline.generate(self.runner, self.avatar, samples, rate, out=out, frames_dir=frames_dir,
                                 frames=frames, start_frame=self.start_frame, batch_size=self.batch_size,
                                 crf=crf, codec=codec, preset=preset, progress=progress, source=source,
                                 feather=feather, templates=self.templates)


def _to_16k(audio: str | os.PathLike | np.ndarray, rate: int | None) -> np.ndarray:
    if isinstance(audio, (str, os.PathLike)):
        return A.load_16k(audio)
    if rate is None:
        raise UsageError("rate= is required when audio is an array of samples (its sample rate in Hz)")
    return A.to_16k_mono(audio, rate, source="audio array")


def load(avatar: str | os.PathLike, generator: str | os.PathLike, audio_encoder: str | os.PathLike,
         backend: str = "auto", device: str = "auto", precision: str = "fp32", batch_size: int | None = None,
         start_frame: int = 0, blend: str = "none", **options) -> LipSync:
    """Validate the avatar folder, load both checkpoints into the chosen backend, and return a LipSync.
    `blend`: 'none' (the reference's hard paste), 'feather' or 'feather:PX' (box edge blended over PX pixels)."""
    compose.parse_blend(blend)   # a bad value fails before the checkpoints load
    av = avatar_mod.load(avatar)
    runner = backends.load(backend, generator, audio_encoder, device=device, precision=precision, **options)
    return LipSync(av, runner, batch_size=batch_size, start_frame=start_frame, blend=blend)
