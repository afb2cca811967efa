"""lipsync_trt: SyncTalk_2D lip-sync inference, WAV -> talking-head video, on PyTorch, ONNX Runtime,
TensorRT or Core ML.

    import lipsync_trt
    ls = lipsync_trt.load("datasets/me", "models/me.pth", "models/audio_visual_encoder.pth")
    ls.generate("speech.wav", "out.mp4")
    for i, frame in ls.frames("speech.wav"):   # BGR uint8 (H, W, 3)
        ...
"""
from .errors import LipsyncError
from .version import __version__

__all__ = ["LipSync", "LipsyncError", "available", "load", "__version__"]


def __getattr__(name: str):
    """LipSync, load and available, imported at first use: `python -m lipsync_trt` runs this file before the CLI,
    which must handle signals before torch loads (errors.run_command)."""
    if name in ("LipSync", "load"):
        from . import api
        return getattr(api, name)
    if name == "available":
        from .backends import available
        return available
    raise AttributeError(f"module 'lipsync_trt' has no attribute {name!r}")
