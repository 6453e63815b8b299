"""Solvers: RTN, GPTQ, BPDQ. ``bpdq.SOLVERS`` lists them by name."""

from bpdq.solvers.asymmetric import (
    AsymmetricAccumulator,
    asymmetric_target,
    asymmetric_target_projected,
    asymmetric_targets,
)
from bpdq.solvers.bpdq import BPDQ, BPDQOptions, BPDQSweep, bpdq_sweep, level_thresholds
from bpdq.solvers.base import Solver, check_weight, group_rows, proxy_loss
from bpdq.solvers.gptq import GPTQ, GPTQOptions, gptq_sweep
from bpdq.solvers.fit import WhitenedFit
from bpdq.solvers.hessian import HessianAccumulator, check_hessian, fix_dead_inputs, inverse_cholesky
from bpdq.solvers.ordering import Order, column_permutation, gar_permutation
from bpdq.solvers.refit import Refit, RefitResult, refit_coefficients
from bpdq.solvers.rtn import RTN, RTNOptions
from bpdq.solvers.sweep import SweepLayer, prepare_layer, restore_order

__all__ = [
    "AsymmetricAccumulator",
    "BPDQ",
    "BPDQOptions",
    "BPDQSweep",
    "GPTQ",
    "GPTQOptions",
    "HessianAccumulator",
    "Order",
    "RTN",
    "RTNOptions",
    "Refit",
    "RefitResult",
    "Solver",
    "SweepLayer",
    "WhitenedFit",
    "asymmetric_target",
    "asymmetric_target_projected",
    "asymmetric_targets",
    "bpdq_sweep",
    "check_hessian",
    "check_weight",
    "column_permutation",
    "fix_dead_inputs",
    "gar_permutation",
    "gptq_sweep",
    "group_rows",
    "inverse_cholesky",
    "level_thresholds",
    "prepare_layer",
    "proxy_loss",
    "refit_coefficients",
    "restore_order",
]
