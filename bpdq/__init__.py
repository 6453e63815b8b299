"""bpdq: Bit-Plane Decomposition Quantization of LLM weights (2-4 bits) with pluggable grids, solvers,
kernels and model adapters.

``import bpdq`` is light: the public names below are imported on first use (PEP 562), the registries load
their built-in implementations on first lookup, and the transformers integration (``from_pretrained`` of
bpdq checkpoints) registers itself when transformers' quantizers are first imported.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from bpdq.version import __version__  # noqa: F401  (bpdq.__version__)

#: Public name -> module defining it.
_EXPORTS = {
    "ADAPTERS": "bpdq.registry",
    "GRIDS": "bpdq.registry",
    "KERNELS": "bpdq.registry",
    "SOLVERS": "bpdq.registry",
    "STAGES": "bpdq.registry",
    "Registry": "bpdq.registry",
    "UnknownNameError": "bpdq.registry",
    "build_grid": "bpdq.api",
    "build_solver": "bpdq.api",
    "quantize": "bpdq.api",
    "quantize_model": "bpdq.api",
    "quantize_weight": "bpdq.api",
    "load": "bpdq.api",
    "save": "bpdq.api",
    "BitPlaneGrid": "bpdq.grids",
    "Grid": "bpdq.grids",
    "UniformGrid": "bpdq.grids",
    "Kernel": "bpdq.kernels",
    "KernelUnavailableError": "bpdq.kernels",
    "QuantLinear": "bpdq.linear",
    "QuantizedWeight": "bpdq.quantized",
    "SolveStats": "bpdq.quantized",
    "BPDQ": "bpdq.solvers",
    "GPTQ": "bpdq.solvers",
    "RTN": "bpdq.solvers",
    "Solver": "bpdq.solvers",
    "CalibrationConfig": "bpdq.config",
    "ConfigError": "bpdq.config",
    "QuantizeConfig": "bpdq.config",
    "Recipe": "bpdq.config",
    "Rule": "bpdq.config",
    "Stage": "bpdq.engine.stages",
    "LayerStep": "bpdq.engine.stages",
    "RunReport": "bpdq.report",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a subpackage: bpdq.grids, bpdq.hf, ...
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module 'bpdq' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


from bpdq import _transformers_hook  # noqa: E402

_transformers_hook.install()
