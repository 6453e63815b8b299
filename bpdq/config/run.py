"""The configuration of one quantization run: ``QuantizeConfig`` (and its ``CalibrationConfig``).

One object carries everything a run needs: the scheme (the default ``quantize`` recipe and the ``rules``),
the calibration, the quality options (``calibration.asymmetric``, ``tuning``, ``target_bpw``), the runtime
(``device``, ``dtype``, ``progress``) and the output (``output``, ``overwrite``, ``max_shard_size``,
``resume``). It reads and writes YAML/JSON; the CLI's strategy file is a ``QuantizeConfig`` plus ``model:``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Literal

import yaml
from pydantic import Field, field_validator

from bpdq.config.recipe import ConfigModel, Recipe, Rule
from bpdq.devices import Autocast, check_device_name
from bpdq.registry import STAGES
from bpdq.shards import DEFAULT_MAX_SHARD_SIZE, parse_size
from bpdq.tuning import TuningOptions

FORMAT_VERSION = 1
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
ResumeMode = Literal["auto", "never", "required"]


class CalibrationConfig(ConfigModel):
    """Calibration text (a ``.txt``/``.jsonl`` path, a directory of those, or ``builtin:NAME``) and how many
    windows of how many tokens to draw from it with which seed."""

    text: str = "builtin:python-docs"
    samples: int = Field(default=128, ge=1, le=100_000)
    seq_len: int = Field(default=512, ge=2, le=1_000_000)
    seed: int = Field(default=0, ge=0)
    batch_size: int = Field(default=8, ge=1, le=4096, description="calibration windows per forward pass")
    offload: int | str | None = Field(
        default=None,
        description="memory budget of the calibration activations (bytes, or a size such as '2GB'), every "
        "stream together (inputs, outputs, full-precision stream, recorded sub-block outputs); batches beyond it "
        "are kept in a temporary directory on disk. None keeps them all in memory",
    )
    asymmetric: bool | Literal["auto"] = Field(
        default="auto",
        description="fit each decoder linear to the full-precision model's output on full-precision inputs "
        "(GPTAQ-style): carries a full-precision activation stream and a full-precision copy of the layer in "
        "work (twice the activations, within the one offload budget; also under torchrun). auto: on wherever it "
        "applies (a solver that uses a Hessian, dense decoder layers, no other stage computing the Hessians); "
        "true: required; false: off",
    )
    asymmetric_damp: float = Field(
        default=0.1,
        ge=0.0,
        le=10.0,
        allow_inf_nan=False,
        description="asymmetric calibration: damping of each target's solve, W + W D (H_q + damp * mean(diag H_q) I)^-1, "
        "relative to the mean diagonal; more keeps the targets nearer the weights, less fits them closer to the "
        "calibration text",
    )
    autocast: Autocast = Field(
        default="none",
        description="compute dtype of the calibration passes' forwards (torch.autocast): none (the model's dtype), "
        "bfloat16, float16, or auto (bfloat16 where the device has bf16 matrix units: a CPU with AMX or "
        "AVX512-BF16, a CUDA device that supports it; else none). Activations are kept and Hessians summed in "
        "the model's dtype (float32 products)",
    )

    moe_all_experts: bool = Field(
        default=False,
        description="mixtures of experts: calibrate every expert on every calibration token (for its Hessians only; "
        "the layer's output still follows the router). Off: each expert sees the tokens routed to it",
    )
    moe_min_tokens: int | None = Field(
        default=None,
        ge=1,
        description="mixtures of experts: an expert routed fewer tokens than this is calibrated on the layer's "
        "pooled Hessian alone (every token of the layer). None: only the experts no token reaches",
    )
    moe_prior: float = Field(
        default=1.0,
        ge=0,
        allow_inf_nan=False,
        description="mixtures of experts: each expert's Hessian is its routed tokens' plus the layer's pooled "
        "Hessian, weighted as this many tokens per input column (1.0: as many tokens as the expert's input "
        "width); 0: the routed tokens alone. Recorded per expert in the report",
    )

    @field_validator("offload")
    @classmethod
    def _offload(cls, value: int | str | None) -> int | str | None:
        if value is not None:
            parse_size(value, "calibration.offload")
        return value


class QuantizeConfig(ConfigModel):
    """Everything one run of :func:`bpdq.quantize` needs (see the module docstring)."""

    version: Literal[1] = Field(default=FORMAT_VERSION, description="format version of this config")
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    quantize: Recipe = Field(default_factory=Recipe, description="the default recipe for every decoder linear")
    rules: list[Rule] = Field(default_factory=list, description="first match wins; regex on module names")
    tuning: TuningOptions | None = Field(
        default=None,
        description="coefficient tuning of each decoder layer against the full-precision layer's outputs "
        "(off when unset; {} tunes with the defaults); see [tuning](#tuning)",
    )
    target_bpw: float | None = Field(
        default=None,
        description="average bits per weight to meet by choosing 1..4 planes per module (at least 2 when the target "
        "allows every module 2) at quantize.group_size "
        "from each module's measured relative proxy loss (bitplane grid; k + 16(k+1)/g per weight; off when unset). Costs "
        "one extra calibration pass over the full-precision model and 4 GPTQ probe solves per linear",
    )
    output: str | None = Field(
        default=None,
        description="checkpoint directory, written as the run goes and renamed into place at the end (required "
        "for a model directory; optional for a model in memory)",
    )
    overwrite: bool = Field(default=False, description="replace a non-empty output directory")
    max_shard_size: int | str = Field(
        default=DEFAULT_MAX_SHARD_SIZE, description="largest checkpoint shard (bytes, or a size such as '2GB')"
    )
    resume: ResumeMode | None = Field(
        default=None,
        description="keep the run's state beside the output after each decoder layer and continue an "
        "interrupted run: auto (when a state is there), never (remove it first), required (fail without one); "
        "unset keeps no state (the CLI's --resume defaults to auto)",
    )
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    dtype: Dtype = Field(
        default="auto",
        description="dtype the model is loaded in (auto: as stored; a GGUF file loads as float32). bfloat16 "
        "makes calibration several times faster on CPUs with bf16 matrix units; unquantized tensors are saved "
        "in this dtype",
    )
    progress: bool = Field(default=True, description="show a progress bar on a terminal")
    stages: list[str | dict[str, Any]] = Field(
        default_factory=list,
        description="user stages of the layer loop registered with bpdq.STAGES (e.g. by a --plugin module), by "
        "name or {type: NAME, **arguments}; they run after the built-in ones",
    )

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, value: list[str | dict[str, Any]]) -> list[str | dict[str, Any]]:
        for spec in value:
            name = spec.get("type") if isinstance(spec, dict) else spec
            if not isinstance(name, str):
                raise ValueError(f"a stage is a registered name or {{type: NAME, ...}}, got {spec!r}")
            STAGES.get(name)  # an unknown name lists the known ones
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        check_device_name(v)
        return v

    @field_validator("max_shard_size")
    @classmethod
    def _shard_size(cls, v: int | str) -> int | str:
        parse_size(v, "max_shard_size")
        return v

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> Any:
        """Validate a raw mapping; every problem found is listed in one :class:`~bpdq.config.ConfigError`
        (``path: value phrase`` per line)."""
        from bpdq.config.validate import validate

        return validate(cls, data, source)

    @classmethod
    def from_file(cls, path: str | Path, overrides: Iterable[str] = ()) -> Any:
        """Read a YAML/JSON file, apply ``a.b.c=value`` overrides (``--set``) and validate."""
        from bpdq.config.files import apply_override, read_config

        data = read_config(path)
        for assignment in overrides:
            apply_override(data, assignment)
        return cls.from_dict(data, f"strategy config {str(path)!r}")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        """Write as YAML (``.yaml``/``.yml``) or JSON (anything else)."""
        path = Path(path)
        text = self.to_yaml() if path.suffix in (".yaml", ".yml") else self.to_json()
        path.write_text(text, encoding="utf-8")


def as_config(config: Any) -> QuantizeConfig:
    """A ``QuantizeConfig`` from itself, a dict of its fields, or a path to a YAML/JSON file."""
    if isinstance(config, QuantizeConfig):
        return config
    if isinstance(config, dict):
        return QuantizeConfig.from_dict(config)
    if isinstance(config, (str, Path)):  # a strategy file's ``model:`` is not part of the run's config
        from bpdq.config.files import read_config

        data = read_config(config)
        data.pop("model", None)
        return QuantizeConfig.from_dict(data, f"config {str(config)!r}")
    raise TypeError(f"config must be a QuantizeConfig, a dict or a path to a YAML/JSON file, got {type(config).__name__}")
