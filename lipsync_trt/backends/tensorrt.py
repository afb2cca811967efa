"""TensorRT backend, written against the documented TensorRT 10 and 11 Python API. NOT RUN.

TensorRT's libraries are not installable from PyPI (the `tensorrt` package there is a stub that downloads
from NVIDIA's own index) and neither the development machine nor the reference GPU image has them, so this
module has never executed a TensorRT call. It runs the two serialized engines it is given; building them
is `lipsync_trt.build.tensorrt`, finding them `lipsync_trt.artifacts`.

Run (`TrtRunner`): one execution context per CUDA stream, `set_input_shape` + `set_tensor_address`
bound to torch tensors on the GPU (no host copies), `execute_async_v3` on torch's current stream;
optionally one CUDA graph per (stream, batch size).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import BackendError
from ..models.io import AUDIO_ENCODER, BATCH_AXIS, GENERATOR, NetworkIO
from ..runtimes import tensorrt as trt
from ..runtimes import tensorrt_reason
from .base import Runner


def probe() -> str | None:
    """None when the backend can run here (TensorRT 10+ importable and a CUDA GPU), else the reason."""
    return tensorrt_reason()


_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32}


class _Engine:
    """A deserialized engine with one execution context per CUDA stream (and optional CUDA graphs)."""

    def __init__(self, runtime, path: Path, net: NetworkIO, device: torch.device, cuda_graphs: bool = False):
        if not path.is_file():
            raise BackendError(f"{path}: engine file not found")
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise BackendError(f"{path}: TensorRT could not deserialize this engine (built by another TensorRT "
                               "version or for another GPU? rebuild with python -m lipsync_trt.build --force)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if sorted(self.inputs) != sorted(net.input_names) or self.outputs != [net.output.name]:
            raise BackendError(f"{path}: tensors {self.inputs} -> {self.outputs} are not the {net.name}'s "
                               f"{list(net.input_names)} -> [{net.output.name!r}]")
        self.dtypes = {n: _TORCH_DTYPES[self.engine.get_tensor_dtype(n).name] for n in names}
        self.max_batch = self.engine.get_tensor_profile_shape(self.inputs[0], 0)[2][BATCH_AXIS]   # profile 0's max
        self.device = device
        self.cuda_graphs = cuda_graphs
        self.contexts: dict[int, object] = {}
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, dict, torch.Tensor]] = {}

    def _context(self, stream: int):
        if stream not in self.contexts:
            self.contexts[stream] = self.engine.create_execution_context()
        return self.contexts[stream]

    def _bind(self, ctx, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        for name, t in feeds.items():
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
        out_name = self.outputs[0]
        out = torch.empty(tuple(ctx.get_tensor_shape(out_name)), dtype=self.dtypes[out_name], device=self.device)
        ctx.set_tensor_address(out_name, out.data_ptr())
        return out

    def run(self, **feeds: torch.Tensor) -> torch.Tensor:
        feeds = {n: feeds[n].to(self.device, self.dtypes[n]).contiguous() for n in self.inputs}
        stream = torch.cuda.current_stream(self.device)
        ctx = self._context(stream.cuda_stream)
        if not self.cuda_graphs:
            out = self._bind(ctx, feeds)
            if not ctx.execute_async_v3(stream.cuda_stream):
                raise BackendError("TensorRT execute_async_v3 failed (see the TensorRT log)")
            return out
        key = (stream.cuda_stream, next(iter(feeds.values())).shape[BATCH_AXIS])
        if key not in self.graphs:
            static = {n: t.clone() for n, t in feeds.items()}
            out = self._bind(ctx, static)
            ctx.execute_async_v3(stream.cuda_stream)   # TensorRT must run once before its launches are captured
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                ctx.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream)
            self.graphs[key] = (graph, static, out)
        graph, static, out = self.graphs[key]
        for n, t in feeds.items():
            static[n].copy_(t)
        graph.replay()
        return out.clone()


class TrtRunner(Runner):
    def __init__(self, generator_engine: Path, encoder_engine: Path, device: torch.device, precision: str,
                 cuda_graphs: bool = False, info: dict | None = None):
        super().__init__(name="tensorrt", device=device, precision=precision, info=info or {})
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        with torch.cuda.device(device):
            self.gen = _Engine(self.runtime, Path(generator_engine), GENERATOR, device, cuda_graphs)
            self.enc = _Engine(self.runtime, Path(encoder_engine), AUDIO_ENCODER, device, cuda_graphs)

    @property
    def dtype(self) -> torch.dtype:
        return self.gen.dtypes[GENERATOR.inputs[0].name]

    @staticmethod
    def _chunked(engine: _Engine, net: NetworkIO, *inputs: torch.Tensor) -> torch.Tensor:
        """Run in slices of at most the engine profile's max batch."""
        return torch.cat([engine.run(**feeds).float() for feeds in net.slices(inputs, engine.max_batch)])

    def encode_audio_impl(self, mel_windows: torch.Tensor) -> torch.Tensor:
        return self._chunked(self.enc, AUDIO_ENCODER, mel_windows)

    def generate_impl(self, images: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        return self._chunked(self.gen, GENERATOR, images, audio)

    def close_impl(self) -> None:
        self.gen = self.enc = None
        self.runtime = None


def check(device: torch.device, precision: str) -> None:
    """BackendError unless `device` is a CUDA device (before anything is found or built)."""
    if device.type != "cuda":
        raise BackendError(f"backend 'tensorrt' needs a CUDA device, got {device}")


def load(generator_engine: str | os.PathLike, encoder_engine: str | os.PathLike, device: torch.device,
         precision: str = "fp16", cuda_graphs: bool = False, info: dict | None = None, **_: object) -> TrtRunner:
    """A TrtRunner on `device` for two serialized engines (the generator's and the audio encoder's)."""
    reason = probe()
    if reason:
        raise BackendError(f"backend 'tensorrt' is not usable here: {reason}")
    check(device, precision)
    return TrtRunner(Path(generator_engine), Path(encoder_engine), device, precision, cuda_graphs,
                     info={**(info or {}), "tensorrt": trt.__version__})
