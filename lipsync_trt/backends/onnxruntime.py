"""ONNX Runtime backend: an ONNX pair on the CPU EP (or the CUDA EP when onnxruntime-gpu provides it).

It runs the two .onnx files it is given. `backends.load('onnxruntime', G.pth, A.pth)` gets them from
`lipsync_trt.artifacts` (a verified build of this checkpoint pair in `engines` or the cache folder,
exported there the first time). Speed against eager PyTorch: docs/ENGINES.md and docs/BENCHMARKS.md.
Threads: `threads` (intra-op) defaults to the physical cores this process may use; inter-op is 1.
`spinning` (default off) lets idle intra-op threads busy-wait for the next op: faster for the generator
alone, but in `generate` the spinning threads take CPU from decode/paste/H.264 (docs/BENCHMARKS.md), so it
is off unless the process does nothing else.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import BackendError
from ..models.io import AUDIO_ENCODER, GENERATOR, NetworkIO
from ..runtimes import onnxruntime as ort
from .base import Runner


def probe() -> str | None:
    """None when usable, else why not."""
    return ort.reason()


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
    def __init__(self, path: Path, net: NetworkIO, device: torch.device, threads: int, providers: list,
                 spinning: bool = False, mem_pattern: bool = True):
        if not path.is_file():
            raise BackendError(f"{path}: ONNX file not found")
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        so.enable_mem_pattern = mem_pattern
        self.session = ort.InferenceSession(str(path), so, providers=providers)
        self.device = device
        self.inputs = {i.name: i.type for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        if list(self.inputs) != list(net.input_names) or outputs != [net.output.name]:
            raise BackendError(f"{path}: inputs {list(self.inputs)} and outputs {outputs} are not the {net.name}'s "
                               f"{list(net.input_names)} -> [{net.output.name!r}]")
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
                 spinning: bool = False, mem_pattern: bool = True):
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
        self.gen = _Session(Path(generator_onnx), GENERATOR, device, self.threads, providers, spinning, mem_pattern)
        self.enc = _Session(Path(encoder_onnx), AUDIO_ENCODER, device, self.threads, providers, spinning, mem_pattern)
        self.info = {"generator_onnx": str(generator_onnx), "audio_encoder_onnx": str(encoder_onnx),
                     "providers": self.gen.session.get_providers(), "intra_op_threads": self.threads,
                     "spinning": spinning, "mem_pattern": mem_pattern,
                     "onnxruntime": ort.__version__}

    @property
    def dtype(self) -> torch.dtype:
        return _TORCH[self.gen.inputs[GENERATOR.inputs[0].name]]

    @property
    def own_cpu_pool(self) -> bool:
        return self.device.type == "cpu"

    def encode_audio_impl(self, mel_windows: torch.Tensor) -> torch.Tensor:
        return self.enc.run(**dict(zip(AUDIO_ENCODER.input_names, (mel_windows,)))).float()

    def generate_impl(self, images: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        return self.gen.run(**dict(zip(GENERATOR.input_names, (images, audio)))).float()

    def close_impl(self) -> None:
        self.gen = self.enc = None


def check(device: torch.device, precision: str) -> None:
    """BackendError for a precision this backend cannot run (before anything is found or exported)."""
    if precision == "bf16":
        raise BackendError("onnxruntime backend: bf16 is not supported; use fp32 or fp16 (or --backend torch for bf16)")


def load(generator_onnx: str | os.PathLike, encoder_onnx: str | os.PathLike, device: torch.device,
         precision: str = "fp32", threads: int | None = None, spinning: bool = False, mem_pattern: bool = True,
         **_: object) -> OrtRunner:
    """An OrtRunner on `device` for two ONNX files (the generator's and the audio encoder's). `mem_pattern`: ONNX
    Runtime's memory patterns, one pre-planned block kept for every input shape a session runs; the server turns
    them off when it batches (a block per batch size 1..8 held 1.3 GB more at --max-batch 8, docs/PROTOCOL.md)."""
    reason = probe()
    if reason:
        raise BackendError(f"backend 'onnxruntime' is not usable here: {reason}")
    check(device, precision)
    for path in (generator_onnx, encoder_onnx):
        if Path(path).suffix != ".onnx":
            raise BackendError(f"{path}: the onnxruntime backend runs .onnx files; "
                               "backends.load('onnxruntime', G.pth, A.pth) finds or exports them")
    return OrtRunner(generator_onnx, encoder_onnx, device, precision, threads, spinning, mem_pattern)
