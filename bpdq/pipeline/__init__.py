"""The quantization run: sources (where weights come from), calibration, sinks (where results go) and the
per-layer loop that ties them together (see :mod:`bpdq.pipeline.run`)."""

from bpdq.pipeline.calibrate import ActivationStore, Batch, Replay
from bpdq.pipeline.run import (
    LayerHooks,
    LayerStep,
    needs_calibration,
    quantize_model,
    resolve_device,
    run_quantization,
)
from bpdq.pipeline.sink import CheckpointSink, InMemorySink, OutputDir, Sink, check_output_dir
from bpdq.pipeline.source import InMemorySource, LazySource, ModelSource, is_model_directory

__all__ = [
    "ActivationStore",
    "Batch",
    "CheckpointSink",
    "InMemorySink",
    "InMemorySource",
    "LayerHooks",
    "LayerStep",
    "LazySource",
    "ModelSource",
    "OutputDir",
    "Replay",
    "Sink",
    "check_output_dir",
    "is_model_directory",
    "needs_calibration",
    "quantize_model",
    "resolve_device",
    "run_quantization",
]
