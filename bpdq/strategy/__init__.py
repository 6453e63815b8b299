"""The strategy config of a quantization run (model, calibration, recipe, rules, output, device).

``load_strategy(path, overrides)`` reads YAML/JSON, applies ``a.b.c=value`` overrides and validates;
problems raise ``StrategyError`` (a ``ValueError``) naming the field path, the value and what is allowed.
"""

from bpdq.strategy.errors import StrategyError, format_errors, format_path
from bpdq.strategy.io import apply_override, parse_yaml, read_config
from bpdq.strategy.model import FORMAT_VERSION, Strategy, load_strategy, strategy_from_dict

__all__ = [
    "FORMAT_VERSION",
    "Strategy",
    "StrategyError",
    "apply_override",
    "format_errors",
    "format_path",
    "load_strategy",
    "parse_yaml",
    "read_config",
    "strategy_from_dict",
]
