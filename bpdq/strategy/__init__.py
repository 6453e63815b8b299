"""The CLI's strategy config: a :class:`~bpdq.config.QuantizeConfig` plus ``model:``.

``load_strategy(path, overrides)`` reads YAML/JSON, applies ``a.b.c=value`` overrides and validates;
problems raise ``StrategyError`` (a ``ValueError``) naming the field path, the value and what is allowed.
"""

from bpdq.config.files import ConfigError as StrategyError
from bpdq.config.files import apply_override, parse_yaml, read_config
from bpdq.config.run import FORMAT_VERSION
from bpdq.strategy.model import Strategy, load_strategy, strategy_from_dict
from bpdq.validation import format_errors, format_path

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
