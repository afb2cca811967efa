"""A Pipecat video service over this engine (extra `[pipecat]`): `LipSyncVideoService(ls)` in-process, or
`LipSyncVideoService.remote(url, model)` over `serve`. Place it after the TTS and before `transport.output()`.

Importable only with Pipecat installed: `pip install 'lipsync_trt[pipecat]'`.
"""
try:
    import pipecat.frames.frames  # noqa: F401  (the top-level Pipecat package, not this one)
except ImportError as exc:   # pragma: no cover - depends on the environment
    raise ImportError("lipsync_trt.pipecat needs Pipecat (pipecat-ai >= 0.0.107): pip install 'lipsync_trt[pipecat]'"
                      f" ({exc})") from exc

from .service import LipSyncVideoService  # noqa: E402

__all__ = ["LipSyncVideoService"]
