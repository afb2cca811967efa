"""An exported ONNX pair vs the PyTorch fp32 modules, on random and real-shaped inputs, within a tolerance."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import torch

from .. import recipe as R
from ..errors import BackendError
from ..models.io import AUDIO_ENCODER, GENERATOR, NetworkIO
from ..runtimes import onnxruntime as ort

# Max abs difference allowed between ONNX Runtime and PyTorch fp32 (generator output is in [0, 1]; encoder
# features are scaled by max(1, max|reference|)). fp16 applies to the generator only: the audio encoder is
# tiny and always stays fp32 so features match the reference.
TOLERANCE = {"fp32": {"generator": 1e-4, "audio_encoder": 1e-4}, "fp16": {"generator": 2e-2, "audio_encoder": 1e-4}}

Log = Callable[[str], None]


def stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def real_shaped_inputs(encoder: torch.nn.Module, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs built by the package's own stages, so their statistics are those of a real run:
    a drawn face frame through compose.prepare (roi + masked copy), and a speech-like signal through
    audio.mel -> mel windows -> the audio encoder -> padded feature windows. Returns (mel windows,
    images (B,6,320,320), audio (B,32,16,16))."""
    import numpy as np

    from .. import audio, compose

    g = torch.Generator().manual_seed(seed)
    h, w = 400, 360
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    frame = torch.stack([60 + 0.3 * yy, 90 + 0.2 * xx, 150 - 0.1 * (xx + yy)], dim=-1)
    face = ((xx - 180) / 110) ** 2 + ((yy - 210) / 140) ** 2 < 1
    frame[face] = torch.tensor([110.0, 150.0, 205.0])
    mouth = ((xx - 180) / 40) ** 2 + ((yy - 280) / 12) ** 2 < 1
    frame[mouth] = torch.tensor([60.0, 50.0, 150.0])
    frame = (frame + 6 * torch.randn(frame.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    box = (30, 60, 330, 360)
    images, _ = compose.prepare([frame] * batch, [box] * batch)

    t = np.arange(int(R.SAMPLE_RATE * 1.0)) / R.SAMPLE_RATE
    rng = np.random.default_rng(seed)
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)
    wav = (0.3 * envelope * sum(np.sin(2 * np.pi * f * t) / k for k, f in enumerate((140, 280, 420, 700), 1))
           + 0.01 * rng.standard_normal(t.shape)).astype(np.float32)
    windows = audio.mel_windows(audio.mel(wav))
    with torch.no_grad():
        feats = audio.pad_features(encoder(windows))
    feature_windows = audio.feature_windows(feats, range(batch))
    return windows, images, feature_windows


class _Ort:
    """Tiny ONNX Runtime wrapper for the checks (the backend has its own, with thread settings)."""

    def __init__(self, path: Path, net: NetworkIO):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.types = {i.name: i.type for i in self.session.get_inputs()}
        self.net = net

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        feed = {spec.name: x.detach().cpu().numpy().astype("float16" if self.types[spec.name] == "tensor(float16)"
                                                          else "float32")
                for spec, x in zip(self.net.inputs, inputs)}
        return torch.from_numpy(self.session.run([self.net.output.name], feed)[0]).float()


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise BackendError(f"ONNX Runtime output shape {tuple(a.shape)} != PyTorch {tuple(b.shape)}")
    return float((a.float() - b.float()).abs().max())


def verify(gen_onnx: Path, enc_onnx: Path, generator: torch.nn.Module, encoder: torch.nn.Module, precision: str,
           batch: tuple[int, int, int], log: Log = stderr, progress: bool = True,
           which: tuple[str, ...] = ("generator", "audio_encoder")) -> dict[str, float]:
    """ONNX Runtime vs PyTorch fp32 on random and real-shaped inputs at two batch sizes; raise above tolerance."""
    from tqdm import tqdm

    tol = TOLERANCE[precision]
    runtimes = {"generator": _Ort(gen_onnx, GENERATOR), "audio_encoder": _Ort(enc_onnx, AUDIO_ENCODER)}
    modules = {"generator": generator, "audio_encoder": encoder}
    lo, _, hi = batch
    b2 = min(max(lo + 2, 3), hi)  # a second, different batch size exercises the dynamic axis
    g = torch.Generator().manual_seed(1)
    windows, images, feats = real_shaped_inputs(encoder, b2)
    images_spec, audio_spec = GENERATOR.inputs
    mel_spec = AUDIO_ENCODER.inputs[0]
    cases = [
        ("generator", f"random b{lo}", lambda: (torch.rand(images_spec.batched(lo), generator=g),
                                                torch.randn(audio_spec.batched(lo), generator=g))),
        ("generator", f"real-shaped b{b2}", lambda: (images, feats)),
        ("audio_encoder", f"random b{lo}", lambda: (torch.rand(mel_spec.batched(lo), generator=g) * 8 - 4,)),
        ("audio_encoder", f"real-shaped b{len(windows)}", lambda: (windows,)),
    ]
    cases = [c for c in cases if c[0] in which]
    diffs = {}
    for what, label, make in tqdm(cases, desc="verify", unit="case", leave=False, disable=not progress or None):
        args = make()
        with torch.no_grad():
            ref = modules[what](*args)
            got = runtimes[what](*args)
        scale = 1.0 if what == "generator" else max(1.0, float(ref.abs().max()))
        d = _max_abs(got, ref)
        diffs[f"{what} {label}"] = d
        if d > tol[what] * scale:
            raise BackendError(f"ONNX Runtime {what} ({precision}) differs from PyTorch fp32 by {d:.3g} on {label} "
                               f"inputs (tolerance {tol[what] * scale:.3g}); not writing a bad artifact")
    return diffs
