"""Load SyncTalk_2D checkpoints (plain state_dicts) strictly, with errors that name the first bad key."""
from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..inputs import MAX_CHECKPOINT_BYTES, open_file
from .audio_encoder import AudioEncoder
from .generator import Generator

ENCODER_PREFIX = "audio_encoder."


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """torch.load(weights_only=True) a state_dict, with a clear error for a missing or foreign file."""
    path = Path(path)
    try:
        with open_file(path, "checkpoint file", CheckpointError, MAX_CHECKPOINT_BYTES) as f, \
                warnings.catch_warnings():
            # a plain pickle (no torch.save) makes torch warn about its protocol before refusing it: one line only
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(f, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as exc:
        found = re.search(r"(?:GLOBAL|[Uu]nsupported global:?) ([\w.]+)", str(exc))
        if not found:   # junk bytes or an unsupported opcode: not a pickle we can read
            raise CheckpointError(f"{path}: not a readable PyTorch state_dict (not a plain pickle of tensors)") from None
        what = f" such as {found.group(1)}"   # weights_only refused a Python object: never offer to unpickle it
        raise CheckpointError(f"{path}: not a plain state_dict: it holds pickled Python objects{what}, and it will "
                              f"not be unpickled (that could run code from the file)") from None
    except Exception as exc:  # zip and format errors mean "not a usable checkpoint"
        raise CheckpointError(f"{path}: not a readable PyTorch state_dict ({_first_line(exc)})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state_dict (a dict of tensors), got {type(state).__name__}")
    return state


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike, what: str) -> None:
    """Raise CheckpointError naming the first missing, unexpected or mis-shaped key."""
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            raise CheckpointError(f"{path}: not a {what} checkpoint: missing key '{key}'")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{path}: not a {what} checkpoint: key '{key}' has shape {tuple(state[key].shape)}, "
                f"expected {tuple(tensor.shape)}")
    for key in state:
        if key not in expected:
            raise CheckpointError(f"{path}: not a {what} checkpoint: unexpected key '{key}'")


def normalize_encoder_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SyncTalk ships audio_visual_encoder.pth without the 'audio_encoder.' prefix; accept both forms."""
    if state and not any(k.startswith(ENCODER_PREFIX) for k in state):
        return {ENCODER_PREFIX + k: v for k, v in state.items()}
    return state


def load_generator(path: str | os.PathLike) -> Generator:
    """A Generator (mode 'ave') in eval mode with the checkpoint's weights, on the CPU."""
    model = Generator()
    state = read_state_dict(path)
    check_state_dict(model, state, path, "SyncTalk_2D generator (mode 'ave')")
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_audio_encoder(path: str | os.PathLike) -> AudioEncoder:
    """An AudioEncoder in eval mode with the checkpoint's weights (with or without the prefix), on the CPU."""
    model = AudioEncoder()
    state = normalize_encoder_keys(read_state_dict(path))
    check_state_dict(model, state, path, "SyncTalk audio encoder")
    model.load_state_dict(state, strict=True)
    return model.eval()


def sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file (engine cache keys and manifests)."""
    import hashlib

    h = hashlib.sha256()
    with open_file(path, "checkpoint file", CheckpointError, MAX_CHECKPOINT_BYTES) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
