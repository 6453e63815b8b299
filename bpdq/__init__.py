"""bpdq: Bit-Plane Decomposition Quantization of LLM weights (2-4 bits) with pluggable grids, solvers,
kernels and model adapters."""

__version__ = "0.1.0"

from bpdq.registry import ADAPTERS, GRIDS, KERNELS, SOLVERS, Registry, UnknownNameError  # noqa: E402
from bpdq import grids, kernels, solvers  # noqa: E402,F401  (register the built-in implementations)
from bpdq.api import build_grid, build_solver, quantize_weight  # noqa: E402
from bpdq.grids import BitPlaneGrid, Grid, UniformGrid  # noqa: E402
from bpdq.kernels import Kernel, KernelUnavailableError  # noqa: E402
from bpdq.linear import QuantLinear  # noqa: E402
from bpdq.quantized import QuantizedWeight, SolveStats  # noqa: E402
from bpdq.solvers import RTN, Solver  # noqa: E402
from bpdq import models  # noqa: E402,F401  (register the built-in model adapters)
from bpdq.checkpoint import load, save  # noqa: E402
from bpdq.config import CalibrationConfig, Recipe, Rule  # noqa: E402
from bpdq.pipeline import quantize_model  # noqa: E402
from bpdq.report import RunReport  # noqa: E402
from bpdq import hf  # noqa: E402  (transformers loads bpdq checkpoints once bpdq is imported)

hf.register()

__all__ = [
    "ADAPTERS",
    "GRIDS",
    "KERNELS",
    "SOLVERS",
    "RTN",
    "BitPlaneGrid",
    "CalibrationConfig",
    "Grid",
    "Kernel",
    "KernelUnavailableError",
    "QuantLinear",
    "QuantizedWeight",
    "Recipe",
    "Rule",
    "RunReport",
    "Registry",
    "SolveStats",
    "Solver",
    "UniformGrid",
    "UnknownNameError",
    "__version__",
    "build_grid",
    "build_solver",
    "load",
    "quantize_model",
    "quantize_weight",
    "save",
]
