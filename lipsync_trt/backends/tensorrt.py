"""TensorRT backend, written against the documented TensorRT 10 and 11 Python API.

NOT RUN: TensorRT's libraries are not installable from PyPI (the `tensorrt` package there is a stub that
downloads from NVIDIA's own index) and neither the development machine nor the reference GPU image has
them, so this module has never executed a TensorRT call. What *is* run and tested is everything before
it: `python -m lipsync_trt.build --target tensorrt` exports the ONNX this module would consume (fp16:
a generator ONNX with fp16 weights and I/O) and checks it against PyTorch with ONNX Runtime.

Build (`build_engine`): ONNX parser -> strongly typed network (TensorRT 11 removed BuilderFlag.FP16:
precision comes from the ONNX's own types, so fp16 engines are built from the fp16 ONNX; the flag is
opt-in on 10.x and accepted on 11.x) -> one optimization profile over the batch range -> timing cache
read from / written back to disk -> `build_serialized_network` -> `<name>.engine`.

Run (`TrtRunner`): one execution context per CUDA stream, `set_input_shape` + `set_tensor_address`
bound to torch tensors on the GPU (no host copies), `execute_async_v3` on torch's current stream;
optionally one CUDA graph per (stream, batch size).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from ..errors import BackendError
from .base import Runner

NOT_INSTALLED = ("TensorRT is not installed (its libraries are not on PyPI; install TensorRT 10 or 11 from "
                 "NVIDIA, e.g. the pip wheels from pypi.nvidia.com or a TensorRT container)")


def _import():
    try:
        import tensorrt as trt
    except ImportError:
        return None, NOT_INSTALLED
    except Exception as exc:   # the PyPI stub raises while trying to fetch the real wheel; a broken CUDA setup raises OSError
        return None, f"TensorRT is not usable: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}"
    if int(trt.__version__.split(".")[0]) < 10:
        return None, f"TensorRT {trt.__version__} is too old; this backend uses the TensorRT 10/11 API"
    return trt, None


def build_probe() -> str | None:
    """None when engines can be built here (TensorRT 10+ importable and a CUDA GPU), else why not."""
    trt, reason = _import()
    if reason:
        return reason
    if not torch.cuda.is_available():
        return "TensorRT needs a CUDA GPU and torch sees none"
    return None


def probe() -> str | None:
    """None when the backend can run here, else the reason."""
    return build_probe()


def _trt():
    trt, reason = _import()
    if reason:
        raise BackendError(reason)
    return trt


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, batch: tuple[int, int, int],
                 timing_cache: str | os.PathLike | None = None, workspace_gib: float | None = None) -> Path:
    """Parse `onnx_path` into a strongly typed network, build it for the batch range, write `engine_path`."""
    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors[:400]}")

    config = builder.create_builder_config()
    if workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    lo, opt, hi = batch
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        rest = tuple(tensor.shape)[1:]          # (-1, C, H, W): only the batch axis is dynamic
        profile.set_shape(tensor.name, (lo, *rest), (opt, *rest), (hi, *rest))
    config.add_optimization_profile(profile)

    cache_path = Path(timing_cache) if timing_cache else None
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BackendError(f"{onnx_path}: TensorRT failed to build an engine (see the TensorRT log above)")
    engine_path = Path(engine_path)
    engine_path.write_bytes(memoryview(plan))
    if cache_path:
        tmp = cache_path.with_name(cache_path.name + f".{os.getpid()}.part")
        tmp.write_bytes(memoryview(config.get_timing_cache().serialize()))
        os.replace(tmp, cache_path)
    return engine_path


_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32}


class _Engine:
    """A deserialized engine with one execution context per CUDA stream (and optional CUDA graphs)."""

    def __init__(self, runtime, path: Path, device: torch.device, cuda_graphs: bool = False):
        trt = _trt()
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise BackendError(f"{path}: TensorRT could not deserialize this engine (built by another TensorRT "
                               "version or for another GPU? rebuild with python -m lipsync_trt.build --force)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: _TORCH_DTYPES[self.engine.get_tensor_dtype(n).name] for n in names}
        self.max_batch = self.engine.get_tensor_profile_shape(self.inputs[0], 0)[2][0]
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
        key = (stream.cuda_stream, next(iter(feeds.values())).shape[0])
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
        trt = _trt()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        with torch.cuda.device(device):
            self.gen = _Engine(self.runtime, Path(generator_engine), device, cuda_graphs)
            self.enc = _Engine(self.runtime, Path(encoder_engine), device, cuda_graphs)

    @property
    def dtype(self) -> torch.dtype:
        return self.gen.dtypes["images"]

    def encode_audio(self, mel_windows: torch.Tensor) -> torch.Tensor:
        n = self.enc.max_batch
        return torch.cat([self.enc.run(mel=mel_windows[i:i + n]).float() for i in range(0, len(mel_windows), n)])

    def generate(self, images: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        n = self.gen.max_batch
        return torch.cat([self.gen.run(images=images[i:i + n], audio=audio[i:i + n]).float()
                          for i in range(0, len(images), n)])

    def close(self) -> None:
        self.gen = self.enc = None
        self.runtime = None


def load(generator: str | os.PathLike, audio_encoder: str | os.PathLike, device: torch.device,
         precision: str = "fp16", engines: str | os.PathLike | None = None, batch: str | tuple | None = None,
         cuda_graphs: bool = False, **_: object) -> TrtRunner:
    """Engines for this checkpoint pair from `engines` (default engines/), built there first when missing."""
    from .. import build as B

    reason = probe()
    if reason:
        raise BackendError(f"backend 'tensorrt' is not usable here: {reason}")
    if device.type != "cuda":
        raise BackendError(f"backend 'tensorrt' needs a CUDA device, got {device}")
    trt = _trt()
    out = engines or B.DEFAULT_OUT
    same_runtime = (lambda m: m["key"]["versions"].get("tensorrt") == trt.__version__
                    and m["key"].get("gpu") == B.gpu_name())
    m = B.find_build(out, generator, audio_encoder, "tensorrt", precision, match=same_runtime)
    if m is None:
        m = B.build(generator, audio_encoder, target="tensorrt", precision=precision, batch=batch, out=out,
                    log=lambda s: print(s, file=sys.stderr, flush=True))
    folder, files = Path(m["dir"]), m["artifacts"]["tensorrt"]
    return TrtRunner(folder / files["generator"], folder / files["audio_encoder"], device, precision, cuda_graphs,
                     info={"engines": str(folder), "tensorrt": trt.__version__})
