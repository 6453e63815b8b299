"""Triton lookup-table GEMV (``triton_lut``): ``y = x W_hat^T + bias`` for decode (``M <= 8`` tokens).

With ``W = c_0 + sum_i c_i B_i`` (per row and group), a byte of plane ``i`` covers 8 inputs, and
``B_i x`` over those 8 inputs is one of 256 subset sums of ``x``. Two launches:

1. ``build_tables``: for every token and every chunk of 8 inputs, the 256 subset sums ``T[m, chunk, byte]``
   (fp32); ``T[m, chunk, 255]`` is the chunk's sum, so group sums of ``x`` come from the same table.
2. ``lut_gemv``: a program owns ``BN`` rows (up to 1024) and a range of groups (split-K when there are few
   row blocks). Per block of ``CB`` chunks it loads the tables ``[BM, CB, 256]`` once and, per plane, looks
   the rows' plane bytes up in them with ``tl.gather`` (on a GPU a shared-memory gather), sums over the
   chunks and combines: ``y[m, r] += sum_i c_i[r] * sum_chunks T + c_0[r] * sum(x_group)``.

Every weight costs a table lookup instead of a multiply and memory traffic stays at ``k`` bits per weight
(plus the tables, re-read once per row block from L2). All arithmetic is fp32; the result is cast to the
activations' dtype. The planes are read column-major (``[k, in/8, out]`` storage, so a block of rows'
bytes for one chunk is contiguous): the first call relays the layer's ``planes`` buffer out in place
(:mod:`bpdq.kernels.layout`; same shape and values, no second copy). Limits: as ``triton_gemm`` (1-4
planes, g in 32..256), plus ``M <= 8``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from bpdq.kernels import _triton
from bpdq.kernels.base import Kernel, PackedLinear
from bpdq.kernels.layout import column_major_planes, is_column_major
from bpdq.registry import KERNELS

#: Largest number of tokens the LUT kernel takes; ``auto`` switches to ``triton_gemm`` above it.
MAX_TOKENS = 8
#: Chunks per table-building program.
_TABLE_CHUNKS = 16
#: Most rows per program (the tables of a group are loaded once per program), and most ``BM * BN``.
_MAX_ROWS = 1024
_MAX_TOKEN_ROWS = 2048
#: Upper bounds on the gathered ``[BM, CB, BN]`` block and on the table block ``[BM, CB, 256]`` (registers,
#: shared memory and compile time grow with them).
_GATHER_ELEMS = 4096
_TABLE_ROWS = 32


@KERNELS.register("triton_lut")
class TritonLutKernel(Kernel):
    #: Highest: on CUDA, ``auto`` picks it whenever ``M <= 8``.
    priority = 20

    def supports(self, layer: PackedLinear, x: torch.Tensor) -> str | None:
        if x.shape[0] > MAX_TOKENS:
            return f"the LUT kernel takes at most {MAX_TOKENS} tokens, got M={x.shape[0]}"
        return _triton.call_reason(layer, x)

    def serves(self, planes: int, group_size: int) -> str | None:
        return (
            f"it takes at most {MAX_TOKENS} tokens per call (decode only), so it cannot run prefill or "
            "calibration; use 'auto', which picks it for decode on CUDA"
        )

    def runs_on(self, device: torch.device) -> str | None:
        return _triton.device_reason(device)

    def auto_excluded(self, layer: PackedLinear, x: torch.Tensor) -> str | None:
        return _triton.auto_reason(x)

    def forward(self, layer: PackedLinear, x: torch.Tensor) -> torch.Tensor:
        return lut_gemv(x, column_major_planes(layer), layer.coeffs, layer.bias, layer.group_size)


def split_count(row_blocks: int, groups: int, device: torch.device) -> int:
    """How many ranges of groups to split the reduction into so that the GPU has enough programs."""
    if device.type == "cuda":
        target = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:  # the interpreter: still exercise the split path on layers with a single row block
        target = 2
    return max(1, min(groups, _triton.cdiv(target, row_blocks)))


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def lut_gemv(
    x: torch.Tensor, planes: torch.Tensor, coeffs: torch.Tensor, bias: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """Launch both kernels for ``x: [M, in]`` with column-major planes (see :mod:`bpdq.kernels.layout`)."""
    k, n, kb = planes.shape
    m, kdim = x.shape
    if m > MAX_TOKENS:
        raise ValueError(f"lut_gemv takes at most {MAX_TOKENS} tokens, got {m}")
    if kdim != kb * 8 or kdim % group_size:
        raise ValueError(f"x has {kdim} features but the planes hold {kb * 8} (group size {group_size})")
    if not is_column_major(planes):
        raise ValueError("lut_gemv needs column-major planes (bpdq.kernels.layout.column_major_planes)")
    cpg = group_size // 8
    groups = kdim // group_size
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    kernels = _kernels()
    x = x.contiguous()
    chunks = kdim // 8
    tables = torch.empty(m, chunks, 256, dtype=torch.float32, device=x.device)
    kernels["tables"][(m, _triton.cdiv(chunks, _TABLE_CHUNKS))](x, tables, chunks, BC=_TABLE_CHUNKS)

    bm = _triton.next_pow2(m)
    bn = max(16, min(_MAX_ROWS, _MAX_TOKEN_ROWS // bm, _triton.next_pow2(n)))
    cb = max(1, min(cpg, _GATHER_ELEMS // (bm * bn), _TABLE_ROWS // bm))
    row_blocks = _triton.cdiv(n, bn)
    splits = split_count(row_blocks, groups, x.device)
    per_split = _triton.cdiv(groups, splits)
    splits = _triton.cdiv(groups, per_split)
    out = y if splits == 1 else torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
    kernels["gemv"][(row_blocks, splits)](
        tables,
        planes,
        coeffs.contiguous(),
        bias if bias is not None else out,
        out,
        m,
        n,
        groups,
        per_split,
        KP=k,
        CPG=cpg,
        CB=cb,
        BM=bm,
        BN=bn,
        HAS_BIAS=bias is not None,
        num_warps=8 if bm * cb * bn >= 4096 else 4,
    )
    return y if splits == 1 else y.copy_(out.sum(0))


@_triton.lazy_jit
def _kernels() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def build_tables(x_ptr, t_ptr, C, BC: tl.constexpr):
        m = tl.program_id(0)
        offs_c = tl.program_id(1) * BC + tl.arange(0, BC)
        c_mask = offs_c < C
        subset = tl.arange(0, 256)
        x_row = x_ptr + m.to(tl.int64) * C * 8 + offs_c * 8
        t = tl.zeros([BC, 256], dtype=tl.float32)
        for j in tl.static_range(8):
            xj = tl.load(x_row + j, mask=c_mask, other=0.0).to(tl.float32)
            t += tl.where(((subset >> j) & 1)[None, :] != 0, xj[:, None], 0.0)
        t_ptrs = t_ptr + (m.to(tl.int64) * C + offs_c)[:, None] * 256 + subset[None, :]
        tl.store(t_ptrs, t, mask=c_mask[:, None])

    @triton.jit
    def lut_gemv(
        t_ptr, planes_ptr, coeffs_ptr, bias_ptr, y_ptr, M, N, G, GPS,
        KP: tl.constexpr, CPG: tl.constexpr, CB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
        HAS_BIAS: tl.constexpr,
    ):  # fmt: skip
        offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
        split = tl.program_id(1)
        offs_m = tl.arange(0, BM)
        offs_c = tl.arange(0, CB)
        subset = tl.arange(0, 256)
        n_mask = offs_n < N
        m_mask = offs_m < M
        t_rows = t_ptr + offs_m.to(tl.int64) * (G * CPG * 256)  # [BM]
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        g_end = tl.minimum(G, (split + 1) * GPS)
        for g in range(split * GPS, g_end):
            c_grp = coeffs_ptr + g * (KP + 1) * N + offs_n
            c0 = tl.load(c_grp + KP * N, mask=n_mask, other=0.0).to(tl.float32)
            for cb in range(0, CPG, CB):
                chunk_base = t_rows[:, None] + ((g * CPG + cb + offs_c) * 256)[None, :]  # [BM, CB]
                x_sum = tl.sum(tl.load(chunk_base + 255, mask=m_mask[:, None], other=0.0), axis=1)  # [BM]
                acc += x_sum[:, None] * c0[None, :]
                table = tl.load(chunk_base[:, :, None] + subset[None, None, :], mask=m_mask[:, None, None], other=0.0)
                for i in tl.static_range(KP):
                    rows = (i * G * CPG + g * CPG + cb + offs_c) * N  # [CB]: column-major plane bytes
                    byte = tl.load(planes_ptr + rows[:, None] + offs_n[None, :], mask=n_mask[None, :], other=0)
                    index = tl.broadcast_to(byte.to(tl.int32)[None, :, :], [BM, CB, BN])
                    vals = tl.gather(table, index, axis=2)  # [BM, CB, BN]: T[m, chunk, byte]
                    ci = tl.load(c_grp + i * N, mask=n_mask, other=0.0).to(tl.float32)
                    acc += tl.sum(vals, axis=1) * ci[None, :]
        if HAS_BIAS:  # added once, by the first range of groups
            bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            acc += tl.where(split == 0, bias, 0.0)[None, :]
        y_ptrs = y_ptr + (split * M + offs_m)[:, None] * N + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])

    return {"tables": build_tables, "gemv": lut_gemv}
