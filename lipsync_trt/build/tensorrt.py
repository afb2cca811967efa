"""TensorRT engines from ONNX, written against the documented TensorRT 10 and 11 Python API. NOT RUN.

TensorRT's libraries are not installable from PyPI and neither the development machine nor the reference
GPU image has them, so this module has never executed a TensorRT call (docs/ENGINES.md).

ONNX parser -> strongly typed network (TensorRT 11 removed BuilderFlag.FP16: precision comes from the ONNX's
own types, so fp16 engines are built from the fp16 ONNX; the flag is opt-in on 10.x and accepted on 11.x)
-> one optimization profile over the batch range -> timing cache read from / written back to disk ->
`build_serialized_network` -> `<name>.engine`, written atomically.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import BackendError
from ..models.io import BATCH_AXIS
from ..runtimes import tensorrt as trt
from ..runtimes import tensorrt_reason


def build_probe() -> str | None:
    """None when engines can be built here (TensorRT 10+ importable and a CUDA GPU), else why not."""
    return tensorrt_reason()


def _write_atomic(path: Path, data) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.part")
    tmp.write_bytes(memoryview(data))
    os.replace(tmp, path)


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, batch: tuple[int, int, int],
                 timing_cache: str | os.PathLike | None = None, workspace_gib: float | None = None) -> Path:
    """Parse `onnx_path` into a strongly typed network, build it for the batch range, write `engine_path`."""
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
        rest = tuple(tensor.shape)[BATCH_AXIS + 1:]   # (-1, C, H, W): only the leading batch axis is dynamic
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
    _write_atomic(engine_path, plan)
    if cache_path:
        _write_atomic(cache_path, config.get_timing_cache().serialize())
    return engine_path
