"""Solvers: RTN, GPTQ, BPDQ. ``bpdq.SOLVERS`` lists them by name."""

from bpdq.solvers.base import Solver, check_hessian, check_weight, group_rows, proxy_loss
from bpdq.solvers.rtn import RTN, RTNOptions

__all__ = ["RTN", "RTNOptions", "Solver", "check_hessian", "check_weight", "group_rows", "proxy_loss"]
