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

Mixtures of experts: a checkpoint's ``"type": "experts"`` entry (docs/format.md) gets :class:`BpdqFusedMoEMethod`
on vLLM's fused-MoE layer (``RoutedExperts``): it holds the stacked ``gate_up``/``down`` planes and coefficients of
the rank's local experts (tensor parallelism: the gate and up halves split by output rows, ``down`` by input
columns on group boundaries) and computes, after vLLM's routing, each routed local expert through
:class:`bpdq.experts.QuantExperts` (custom op ``bpdq::vllm_experts``).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch.nn import Parameter
from vllm.model_executor.layers.fused_moe import FusedMoEMethodBase, RoutedExperts
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod
from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.utils import set_weight_attrs

from bpdq.checkpoint import QUANT_METHOD, check_quantization_config
from bpdq.experts import PROJECTIONS, QuantExperts, buffer_prefix
from bpdq.linear import QuantLinear

log = logging.getLogger(__name__)

__all__ = ["BpdqFusedMoEMethod", "BpdqLinearMethod", "BpdqVllmConfig", "register"]


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
        if isinstance(layer, RoutedExperts):
            entry = self.modules.get(prefix)
            if entry is None:
                stored = prefix.replace(".block_sparse_moe.", ".mlp.")
                if stored != prefix and stored in self.modules:
                    if _architecture() != "MixtralForCausalLM":
                        raise ValueError(
                            f"bpdq checkpoint names the mixture of experts block {stored!r} (transformers' module "
                            f"name), vLLM's {_architecture()} names it {prefix!r} and renames no checkpoint weight "
                            "from one to the other; the plugin maps these names for Mixtral only"
                        )
                    _teach_mixtral_transformers_names()
                    self.modules = {k.replace(".mlp.", ".block_sparse_moe.", 1): v for k, v in self.modules.items()}
                    entry = self.modules[prefix]
                else:
                    return UnquantizedFusedMoEMethod(layer.moe_config)
            if entry.get("type") != "experts":
                raise ValueError(f"bpdq checkpoint quantizes {prefix!r}, vLLM's fused experts layer, with a linear "
                                 "entry; an experts module needs a \"type\": \"experts\" entry (docs/format.md)")
            return BpdqFusedMoEMethod(prefix, entry, layer.moe_config)
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


#: transformers 5 (and so bpdq's checkpoints) name Mixtral's sparse block ``mlp``; vLLM's Mixtral, like the
#: checkpoints on the hub, ``block_sparse_moe``.
MIXTRAL_RENAME = {".mlp.": ".block_sparse_moe."}


def _architecture() -> str | None:
    """The architecture of the model vLLM is building (``None`` outside a model build)."""
    from vllm.config.vllm import get_current_vllm_config_or_none

    config = get_current_vllm_config_or_none()
    return None if config is None or config.model_config is None else config.model_config.architecture


def _teach_mixtral_transformers_names() -> None:
    """Make vLLM's Mixtral read a checkpoint written with transformers 5's module names (``layers.N.mlp.gate``,
    ``layers.N.mlp.experts.*``): its weight mapper gains the rename ``.mlp.`` -> ``.block_sparse_moe.``. Called
    while a bpdq Mixtral checkpoint's model is built, before its weights load; checkpoints in vLLM's names have
    no ``.mlp.`` in a Mixtral, so the rename leaves them as they are."""
    from vllm.model_executor.models import mixtral
    from vllm.model_executor.models.utils import WeightsMapper

    mapper = mixtral.MixtralModel.hf_to_vllm_mapper
    if all(mapper.orig_to_new_substr.get(k) == v for k, v in MIXTRAL_RENAME.items()):
        return
    mixtral.MixtralModel.hf_to_vllm_mapper = mapper | WeightsMapper(orig_to_new_substr=MIXTRAL_RENAME)
    log.info("bpdq: vLLM's Mixtral reads this checkpoint's transformers 5 names (%s)", MIXTRAL_RENAME)


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


# ---- mixtures of experts ------------------------------------------------------------------------------------

