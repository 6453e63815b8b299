"""Lossless bit manipulation shared by grids, QuantizedWeight and kernels.

Conventions (see docs/format.md):
- a *code* is an integer in [0, 2^k); plane ``i`` (0 = least significant) is bit ``i`` of the code;
- packed planes are ``uint8[k, out, in // 8]``; bit ``j`` of byte ``b`` is input column ``8*b + j``.
"""

from __future__ import annotations

import torch

_SHIFTS = torch.arange(8, dtype=torch.uint8)


def plane_matrix(k: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """``[2^k, k+1]`` matrix whose row ``q`` is ``[bit_0(q), ..., bit_{k-1}(q), 1]``.

    ``plane_matrix(k) @ coeffs`` (coeffs ``[k+1]``) lists the 2^k levels of a grid in code order.
    """
    codes = torch.arange(2**k, device=device)
    bits = (codes.unsqueeze(-1) >> torch.arange(k, device=device)) & 1
    return torch.cat([bits, torch.ones(2**k, 1, dtype=bits.dtype, device=device)], dim=1).to(dtype)


def codes_to_bits(codes: torch.Tensor, k: int) -> torch.Tensor:
    """Integer codes ``[...]`` -> bits ``uint8[k, ...]`` (plane 0 = least significant)."""
    if not 1 <= k <= 8:
        raise ValueError(f"codes_to_bits: k must be in 1..8, got {k}")
    c = codes.to(torch.uint8)  # codes < 2^k <= 256; one byte per weight keeps the temporaries small
    out = torch.empty((k, *codes.shape), dtype=torch.uint8, device=codes.device)
    for i in range(k):
        torch.bitwise_and(c >> i, 1, out=out[i])
    return out


def bits_to_codes(bits: torch.Tensor) -> torch.Tensor:
    """Bits ``[k, ...]`` -> integer codes ``int64[...]``."""
    k = bits.shape[0]
    weights = (1 << torch.arange(k, device=bits.device)).view(-1, *([1] * (bits.dim() - 1)))
    return (bits.to(torch.int64) * weights).sum(0)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """``{0,1}[..., n]`` with ``n % 8 == 0`` -> ``uint8[..., n // 8]``."""
    if bits.shape[-1] % 8:
        raise ValueError(f"pack_bits: the last dimension must be a multiple of 8, got {bits.shape[-1]}")
    b = bits.to(torch.uint8).reshape(*bits.shape[:-1], bits.shape[-1] // 8, 8)
    return (b << _SHIFTS.to(bits.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    """``uint8[..., m]`` -> ``uint8[..., 8*m]`` of 0/1 (inverse of :func:`pack_bits`)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_bits: expected uint8, got {packed.dtype}")
    b = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 1
    return b.reshape(*packed.shape[:-1], packed.shape[-1] * 8)
