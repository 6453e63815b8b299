"""QuantizedWeight: the one result type that travels from solver to kernel to checkpoint.

Canonical layout (docs/format.md):
- ``planes``: ``uint8[k, out, in // 8]``; bit ``j`` of byte ``b`` of plane ``i`` is bit ``i`` of the code
  of input column ``8*b + j``;
- ``coeffs``: ``float16[groups, k+1, out]``; ``coeffs[g, i, r]`` for ``i < k`` multiplies plane ``i`` in
  group ``g`` of row ``r``, ``coeffs[g, k, r]`` is the offset ``c_0``.

    W_hat[r, col] = coeffs[g, k, r] + sum_i coeffs[g, i, r] * bit_i(code[r, col]),   g = col // group_size
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch

from bpdq.bits import bits_to_codes, codes_to_bits, pack_bits, unpack_bits

#: Coefficients are stored in this dtype, ``COEFF_BITS`` bits each (as in the bits-per-weight accounting).
COEFF_DTYPE = torch.float16
COEFF_BITS = 16

#: A weight's dtype by name, as the metadata stores it (:func:`dtype_from_name`).
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
#: The dtype names a user may pick for a model's weights (the CLI's ``--dtype``): ``auto`` (as stored or
#: loaded) and every name of ``_DTYPES`` but ``float64``. The CLI writes them out (its parser must not import
#: torch); tests/test_quantized.py checks that the copies agree.
DTYPE_NAMES = ("auto", *(name for name in _DTYPES if name != "float64"))


def bits_per_weight(k: int, group_size: int) -> float:
    """``k + 16 (k+1) / g``: plane bits plus 16-bit coefficients amortised over a group."""
    return k + COEFF_BITS * (k + 1) / group_size


def check_group_size(group_size: object, in_features: int | None = None) -> int:
    """The one group-size rule of the format: a positive multiple of 8 (packed planes hold 8 columns per
    byte) that divides ``in_features`` when given. Returns ``group_size``; raises ``TypeError``/``ValueError``."""
    if not isinstance(group_size, int) or isinstance(group_size, bool):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    if group_size <= 0 or group_size % 8:
        raise ValueError(f"group_size must be a positive multiple of 8 (e.g. 32, 64, 128), got {group_size}")
    if in_features is not None and in_features % group_size:
        divisors = [g for g in range(8, in_features + 1, 8) if in_features % g == 0]
        raise ValueError(
            f"in_features {in_features} is not divisible by group_size {group_size}; allowed group sizes for "
            f"this layer: {divisors}"
        )
    return group_size


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; allowed: {sorted(_DTYPES)}") from None


@dataclass
class SolveStats:
    """What a solver reports about one layer."""

    proxy_loss: float | None = None  # tr((W-Q) H (W-Q)^T), None without a Hessian
    relative_loss: float | None = None  # proxy_loss / tr(W H W^T)
    time_s: float = 0.0
    best_iters: list[int] | None = None  # BPDQ: best iteration per group (original group order)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "proxy_loss": self.proxy_loss,
            "relative_loss": self.relative_loss,
            "time_s": self.time_s,
            "best_iters": self.best_iters,
            **({"extra": self.extra} if self.extra else {}),
        }


@dataclass
class QuantizedWeight:
    """Packed bit-planes + coefficients of one linear layer's weight."""

    planes: torch.Tensor
    coeffs: torch.Tensor
    group_size: int
    shape: tuple[int, int]
    dtype: torch.dtype = torch.float32
    grid: dict[str, Any] = field(default_factory=dict)
    solver: dict[str, Any] = field(default_factory=dict)
    stats: SolveStats = field(default_factory=SolveStats)

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        out, inp = self.shape
        if self.planes.dtype != torch.uint8 or self.planes.dim() != 3:
            raise ValueError(f"planes must be uint8[k, out, in/8], got {self.planes.dtype}{list(self.planes.shape)}")
        k = self.planes.shape[0]
        if not 1 <= k <= 8:
            raise ValueError(f"number of planes must be in 1..8, got {k}")
        check_group_size(self.group_size, inp)
        if tuple(self.planes.shape) != (k, out, inp // 8):
            raise ValueError(f"planes shape {tuple(self.planes.shape)} != expected {(k, out, inp // 8)}")
        expected = (inp // self.group_size, k + 1, out)
        if tuple(self.coeffs.shape) != expected:
            raise ValueError(f"coeffs shape {tuple(self.coeffs.shape)} != expected {expected}")
        if self.coeffs.dtype != COEFF_DTYPE:
            raise ValueError(f"coeffs must be {COEFF_DTYPE}, got {self.coeffs.dtype}")

    # ---- construction ---------------------------------------------------------------------------------

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        coeffs: torch.Tensor,
        *,
        planes: int,
        group_size: int,
        dtype: torch.dtype = torch.float32,
        grid: dict[str, Any] | None = None,
        solver: dict[str, Any] | None = None,
        stats: SolveStats | None = None,
    ) -> "QuantizedWeight":
        """Build from integer ``codes [out, in]`` and coefficients ``[out, groups, k+1]`` (solver layout).

        Coefficients are rounded to fp16, their storage precision.
        """
        out, inp = codes.shape
        if codes.min().item() < 0 or codes.max().item() >= 2**planes:
            raise ValueError(f"codes must lie in [0, {2**planes}) for {planes} planes")
        packed = pack_bits(codes_to_bits(codes, planes))
        stored = coeffs.permute(1, 2, 0).contiguous().to(COEFF_DTYPE)
        return cls(
            planes=packed,
            coeffs=stored,
            group_size=group_size,
            shape=(out, inp),
            dtype=dtype,
            grid=dict(grid or {}),
            solver=dict(solver or {}),
            stats=stats or SolveStats(),
        )

    # ---- views ----------------------------------------------------------------------------------------

    @property
    def k(self) -> int:
        return self.planes.shape[0]

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def n_groups(self) -> int:
        return self.shape[1] // self.group_size

    @property
    def bits_per_weight(self) -> float:
        return bits_per_weight(self.k, self.group_size)

    @property
    def nbytes(self) -> int:
        return self.planes.numel() * self.planes.element_size() + self.coeffs.numel() * self.coeffs.element_size()

    def bits(self) -> torch.Tensor:
        """Unpacked planes ``uint8[k, out, in]``."""
        return unpack_bits(self.planes)

    def codes(self) -> torch.Tensor:
        """Integer codes ``int64[out, in]``."""
        return bits_to_codes(self.bits())

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight ``[out, in]`` (computed in fp32, then cast to ``dtype`` or the original dtype)."""
        return dequantize_packed(self.planes, self.coeffs, self.group_size).to(dtype or self.dtype)

    # ---- serialisation --------------------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        return {
            "planes": self.k,
            "group_size": self.group_size,
            "shape": list(self.shape),
            "dtype": dtype_name(self.dtype),
            "grid": self.grid,
            "solver": self.solver,
        }

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], str]:
        """``({"planes": ..., "coeffs": ...}, metadata_json)``: lossless, see :meth:`from_tensors`."""
        return {"planes": self.planes, "coeffs": self.coeffs}, json.dumps(self.metadata(), sort_keys=True)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], metadata: str | dict[str, Any]) -> "QuantizedWeight":
        meta = json.loads(metadata) if isinstance(metadata, str) else metadata
        missing = {"planes", "coeffs"} - set(tensors)
        if missing:
            raise ValueError(f"quantized weight is missing tensors {sorted(missing)}")
        qw = cls(
            planes=tensors["planes"],
            coeffs=tensors["coeffs"],
            group_size=int(meta["group_size"]),
            shape=tuple(meta["shape"]),
            dtype=dtype_from_name(meta["dtype"]),
            grid=meta.get("grid", {}),
            solver=meta.get("solver", {}),
        )
        if qw.k != int(meta["planes"]):
            raise ValueError(f"planes tensor has {qw.k} planes but metadata says {meta['planes']}")
        return qw

    def __repr__(self) -> str:
        return (
            f"QuantizedWeight(shape={self.shape}, k={self.k}, group_size={self.group_size}, "
            f"bpw={self.bits_per_weight:.3f}, grid={self.grid.get('type')}, solver={self.solver.get('type')})"
        )


def dequantize_packed(planes: torch.Tensor, coeffs: torch.Tensor, group_size: int) -> torch.Tensor:
    """Reference dequantization of the canonical layout to fp32 ``[out, in]``.

    With fp16 coefficients every partial sum of a uniform grid is ``s * integer`` (exact in fp32), so a
    uniform result dequantizes bit-for-bit like ``s * (q - z)``.
    """
    k, out, _ = planes.shape
    n_groups = coeffs.shape[0]
    bits = unpack_bits(planes).to(torch.float32).view(k, out, n_groups, group_size)
    c = coeffs.to(torch.float32).permute(1, 2, 0).unsqueeze(-1)  # [k+1, out, groups, 1]
    return dequantize_bits(bits, c).view(out, n_groups * group_size)


def dequantize_bits(bits: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """``coeffs[k] + sum_i coeffs[i] * bits[i]``: the format's dequantization, the one Python implementation.

    ``bits`` is ``[k', *shape]`` (``k' >= k``; planes ``0..k-1`` are read) of 0/1 values, ``coeffs`` is
    ``[k+1, ...]`` (plane coefficients first, the offset last), each ``coeffs[i]`` broadcasting to ``shape``.
    The result ``[*shape]`` is in ``coeffs``' dtype on ``bits``' device: the offset, then each plane's term
    added in plane order (``addcmul``), so every caller gets the same bits for the same coefficients.
    """
    k = coeffs.shape[0] - 1
    shape = bits.shape[1:]
    w = torch.empty(shape, dtype=coeffs.dtype, device=bits.device)
    w.copy_(coeffs[k].expand(shape))
    for i in range(k):
        w.addcmul_(bits[i], coeffs[i])
    return w
