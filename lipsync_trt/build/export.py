"""ONNX export of one network (dynamic batch, one self-contained file) and its structural check."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from ..errors import BackendError
from ..models.io import BATCH_AXIS, NetworkIO
from ..runtimes import onnx

OPSET = 17
EXPORTER = "torch.onnx (TorchScript, dynamo=False)"


def example_inputs(net: NetworkIO, batch: int) -> tuple[torch.Tensor, ...]:
    """Random inputs of the network's shapes, for tracing."""
    return tuple(torch.rand(spec.batched(batch)) for spec in net.inputs)


def export_onnx(model: torch.nn.Module, example: tuple[torch.Tensor, ...], path: Path, net: NetworkIO,
                opset: int = OPSET) -> Path:
    """Export with a dynamic batch axis to one self-contained .onnx file (no external-data side files).

    Uses torch.onnx's TorchScript exporter (`dynamo=False`): it needs no onnxscript, folds BatchNorm into the
    convolutions in eval mode, and these networks have no data-dependent control flow (the Up block's pad is
    zero at 320x320, so tracing it as a constant is exact for the only input size there is).
    """
    path = Path(path)
    before = set(os.listdir(path.parent))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # TracerWarning (see above) and the exporter's deprecation notice
        with torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(model, example, str(path), input_names=list(net.input_names),
                              output_names=[net.output.name], dynamic_axes=net.dynamic_axes(), opset_version=opset,
                              do_constant_folding=True, dynamo=False)
    extra = set(os.listdir(path.parent)) - before - {path.name}
    proto = onnx.load(str(path), load_external_data=False)
    external = [t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if extra or external:
        raise BackendError(f"{path}: ONNX export wrote external data ({sorted(extra) or external[:3]}); "
                           "expected one self-contained file")
    return path


def check_onnx(path: Path, net: NetworkIO) -> None:
    """onnx.checker (full check, with shape inference) and the network's input/output names with a dynamic batch."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise BackendError(f"{path}: onnx.checker failed: {str(exc).splitlines()[0][:300]}") from None
    graph = onnx.load(str(path), load_external_data=False).graph
    names_in = [i.name for i in graph.input]
    names_out = [o.name for o in graph.output]
    if names_in != list(net.input_names) or names_out != [net.output.name]:
        raise BackendError(f"{path}: expected inputs {list(net.input_names)} and output [{net.output.name!r}], "
                           f"got {names_in} and {names_out}")
    for vi in (*graph.input, *graph.output):
        dim = vi.type.tensor_type.shape.dim[BATCH_AXIS]
        if dim.dim_value or not dim.dim_param:
            raise BackendError(f"{path}: tensor {vi.name!r} has a fixed batch size; expected a dynamic one")
