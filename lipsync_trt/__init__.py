"""lipsync_trt: SyncTalk_2D lip-sync inference, WAV -> talking-head video, on PyTorch, ONNX Runtime,
TensorRT or Core ML.

    import lipsync_trt
    ls = lipsync_trt.load("datasets/me", "models/me.pth", "models/audio_visual_encoder.pth")
    ls.generate("speech.wav", "out.mp4")
    for i, frame in ls.frames("speech.wav"):   # BGR uint8 (H, W, 3)
        ...
"""
from .api import LipSync, load
from .backends import available
from .errors import LipsyncError
from .version import __version__

__all__ = ["LipSync", "LipsyncError", "available", "load", "__version__"]
