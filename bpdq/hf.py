"""Loading bpdq checkpoints with ``transformers.AutoModelForCausalLM.from_pretrained``.

``import bpdq`` calls :func:`register`, which adds :class:`BpdqConfig` and :class:`BpdqHfQuantizer` for
``quant_method: "bpdq"`` through transformers' public plug-in API (``register_quantization_config`` /
``register_quantizer``). ``from_pretrained(checkpoint_dir)`` then builds the model on the meta device, swaps
the quantized ``nn.Linear`` modules for empty :class:`~bpdq.QuantLinear` modules (the checkpoint's module
table), checks the safetensors headers against the model (names, shapes, dtypes) and lets transformers load
the packed tensors straight into the QuantLinear buffers: no dense weight of a quantized layer is ever
created. Only safetensors files are read and ``trust_remote_code`` is never involved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers import auto as _auto
from transformers.utils.quantization_config import QuantizationConfigMixin

from bpdq.checkpoint import QUANT_METHOD, _check_tensors, check_quantization_config, replace_linears
from bpdq.experts import QuantExperts
from bpdq.linear import QuantLinear

class BpdqConfig(QuantizationConfigMixin):
    """A bpdq checkpoint's ``quantization_config`` as transformers sees it. It holds the JSON object
    unchanged (so ``save_pretrained`` writes it back as read) and is validated on construction: a wrong
    ``quant_method``, an unknown ``format_version`` or a malformed ``modules`` table raise ``ValueError``."""

    def __init__(self, quant_method: str = QUANT_METHOD, **fields: Any) -> None:
        check_quantization_config({"quant_method": quant_method, **fields})
        self.quant_method = quant_method
        self.__dict__.update(fields)


class BpdqHfQuantizer(HfQuantizer):
    """Loads pre-quantized bpdq checkpoints (quantizing a dense model is :func:`bpdq.quantize`'s job)."""

    requires_calibration = True
    quantization_config: BpdqConfig

    def __init__(self, quantization_config: BpdqConfig, **kwargs: Any) -> None:
        if not kwargs.get("pre_quantized", True):
            raise ValueError(
                "from_pretrained can only load bpdq checkpoints; quantize a dense model with bpdq.quantize "
                "(or the `bpdq quantize` command) and save it with bpdq.save"
            )
        super().__init__(quantization_config, **kwargs)

    def validate_environment(self, *args: Any, weights_only: bool = True, **kwargs: Any) -> None:
        if weights_only is False:
            raise ValueError("bpdq checkpoints are loaded with weights_only=True only (they are safetensors files)")

    def _process_model_before_weight_loading(self, model: Any, checkpoint_files: list[str] | None = None, **kwargs: Any) -> None:
        replace_linears(model, self.quantization_config.modules)
        check_checkpoint_files(model, checkpoint_files or [])

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def check_checkpoint_files(model: torch.nn.Module, files: list[str]) -> None:
    """Compare the tensors listed in the safetensors ``files`` headers (no data is read) with what ``model``
    expects: a missing, extra, mis-shaped or wrongly typed tensor raises ``ValueError`` naming it. Floating
    tensors outside the packed buffers may differ in dtype: ``from_pretrained(dtype=...)`` casts them."""
    found = _header_tensors(files)
    expected = _expected_tensors(model, found)
    packed = {f"{name}.{buf}" for name, m in model.named_modules() if isinstance(m, QuantLinear) for buf in ("planes", "coeffs")}
    packed |= {f"{name}.{buf}" for name, m in model.named_modules() if isinstance(m, QuantExperts)
               for buf, t in m.named_buffers() if t.dtype in (torch.uint8, torch.float16)}
    for name, ref in expected.items():
        t = found.get(name)
        if t is not None and name not in packed and t.is_floating_point() and ref.is_floating_point():
            found[name] = torch.empty(t.shape, dtype=ref.dtype, device="meta")
    _check_tensors(expected, found)


def _header_tensors(files: list[str]) -> dict[str, torch.Tensor]:
    """Meta tensors with the names, shapes and dtypes listed in the safetensors ``files`` headers."""
    from bpdq.safetensors_header import read_header

    if not files:
        raise ValueError("a bpdq checkpoint needs its weights in model.safetensors; no weights file was found")
    found: dict[str, torch.Tensor] = {}
    for file in files:
        if Path(file).suffix != ".safetensors":
            raise ValueError(f"bpdq checkpoints are read from safetensors files only, got {Path(file).name!r}")
        found.update(read_header(file))
    return found


def _expected_tensors(model: torch.nn.Module, found: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``model``'s state dict with one name per tied group: the name the checkpoint has (tying cannot happen
    yet under transformers' meta-device init, so tied parameters are still separate objects)."""
    expected = model.state_dict()
    for target, source in getattr(model, "all_tied_weights_keys", {}).items():
        expected.pop(source if target in found and source not in found else target, None)
    return expected


def register() -> None:
    """Register :class:`BpdqConfig` and :class:`BpdqHfQuantizer` under ``"bpdq"`` with transformers.

    Idempotent: calling it again (or after reloading this module) keeps or refreshes bpdq's own entries.
    If another package registered ``"bpdq"`` first, raises ``ValueError`` naming it and changes nothing.
    """
    tables = (
        (_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, BpdqConfig, register_quantization_config, "quantization config"),
        (_auto.AUTO_QUANTIZER_MAPPING, BpdqHfQuantizer, register_quantizer, "quantizer"),
    )
    for table, ours, _, kind in tables:
        owner = table.get(QUANT_METHOD)
        if owner is not None and _qualified_name(owner) != _qualified_name(ours):
            raise ValueError(
                f"transformers already has a {kind} registered for quant_method {QUANT_METHOD!r}: "
                f"{_qualified_name(owner)}, not bpdq's {_qualified_name(ours)}. bpdq does not override it: remove "
                "that registration, or import bpdq before the package that makes it"
            )
    for table, ours, register_fn, _ in tables:
        if table.get(QUANT_METHOD) is not ours:
            table.pop(QUANT_METHOD, None)
            register_fn(QUANT_METHOD)(ours)


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
