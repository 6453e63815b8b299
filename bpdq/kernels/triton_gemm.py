"""Triton dequant-GEMM (``triton_gemm``): ``y = x W_hat^T + bias`` for many tokens (prefill).

Each program computes a ``[BM, BN]`` tile of ``y``. Walking ``K`` in steps of ``BK`` (``BK`` divides the
group size, so a step lies in one group), it decodes the ``[BK, BN]`` tile of ``W_hat^T`` in registers from
the canonical planes (``W = c_0 + sum_i c_i * bit_i``, in fp32, cast to the activations' dtype like the
torch kernel) and multiplies it with ``tl.dot`` into an fp32 accumulator.

Limits: 1-4 planes, group sizes 32/64/128/256, fp16/bf16/fp32 activations (fp32 uses exact "ieee" dots),
any ``M`` and ``N`` (masked). Reads the checkpoint's canonical layout directly (no repacking).
"""

from __future__ import annotations

from typing import Any

import torch

from bpdq.kernels import _triton
from bpdq.kernels.base import Kernel, PackedLinear
from bpdq.registry import KERNELS


@KERNELS.register("triton_gemm")
class TritonGemmKernel(Kernel):
    #: Below the LUT kernel (decode) and above the torch kernel: on CUDA, ``auto`` uses it for M > 8.
    priority = 10

    def supports(self, layer: PackedLinear, x: torch.Tensor) -> str | None:
        return _triton.call_reason(layer, x)

    def serves(self, planes: int, group_size: int) -> str | None:
        return _triton.recipe_reason(planes, group_size)

    def runs_on(self, device: torch.device) -> str | None:
        return _triton.device_reason(device)

    def auto_excluded(self, layer: PackedLinear, x: torch.Tensor) -> str | None:
        return _triton.auto_reason(x)

    def forward(self, layer: PackedLinear, x: torch.Tensor) -> torch.Tensor:
        return gemm(x, layer.planes, layer.coeffs, layer.bias, layer.group_size)


def tile_config(m: int, group_size: int) -> dict[str, int]:
    """Block sizes and warps for ``M`` tokens (``tl.dot`` needs every block dimension >= 16)."""
    bm = min(128, max(16, _triton.next_pow2(m)))
    bn = 128 if bm >= 64 else 64
    bk = min(64, group_size)
    return {"BM": bm, "BN": bn, "BK": bk, "num_warps": 8 if bm * bn >= 128 * 128 else 4}


def gemm(
    x: torch.Tensor, planes: torch.Tensor, coeffs: torch.Tensor, bias: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """Launch the kernel for ``x: [M, in]`` (``supports`` has vetted devices, dtypes, planes, group size)."""
    k, n, kb = planes.shape
    m, kdim = x.shape
    if kdim != 8 * kb or kdim % group_size:
        raise ValueError(f"x has {kdim} features but the planes hold {8 * kb} (group size {group_size})")
    x = x.contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    cfg = tile_config(m, group_size)
    grid = (_triton.cdiv(m, cfg["BM"]), _triton.cdiv(n, cfg["BN"]))
    _kernels()[grid](
        x,
        planes,  # any strides (row-major as stored, or column-major after a LUT kernel relaid it out)
        coeffs.contiguous(),
        bias if bias is not None else y,
        y,
        m,
        n,
        kdim,
        planes.stride(0),
        planes.stride(1),
        planes.stride(2),
        KP=k,
        GS=group_size,
        BM=cfg["BM"],
        BN=cfg["BN"],
        BK=cfg["BK"],
        HAS_BIAS=bias is not None,
        IEEE=x.dtype == torch.float32,
        num_warps=cfg["num_warps"],
        num_stages=3,
    )
    return y


@_triton.lazy_jit
def _kernels() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def dequant_gemm(
        x_ptr, planes_ptr, coeffs_ptr, bias_ptr, y_ptr, M, N, K, stride_p, stride_r, stride_b,
        KP: tl.constexpr, GS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
        HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
        offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
        offs_k = tl.arange(0, BK)
        offs_b = tl.arange(0, BK // 8)
        offs_bit = tl.arange(0, 8)
        m_mask = offs_m < M
        n_mask = offs_n < N
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * K
        plane_rows = planes_ptr + offs_n.to(tl.int64)[None, :] * stride_r  # [1, BN]
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + offs_k
            xt = tl.load(x_rows + kk[None, :], mask=m_mask[:, None], other=0.0)  # [BM, BK]
            c_grp = coeffs_ptr + (k0 // GS) * (KP + 1) * N + offs_n
            c0 = tl.load(c_grp + KP * N, mask=n_mask, other=0.0).to(tl.float32)
            w = tl.zeros([BK, BN], dtype=tl.float32) + c0[None, :]
            byte_ptrs = plane_rows + ((k0 // 8 + offs_b) * stride_b)[:, None]  # [BK/8, BN]: each byte loaded once
            for i in tl.static_range(KP):
                byte = tl.load(byte_ptrs + i * stride_p, mask=n_mask[None, :], other=0).to(tl.int32)
                bits = (byte[:, None, :] >> offs_bit[None, :, None]) & 1  # [BK/8, 8, BN]: column 8*b + j
                ci = tl.load(c_grp + i * N, mask=n_mask, other=0.0).to(tl.float32)
                w += tl.reshape(bits, [BK, BN]).to(tl.float32) * ci[None, :]
            if IEEE:
                acc = tl.dot(xt, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(xt, w.to(xt.dtype), acc)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])

    return dequant_gemm
