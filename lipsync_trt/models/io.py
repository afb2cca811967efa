"""Tensor names and shapes of the two networks, defined once for export, verification and every runner."""
from __future__ import annotations

from dataclasses import dataclass

from .. import recipe as R

BATCH_AXIS = 0            # the only dynamic axis of every input and output
BATCH_AXIS_NAME = "batch"  # its name in the ONNX graphs


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output; `shape` leaves out the leading batch axis."""

    name: str
    shape: tuple[int, ...]

    def batched(self, batch: int) -> tuple[int, ...]:
        return (batch, *self.shape)


@dataclass(frozen=True)
class NetworkIO:
    """The inputs (in call order) and the single output of one network."""

    name: str
    inputs: tuple[TensorSpec, ...]
    output: TensorSpec

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def slices(self, inputs: tuple, most: int):
        """{name: slice} feeds over consecutive batch slices of at most `most` (for a fixed maximum batch)."""
        total = inputs[0].shape[BATCH_AXIS]
        for i in range(0, total, most):
            yield {spec.name: x[i:i + most] for spec, x in zip(self.inputs, inputs)}

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx.export's `dynamic_axes`: the batch axis of every input and the output."""
        return {t.name: {BATCH_AXIS: BATCH_AXIS_NAME} for t in (*self.inputs, self.output)}

    def check(self, *tensors) -> int:
        """The common batch size of `tensors` (one per input, in order); UsageError naming one that does not fit."""
        from ..errors import UsageError

        if len(tensors) != len(self.inputs):
            raise UsageError(f"{self.name}: expected inputs {list(self.input_names)}, got {len(tensors)} tensors")
        batch = None
        for spec, t in zip(self.inputs, tensors):
            shape = tuple(getattr(t, "shape", ()))
            if len(shape) != len(spec.shape) + 1 or shape[1:] != spec.shape:
                want = ", ".join(map(str, spec.shape))
                raise UsageError(f"{self.name} input {spec.name!r}: expected shape (B, {want}), got {shape}")
            if batch is not None and shape[0] != batch:
                raise UsageError(f"{self.name} inputs: batch sizes differ ({batch} and {shape[0]} for {spec.name!r})")
            batch = shape[0]
        return batch


GENERATOR = NetworkIO(
    "generator",
    inputs=(TensorSpec("images", (R.GENERATOR_IN_CHANNELS, R.ROI_SIZE, R.ROI_SIZE)),   # roi + masked roi, BGR in [0, 1]
            TensorSpec("audio", R.FEATURE_SHAPE)),                                   # one frame's feature window
    output=TensorSpec("output", (3, R.ROI_SIZE, R.ROI_SIZE)))                        # BGR in [0, 1]

AUDIO_ENCODER = NetworkIO(
    "audio_encoder",
    inputs=(TensorSpec("mel", (1, R.N_MELS, R.MEL_WINDOW)),),
    output=TensorSpec("features", (R.FEATURE_DIM,)))

NETWORKS = {n.name: n for n in (GENERATOR, AUDIO_ENCODER)}