#: kinds of stacked tensors per projection: ``<prefix>_planes uint8[E, k, out, in/8]``, ``<prefix>_coeffs
#: float16[E, in/g, k+1, out]``; the axes of ``out`` and of the (packed) ``in`` columns.
_EXPERT_AXES = {"planes": {"out": 2, "in": 3}, "coeffs": {"out": 3, "in": 1}}


def shard_experts_tensor(projection: str, kind: str, tensor: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    """Tensor-parallel rank ``rank``'s part of a stacked experts tensor (all experts): ``gate_up`` keeps its
    ``1/tp`` of the gate rows and of the up rows (gate, then up); ``down`` its ``1/tp`` of the input columns (whole
    groups and whole bytes, checked by the caller)."""
    if tp == 1:
        return tensor
    axes = _EXPERT_AXES[kind]
    if projection == "gate_up_proj":
        gate, up = tensor.chunk(2, dim=axes["out"])
        return torch.cat([gate.chunk(tp, dim=axes["out"])[rank], up.chunk(tp, dim=axes["out"])[rank]], axes["out"])
    return tensor.chunk(tp, dim=axes["in"])[rank]


class BpdqFusedMoEMethod(FusedMoEMethodBase):
    """The stacked packed experts of one vLLM fused-MoE layer (its rank's local experts and tensor-parallel part);
    the forward runs each routed local expert through :class:`bpdq.experts.QuantExperts` (plain PyTorch or bpdq's
    kernels), after vLLM's routing."""

    def __init__(self, prefix: str, entry: dict[str, Any], moe: Any) -> None:
        super().__init__(moe)
        self.prefix = prefix
        self.projections = {name: dict(entry["projections"][name]) for name in PROJECTIONS}
        self.experts: QuantExperts | None = None

    def create_weights(
        self,
        layer: torch.nn.Module,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        moe = layer.moe_config
        where = f"bpdq experts layer {self.prefix!r}"
        if moe.activation.value != "silu" or not moe.is_act_and_mul:
            raise ValueError(f"{where}: vLLM builds it with activation {moe.activation.value!r}; bpdq's experts "
                             "compute down(silu(gate x) * up x) only (Qwen2/3-MoE, Mixtral)")
        if getattr(layer, "apply_router_weight_on_input", False):
            raise ValueError(f"{where}: router weights applied to the input are not supported")
        unpadded = extra_weight_attrs.get("unpadded_hidden_size") or hidden_size
        if unpadded != hidden_size:
            raise ValueError(f"{where}: vLLM pads the hidden size {unpadded} to {hidden_size} (all-to-all "
                             "kernels); bpdq's experts are not padded")
        inter, tp = intermediate_size_per_partition, moe.tp_size
        shapes = {"gate_up_proj": (2 * inter, hidden_size), "down_proj": (hidden_size, inter)}
        for name in PROJECTIONS:
            g = self.projections[name]["group_size"]
            out, inp = shapes[name]
            if not (inp % g or inp % 8):
                continue
            if name == "down_proj" and tp > 1:
                raise ValueError(
                    f"{where} {name}: tensor parallelism over {tp} ranks splits its {inp * tp} input columns into "
                    f"{inp} per rank, which cuts its groups of {g} columns (or bytes of 8 columns); serve it with a "
                    f"tensor_parallel_size that divides {inp * tp // g}, with enable_expert_parallel=True, or "
                    f"quantize with a group size dividing {inp}"
                )
            raise ValueError(f"{where} {name}: its {inp} input columns are not a whole number of groups of {g} "
                             "columns and of bytes of 8 columns")
        self.hidden_size, self.intermediate = hidden_size, inter
        for name in PROJECTIONS:
            k, g = self.projections[name]["planes"], self.projections[name]["group_size"]
            out, inp = shapes[name]
            prefix = buffer_prefix(name)
            for kind, shape, dtype in (("planes", (num_experts, k, out, inp // 8), torch.uint8),
                                       ("coeffs", (num_experts, inp // g, k + 1, out), torch.float16)):
                param = Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
                set_weight_attrs(param, {"weight_loader": self._loader(layer, name, kind)})
                layer.register_parameter(f"{prefix}_{kind}", param)
        _load_stacked_by_name(layer, {f"{buffer_prefix(n)}_{kind}" for n in PROJECTIONS for kind in _EXPERT_AXES})

    def _loader(self, layer: torch.nn.Module, projection: str, kind: str) -> Callable[..., None]:
        def load(param: Parameter, loaded: torch.Tensor, *_: Any) -> None:
            moe = layer.moe_config
            expected_dtype = torch.uint8 if kind == "planes" else torch.float16
            full = list(param.shape)
            full[0] = moe.num_experts
            axes = _EXPERT_AXES[kind]
            full[axes["out"]] *= moe.tp_size if projection == "gate_up_proj" else 1
            full[axes["in"]] *= moe.tp_size if projection == "down_proj" else 1
            if loaded.dtype != expected_dtype or list(loaded.shape) != full:
                raise ValueError(
                    f"bpdq experts layer {self.prefix!r}: checkpoint {buffer_prefix(projection)}_{kind} tensor is "
                    f"{loaded.dtype}{list(loaded.shape)}, expected {expected_dtype}{full} "
                    f"({self.projections[projection]['planes']} planes, group size "
                    f"{self.projections[projection]['group_size']}, {moe.num_experts} experts)"
                )
            part = shard_experts_tensor(projection, kind, loaded, moe.tp_rank, moe.tp_size)
            for e in range(moe.num_experts):
                local = layer._map_global_expert_id_to_local_expert_id(e)
                if local >= 0:
                    param.data[local].copy_(part[e])

        return load

    def get_fused_moe_quant_config(self, layer: torch.nn.Module) -> None:
        return None  # no vLLM kernel runs these weights

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        experts = QuantExperts(
            layer.gate_up_planes.shape[0], self.hidden_size, self.intermediate, projections=self.projections,
            act_fn=torch.nn.functional.silu, dtype=layer.params_dtype, device="meta",
        )
        for name in PROJECTIONS:
            prefix = buffer_prefix(name)
            for kind in _EXPERT_AXES:
                setattr(experts, f"{prefix}_{kind}", getattr(layer, f"{prefix}_{kind}").data)
        self.experts = experts
        self.key = _register_experts(experts)

    def apply(
        self,
        layer: torch.nn.Module,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        shared_experts: Any = None,
        shared_experts_input: torch.Tensor | None = None,
    ) -> torch.Tensor:
        expert_map = layer.expert_map
        if expert_map is not None:  # global -> local ids; -1: another rank's expert
            topk_ids = expert_map[topk_ids.long()]
        return torch.ops.bpdq.vllm_experts(x, topk_weights, topk_ids.long(), self.key)


def _load_stacked_by_name(layer: torch.nn.Module, names: set[str]) -> None:
    """Have ``layer.load_weights`` load the stacked bpdq tensors ``names`` (named relative to the layer, all experts
    in one tensor) through their parameters' loaders: vLLM's own ``RoutedExperts.load_weights`` matches only its
    expert-name patterns (``experts.{e}.gate_proj``, ``experts.gate_up_proj``) and would drop them."""
    original = layer.load_weights

    def load_weights(weights: Any) -> Any:
        loaded: list[str] = []

        def others() -> Any:
            for name, tensor in weights:
                if name in names:
                    param = getattr(layer, name)
                    param.weight_loader(param, tensor)
                    loaded.append(name)
                else:
                    yield name, tensor

        yield from original(others())
        yield from loaded

    layer.load_weights = load_weights


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


_EXPERTS: list[QuantExperts] = []


def _register_experts(experts: QuantExperts) -> int:
    _EXPERTS.append(experts)
    return len(_EXPERTS) - 1


@torch.library.custom_op("bpdq::vllm_experts", mutates_args=())
def _vllm_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, key: int) -> torch.Tensor:
    return _EXPERTS[key](x, topk_ids, topk_weights)


@_vllm_experts.register_fake
def _(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, key: int) -> torch.Tensor:
    return torch.empty_like(x)


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
