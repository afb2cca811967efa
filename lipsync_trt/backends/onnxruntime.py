"""ONNX Runtime backend: the verified ONNX pair on the CPU EP (or the CUDA EP when onnxruntime-gpu provides it).

`load(G.pth, A.pth, ...)` works straight from checkpoints: `build.ensure_onnx` reuses a verified ONNX
build for this checkpoint pair from `engines` (when given) or the cache folder ($LIPSYNC_TRT_CACHE, else
~/.cache/lipsync_trt), exporting and checking one there the first time (~20 s on a 2-core CPU).

On a 2-core x86-64 CPU the generator runs ~3.5-4x faster than eager PyTorch at batch 1 (docs/ENGINES.md).
Threads: `threads` (intra-op) defaults to the physical cores this process may use; inter-op is 1.
`spinning` (default off) lets idle intra-op threads busy-wait for the next op: 6-10% faster for the generator
alone, but in `generate` the spinning threads take CPU from decode/paste/H.264 and end to end to MP4 is
~10% slower (2-core CPU, docs/BENCHMARKS.md), so it is off unless the process does nothing else.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import BackendError
from .base import Runner


def probe() -> str | None:
    """None when usable, else why not."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "onnxruntime is not installed (pip install 'lipsync_trt[onnx]')"
    return None


def physical_cores() -> int:
    """Physical cores available to this process (hyper-threads do not help these convolutions)."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        cores, current = set(), {}
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                k = k.strip()
                if k in ("physical id", "core id"):
                    current[k] = v.strip()
                elif not k and current:
                    cores.add((current.get("physical id"), current.get("core id")))
                    current = {}
        if current:
            cores.add((current.get("physical id"), current.get("core id")))
        physical = len(cores) if cores and all(c != (None, None) for c in cores) else allowed
    except OSError:
        physical = allowed
    return max(1, min(physical, allowed))


_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
_TORCH = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16}


class _Session:
    def __init__(self, path: Path, device: torch.device, threads: int, providers: list, spinning: bool = False):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), so, providers=providers)
        self.device = device
        self.inputs = {i.name: i.type for i in self.session.get_inputs()}
        out = self.session.get_outputs()[0]
        self.output, self.output_type = out.name, out.type

    def run(self, **feeds: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return self._run_cuda(feeds)
        arrays = {n: feeds[n].detach().to("cpu", _TORCH[t]).contiguous().numpy() for n, t in self.inputs.items()}
        return torch.from_numpy(self.session.run([self.output], arrays)[0])

    def _run_cuda(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        """IO binding to torch's CUDA memory: no host copies. (Not exercised here: no GPU with onnxruntime-gpu.)"""
        binding = self.session.io_binding()
        idx = self.device.index if self.device.index is not None else torch.cuda.current_device()
        keep = []
        for n, t in self.inputs.items():
            x = feeds[n].to(self.device, _TORCH[t]).contiguous()
            keep.append(x)
            binding.bind_input(n, "cuda", idx, _NP[t], tuple(x.shape), x.data_ptr())
        batch = keep[0].shape[0]
        shape = (batch, *self.session.get_outputs()[0].shape[1:])
        out = torch.empty(shape, dtype=_TORCH[self.output_type], device=self.device)
        binding.bind_output(self.output, "cuda", idx, _NP[self.output_type], tuple(out.shape), out.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()   # inputs written on torch's stream are ready
        self.session.run_with_iobinding(binding)               # ORT synchronizes its stream before returning
        return out


class OrtRunner(Runner):
    def __init__(self, generator_onnx: str | os.PathLike, encoder_onnx: str | os.PathLike,
                 device: torch.device = torch.device("cpu"), precision: str = "fp32", threads: int | None = None,
                 spinning: bool = False):
        import onnxruntime as ort

        super().__init__(name="onnxruntime", device=device, precision=precision)
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendError("onnxruntime on CUDA needs onnxruntime-gpu (CUDAExecutionProvider is not "
                                   f"available; providers here: {', '.join(ort.get_available_providers())})")
            idx = device.index if device.index is not None else torch.cuda.current_device()
            providers = [("CUDAExecutionProvider", {"device_id": idx}), "CPUExecutionProvider"]
        elif device.type == "cpu":
            providers = ["CPUExecutionProvider"]
        else:
            raise BackendError(f"onnxruntime backend: unsupported device {device}; use cpu or cuda")
        self.threads = threads or physical_cores()
        self.gen = _Session(Path(generator_onnx), device, self.threads, providers, spinning)
        self.enc = _Session(Path(encoder_onnx), device, self.threads, providers, spinning)
        self.info = {"generator_onnx": str(generator_onnx), "audio_encoder_onnx": str(encoder_onnx),
                     "providers": self.gen.session.get_providers(), "intra_op_threads": self.threads,
                     "spinning": spinning,
                     "onnxruntime": ort.__version__}

    @property
    def dtype(self) -> torch.dtype:
        return _TORCH[self.gen.inputs["images"]]

    @property
    def own_cpu_pool(self) -> bool:
        return self.device.type == "cpu"

    def encode_audio(self, mel_windows: torch.Tensor) -> torch.Tensor:
        return self.enc.run(mel=mel_windows).float()

    def generate(self, images: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        return self.gen.run(images=images, audio=audio).float()

    def close(self) -> None:
        self.gen = self.enc = None


def load(generator: str | os.PathLike, audio_encoder: str | os.PathLike, device: torch.device,
         precision: str = "fp32", engines: str | os.PathLike | None = None, threads: int | None = None,
         spinning: bool = False, **_: object) -> OrtRunner:
    """ONNX for this checkpoint pair (found in `engines` or the cache, else exported there), on `device`."""
    from ..build import ensure_onnx, find_build

    reason = probe()
    if reason:
        raise BackendError(f"backend 'onnxruntime' is not usable here: {reason}")
    if precision == "bf16":
        raise BackendError("onnxruntime backend: bf16 is not supported; use fp32 (or fp16 on CUDA)")
    out = engines
    if engines is not None and find_build(engines, generator, audio_encoder,
                                          "onnx_fp16" if precision == "fp16" else "onnx") is None:
        out = None   # nothing usable in --engines: use (and fill) the cache rather than writing into it
    gen_onnx, enc_onnx = ensure_onnx(generator, audio_encoder, out, precision)
    return OrtRunner(gen_onnx, enc_onnx, device, precision, threads, spinning)
