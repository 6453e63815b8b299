"""Configuration of a quantization run: ``QuantizeConfig`` (one object per run), the per-module ``Recipe``
and ``Rule`` s, and the ``CalibrationConfig``. Problems raise ``ConfigError`` (a ``ValueError``) naming the
field path, the value and what is allowed."""

from bpdq.config.files import ConfigError, apply_override, parse_yaml, read_config
from bpdq.config.recipe import Recipe, Rule, as_recipe, as_rules, resolve_recipe
from bpdq.config.run import FORMAT_VERSION, CalibrationConfig, QuantizeConfig, as_config

__all__ = [
    "FORMAT_VERSION",
    "CalibrationConfig",
    "ConfigError",
    "QuantizeConfig",
    "Recipe",
    "Rule",
    "apply_override",
    "as_config",
    "as_recipe",
    "as_rules",
    "parse_yaml",
    "read_config",
    "resolve_recipe",
]
