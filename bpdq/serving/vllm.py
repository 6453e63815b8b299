"""vLLM quantization plugin: serve bpdq checkpoints with ``vllm serve DIR`` / ``vllm.LLM(model=DIR)``.

vLLM loads this module through the ``vllm.general_plugins`` entry point (``bpdq = bpdq.serving.vllm:register``,
see pyproject.toml) in every process it starts; :func:`register` adds :class:`BpdqVllmConfig` under the
quantization method ``"bpdq"``, which vLLM selects for checkpoints whose ``config.json`` says
``quantization_config.quant_method: "bpdq"`` (and for no other checkpoint). Importing :mod:`bpdq` never
imports this module.

Layers: every linear layer named in the checkpoint's ``modules`` table gets :class:`BpdqLinearMethod`, the rest
stay unquantized (vLLM's own method). vLLM fuses ``q/k/v_proj`` into ``qkv_proj`` and ``gate/up_proj`` into
``gate_up_proj`` (the model's ``packed_modules_mapping``): the fused layer holds one ``planes``
``uint8[k, out, in/8]`` and one ``coeffs`` ``float16[in/g, k+1, out]`` parameter, and each checkpoint tensor is
loaded into its rows (output dimension 1 of ``planes``, 2 of ``coeffs``). Parts with fewer planes than the
fused layer (a mixed-precision table) are padded with zero planes and zero coefficients, which leaves their
weights unchanged; parts with different group sizes cannot share a layer and are refused.

Tensor parallelism: column-parallel layers split output rows; row-parallel layers split the input columns,
which must fall on group boundaries (``in / tp`` a multiple of the group size); otherwise the layer is
refused when the model is built, with a message naming it and the sizes. Compute goes through
:class:`bpdq.QuantLinear` and bpdq's kernel dispatch (Triton on CUDA, the native ``cpu_lut`` kernel on the CPU),
wrapped in the custom op ``bpdq::vllm_linear`` so that ``torch.compile`` and CUDA graphs treat it as opaque.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch.nn import Parameter
from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.utils import set_weight_attrs

from bpdq.checkpoint import QUANT_METHOD, check_quantization_config
from bpdq.linear import QuantLinear

log = logging.getLogger(__name__)

__all__ = ["BpdqLinearMethod", "BpdqVllmConfig", "register"]


class BpdqVllmConfig(QuantizationConfig):
    """A bpdq checkpoint's ``quantization_config`` (its ``modules`` table) as vLLM's quantization config."""

    def __init__(self, modules: dict[str, dict[str, Any]]) -> None:
        super().__init__()
        self.modules = modules

    def __repr__(self) -> str:
        return f"BpdqVllmConfig({len(self.modules)} quantized modules)"

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.float16, torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 70  # Triton's minimum (Volta)

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # the quantization_config lives in config.json

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "BpdqVllmConfig":
        """Validate (quant_method, format_version, module table) as :func:`bpdq.load` does."""
        return cls(check_quantization_config(config))

    def apply_vllm_mapper(self, hf_to_vllm_mapper: Any) -> None:
        # models whose vLLM module names differ from the checkpoint's rename the table's keys the same way
        self.modules = hf_to_vllm_mapper.apply_dict(self.modules)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, LinearBase):
            parts = self._parts(prefix)
            if not parts:
                return UnquantizedLinearMethod()
            return BpdqLinearMethod(prefix, parts)
        if prefix in self.modules:
            raise ValueError(
                f"bpdq checkpoint quantizes {prefix!r}, a {type(layer).__name__}: the vLLM plugin serves quantized "
                "linear layers (LinearBase) only; quantize that module's weights without a rule for it"
            )
        return None

    def _parts(self, prefix: str) -> list[tuple[str, dict[str, Any]]]:
        """``(checkpoint name, table entry)`` of each quantized part of the vLLM layer ``prefix`` (several for a
        fused layer); empty when the layer is not quantized. A half-quantized fused layer is refused."""
        parent, _, leaf = prefix.rpartition(".")
        names = [f"{parent}.{p}" if parent else p for p in self.packed_modules_mapping.get(leaf, [])] or [prefix]
        found = [(n, self.modules[n]) for n in names if n in self.modules]
        if found and len(found) != len(names):
            missing = [n for n in names if n not in self.modules]
            raise ValueError(
                f"vLLM fuses {names} into {prefix!r}, but the bpdq checkpoint quantizes only some of them "
                f"(not {missing}); a fused layer must be quantized in all its parts or in none"
            )
        return found


def _pad_planes(kind: str, tensor: torch.Tensor, k: int) -> torch.Tensor:
    """``tensor`` (``planes`` or ``coeffs`` of a ``k_t``-plane weight) as a ``k``-plane one with the same values:
    extra planes are zero and weigh zero; the offset stays the last coefficient."""
    if kind == "planes":
        pad = tensor.new_zeros(k - tensor.shape[0], *tensor.shape[1:])
        return torch.cat([tensor, pad], 0)
    k_t = tensor.shape[1] - 1
    pad = tensor.new_zeros(tensor.shape[0], k - k_t, tensor.shape[2])
    return torch.cat([tensor[:, :k_t], pad, tensor[:, k_t:]], 1)


class BpdqLinearMethod(LinearMethodBase):
    """Packed planes + coefficients of one (possibly fused, possibly sharded) vLLM linear layer."""

    def __init__(self, prefix: str, parts: list[tuple[str, dict[str, Any]]]) -> None:
        self.prefix = prefix
        sizes = {entry["group_size"] for _, entry in parts}
        if len(sizes) != 1:
            raise ValueError(
                f"vLLM fuses {[n for n, _ in parts]} into {prefix!r}, but their bpdq group sizes differ "
                f"({ {n: e['group_size'] for n, e in parts} }); fused parts need one group size"
            )
        self.group_size = sizes.pop()
        self.k = max(entry["planes"] for _, entry in parts)
        self.linear: QuantLinear | None = None

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        g, k = self.group_size, self.k
        if input_size % g:
            raise ValueError(
                f"bpdq layer {self.prefix!r}: group_size {g} does not divide its {input_size} input columns"
            )
        if input_size_per_partition % g:
            tp = input_size // input_size_per_partition
            raise ValueError(
                f"bpdq layer {self.prefix!r}: tensor parallelism over {tp} ranks splits its {input_size} input "
                f"columns into {input_size_per_partition} per rank, which cuts its groups of {g} columns "
                f"({input_size // g} groups do not divide into {tp}); serve it with a tensor_parallel_size that "
                f"divides {input_size // g}, or quantize with a group size dividing {input_size_per_partition}"
            )
        out = sum(output_partition_sizes)
        layer_loader = extra_weight_attrs.pop("weight_loader")
        planes = Parameter(torch.empty(k, out, input_size_per_partition // 8, dtype=torch.uint8), requires_grad=False)
        coeffs = Parameter(torch.empty(input_size_per_partition // g, k + 1, out, dtype=torch.float16), requires_grad=False)
        # output_dim/input_dim tell vLLM's linear layers which axis holds rows / (packed) input columns: they
        # slice fused parts by output rows and tensor-parallel shards by rows or input columns.
        set_weight_attrs(planes, {"output_dim": 1, "input_dim": 2, "weight_loader": self._loader(layer_loader, "planes")})
        set_weight_attrs(coeffs, {"output_dim": 2, "input_dim": 0, "weight_loader": self._loader(layer_loader, "coeffs")})
        for p in (planes, coeffs):
            set_weight_attrs(p, extra_weight_attrs)
        layer.register_parameter("planes", planes)
        layer.register_parameter("coeffs", coeffs)
        self.input_size = input_size

    def _loader(self, layer_loader: Callable[..., None], kind: str) -> Callable[..., None]:
        def load(param: Parameter, loaded: torch.Tensor, *shard: Any) -> None:
            expected = torch.uint8 if kind == "planes" else torch.float16
            cols = self.input_size // 8 if kind == "planes" else self.input_size // self.group_size
            col_dim, k_loaded = (2, loaded.shape[0]) if kind == "planes" else (0, loaded.shape[1] - 1)
            if loaded.dtype != expected or loaded.dim() != 3 or loaded.shape[col_dim] != cols or k_loaded > self.k:
                raise ValueError(
                    f"bpdq layer {self.prefix!r}{' part ' + repr(shard[0]) if shard else ''}: checkpoint {kind} "
                    f"tensor is {loaded.dtype}{list(loaded.shape)}, expected {expected} with {cols} columns on axis "
                    f"{col_dim} and at most {self.k} planes (group size {self.group_size}, {self.input_size} inputs)"
                )
            if k_loaded < self.k:
                loaded = _pad_planes(kind, loaded, self.k)
            layer_loader(param, loaded, *shard)

        return load

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        in_features = layer.planes.shape[2] * 8
        linear = QuantLinear(
            in_features, layer.planes.shape[1], planes=self.k, group_size=self.group_size, device="meta"
        )
        linear.planes, linear.coeffs = layer.planes.data, layer.coeffs.data
        self.linear = linear
        self.key = _register_layer(linear)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = torch.ops.bpdq.vllm_linear(x, self.key)
        return y + bias if bias is not None else y


# ---- the custom op: bpdq's kernel dispatch is Python, opaque to torch.compile -------------------------------

_LAYERS: list[QuantLinear] = []


def _register_layer(linear: QuantLinear) -> int:
    _LAYERS.append(linear)
    return len(_LAYERS) - 1


@torch.library.custom_op("bpdq::vllm_linear", mutates_args=())
def _vllm_linear(x: torch.Tensor, key: int) -> torch.Tensor:
    return _LAYERS[key](x)


@_vllm_linear.register_fake
def _(x: torch.Tensor, key: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], _LAYERS[key].out_features)


def register() -> None:
    """Register :class:`BpdqVllmConfig` with vLLM under ``"bpdq"`` (vLLM calls it from the entry point in every
    process; calling it again is harmless). Refuses to replace another package's ``"bpdq"`` method."""
    from vllm.model_executor.layers.quantization import _CUSTOMIZED_METHOD_TO_QUANT_CONFIG

    owner = _CUSTOMIZED_METHOD_TO_QUANT_CONFIG.get(QUANT_METHOD)
    if owner is not None and owner is not BpdqVllmConfig:
        raise ValueError(
            f"vLLM already has a quantization config registered for {QUANT_METHOD!r}: "
            f"{owner.__module__}.{owner.__qualname__}; bpdq does not override it"
        )
    register_quantization_config(QUANT_METHOD)(BpdqVllmConfig)
    log.debug("registered the bpdq quantization method with vLLM")
