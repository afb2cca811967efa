"""SyncTalk_2D-compatible networks and their checkpoint loaders."""
from .audio_encoder import AudioEncoder
from .checkpoints import load_audio_encoder, load_generator, read_state_dict
from .generator import Generator

__all__ = ["AudioEncoder", "Generator", "load_audio_encoder", "load_generator", "read_state_dict"]
