"""Solvers: RTN, GPTQ, BPDQ. ``bpdq.SOLVERS`` lists them by name."""

from bpdq.solvers.bpdq import BPDQ, BPDQOptions, BPDQSweep, bpdq_sweep, level_thresholds
from bpdq.solvers.base import Solver, check_hessian, check_weight, group_rows, proxy_loss
from bpdq.solvers.gptq import GPTQ, GPTQOptions, gptq_sweep
from bpdq.solvers.fit import WhitenedFit
from bpdq.solvers.hessian import HessianAccumulator, check_hessian_matrix, fix_dead_inputs, inverse_cholesky
from bpdq.solvers.ordering import Order, column_permutation, gar_permutation
from bpdq.solvers.rtn import RTN, RTNOptions
from bpdq.solvers.sweep import SweepLayer, prepare_layer, restore_order

__all__ = [
    "BPDQ",
    "BPDQOptions",
    "BPDQSweep",
    "GPTQ",
    "GPTQOptions",
    "HessianAccumulator",
    "Order",
    "RTN",
    "RTNOptions",
    "Solver",
    "SweepLayer",
    "WhitenedFit",
    "bpdq_sweep",
    "check_hessian",
    "check_hessian_matrix",
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
    "restore_order",
]
