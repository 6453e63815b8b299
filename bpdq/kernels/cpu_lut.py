"""Native CPU kernel (``cpu_lut``): ``y = x W_hat^T + bias`` from the bit-planes, in C, without a dense weight.

- **Decode** (``M <= 8`` tokens): lookup tables. Per token and per chunk of 4 inputs a 16-entry table of
  subset sums; each plane byte holds two 4-bit indices into the tables of its two chunks. Per row, group
  and plane the looked-up sums are scaled by ``c_i``, plus ``c_0`` times the group's input sum (exact fp32).
  The portable C path looks exact fp32 tables up, one row at a time. **AVX2 and AVX-512 use integer tables**
  (T-MAC's approach): per token and group the tables are centred (``t' = t - t[15]/2``, the sum of
  ``+-x/2``) and rounded to int16 with one scale ``s_G = max |t'| / 32767`` shared by the group's tables,
  stored as two byte tables (low and high byte), so one ``vpshufb`` per byte looks up 32 (AVX2) or 64
  (AVX-512 BW) rows' nibbles at once and the looked-up bytes add up in int16 (``vpmaddubsw``; groups over
  512 inputs are split into spans that cannot overflow); per group and plane the integer sum ``P`` becomes
  ``c_i * (s_G * P + X_G / 2)`` with ``X_G`` the group's exact input sum. AVX2 and AVX-512 give
  bit-identical results. The tables' rounding bounds the error (:func:`lut_error_bound`): per output about
  ``sum_G (g/4) * (s_G/2) * sum_i |c_i|``. One byte per entry (int8, half the lookups) moved SmolLM2 k=2's
  perplexity by +0.25% on 4 x 512 tokens, close to the 0.3% that the integer tables may cost at most; two
  bytes leave it unchanged (``benchmarks/bench_lut_precision.py``). Rows past the last multiple of 32 run the
  exact scalar code on every path.
  Why 4 inputs and not 8: a 16-entry table sits in one register, so one shuffle looks many rows up at once;
  a 256-entry table (what ``triton_lut`` uses) needs one scalar or gather load per row and byte.
- **Larger M**: tiles of about 2^18 weights (a few hundred KiB, cache-sized) are dequantized by the C
  library into one reused buffer in the activations' dtype and multiplied with ``torch.mm``; no
  whole-weight temporary.

The C library (``bpdq/kernels/native/cpu_lut.c``) is built by ``setup.py`` when the package is installed
(optional: without a compiler the install still succeeds) and loaded through ``ctypes`` with tensor data
pointers, so it does not depend on torch's C++ ABI. It picks the AVX-512 / AVX2 / portable path at run
time from the CPU's features. Without the library, ``auto`` falls back to the ``torch`` kernel with one
warning saying why.

Planes are read column-major (see :mod:`bpdq.kernels.layout`): the first call relays the layer's ``planes``
buffer out in place (same shape and values, other strides), once, without keeping a second copy.

Environment variables (so that CI runs every path):

- ``BPDQ_CPU_ISA``: ``auto`` (default; the best the CPU has), ``avx512``, ``avx2`` or ``portable``; a
  path the CPU lacks makes the kernel unavailable (with the reason);
- ``BPDQ_CPU_LUT_DISABLE=1``: act as if the library were absent;
- ``BPDQ_CPU_SPIN_US`` (default 100, at most 100000): how long the library's worker threads spin after a
  job before they sleep. Workers are started on the first call that uses more than one thread and kept
  (creating threads per call made two threads no faster than one at 4096x4096); ``0`` sleeps at once, which
  saves CPU time between calls at the cost of a wake-up per call; another value makes the kernel
  unavailable (with the reason), like an unknown ``BPDQ_CPU_ISA``.

Memory: each thread that calls the lookup-table path keeps a scratch for its tables (about 24 bytes per token
and input, at the largest ``M`` it used), freed when the thread exits or by :func:`release_scratch`.

The first two are read when the library is first needed (:func:`native`; ``native.cache_clear()`` re-reads
them); ``BPDQ_CPU_SPIN_US`` once per process, by the C library.

Limits: CPU tensors, float32 or bfloat16 activations (output in the same dtype), 1-8 planes, every group
size of the format (a multiple of 8). Threads follow ``torch.get_num_threads()``. The C calls run as the
custom op ``torch.ops.bpdq.cpu_lut_linear`` when autograd or ``torch.compile`` needs one (gradients flow
to the input only, through the reference dequantization); plain inference calls the library directly.
Before ``torch.compile``, run the model once eagerly per input size: that call chooses the kernel and
relays the planes out (module mutations kept out of the traced graph); the compiled graph then holds one
custom-op call per layer, without graph breaks (``tests/kernels/test_cpu_lut.py`` compiles with
``fullgraph=True``).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from bpdq.kernels.base import Kernel, PackedLinear
from bpdq.kernels.layout import column_major_planes, is_column_major
from bpdq.quantized import dequantize_packed
from bpdq.registry import KERNELS

#: Largest number of tokens the lookup-table path takes; above it the tiled dequantize + matmul path runs.
MAX_TOKENS = 8
#: Weights per dequantized tile of the large-M path (fp32: 1 MiB).
TILE_WEIGHTS = 1 << 18
DTYPES = (torch.float32, torch.bfloat16)
#: The C library's ABI version this module calls (``bpdq_abi_version()``).
ABI_VERSION = 2
ISAS = ("portable", "avx2", "avx512")
#: Paths that look up integer tables (error bounded by :func:`lut_error_bound`); the others use exact fp32 tables.
INT_TABLE_ISAS = ("avx2", "avx512")
ISA_ENV = "BPDQ_CPU_ISA"
SPIN_ENV = "BPDQ_CPU_SPIN_US"
MAX_SPIN_US = 100_000
DISABLE_ENV = "BPDQ_CPU_LUT_DISABLE"

_DT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_LIB_STEM = "_cpu_lut_native"
_warned = False

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int


@dataclass(frozen=True)
class Native:
    """The loaded library and the path to run, or why the kernel cannot run here (see :func:`native`)."""

    lib: ctypes.CDLL | None
    reason: str | None  # None: the kernel can run
    isa: int  # index into ISAS of the path to run
    best: str | None  # the best path this CPU has (None without the library)


@functools.cache
def native() -> Native:
    """Load the library and resolve the path from ``BPDQ_CPU_ISA``. Cached: the environment variables are
    read on the first call; ``native.cache_clear()`` makes the next call look again."""
    lib, reason = _load()
    if lib is None:
        return Native(None, reason, 0, None)
    best = ISAS[lib.bpdq_best_isa()]
    spin = os.environ.get(SPIN_ENV, "").strip()
    if spin and not (spin.isdigit() and int(spin) <= MAX_SPIN_US):  # the C library reads it with strtol
        return Native(lib, f"{SPIN_ENV}={spin!r} is not an integer from 0 to {MAX_SPIN_US} (microseconds)", 0, best)
    want = os.environ.get(ISA_ENV, "auto").strip().lower() or "auto"
    if want == "auto":
        return Native(lib, None, ISAS.index(best), best)
    if want not in ISAS:
        return Native(lib, f"{ISA_ENV}={want!r} is not one of {['auto', *ISAS]}", 0, best)
    if ISAS.index(want) > ISAS.index(best):
        return Native(lib, f"{ISA_ENV}={want} but this CPU's best path is {best}", 0, best)
    return Native(lib, None, ISAS.index(want), best)


def _load() -> tuple[ctypes.CDLL | None, str | None]:
    if os.environ.get(DISABLE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}:
        return None, f"{DISABLE_ENV} is set"
    here = Path(__file__).parent
    candidates = [here / f"{_LIB_STEM}{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        return None, (
            f"the native library {_LIB_STEM} was not built (no C compiler at install time?); reinstall bpdq "
            "with a compiler (pip install -e .) or build it in place: python setup.py build_ext --inplace"
        )
    try:
        lib = ctypes.CDLL(str(path))
        version = lib.bpdq_abi_version()
    except (OSError, AttributeError) as exc:
        return None, f"the native library {path.name} cannot be loaded: {exc}"
    if version != ABI_VERSION:
        return None, (
            f"the native library {path.name} has ABI version {version}, this bpdq needs {ABI_VERSION}; "
            "rebuild it (pip install -e . or python setup.py build_ext --inplace)"
        )
    lib.bpdq_lut_gemv.restype = _INT
    lib.bpdq_lut_gemv.argtypes = [_P, _INT, _I64, _I64, _I64, _P, _P, _I64, _I64, _I64, _P, _INT, _P, _INT, _I64, _INT, _INT]
    lib.bpdq_dequant.restype = _INT
    lib.bpdq_dequant.argtypes = [_P, _P, _I64, _I64, _I64, _I64, _I64, _I64, _P, _INT, _INT]
    lib.bpdq_best_isa.restype = _INT
    lib.bpdq_release_scratch.restype = None
    lib.bpdq_release_scratch.argtypes = []
    lib.bpdq_scratch_bytes.restype = _I64
    lib.bpdq_scratch_bytes.argtypes = []
    return lib, None


def release_scratch() -> None:
    """Free the calling thread's lookup-table scratch (the library keeps one per calling thread, grown to the
    largest call, for the next call; a thread's scratch is also freed when the thread exits). A no-op
    without the library."""
    lib = native().lib
    if lib is not None:
        lib.bpdq_release_scratch()


def scratch_bytes() -> int:
    """Bytes of lookup-table scratch the library holds, all threads together (0 without the library)."""
    lib = native().lib
    return int(lib.bpdq_scratch_bytes()) if lib is not None else 0


def lut_error_bound(x: torch.Tensor, coeffs: torch.Tensor, group_size: int) -> torch.Tensor:
    """Bound ``[M, N]`` (fp64) on ``|y - x W_hat^T|`` of the lookup-table path with integer tables
    (``INT_TABLE_ISAS``, ``M <= MAX_TOKENS``), before the output is rounded to its dtype.

    Per token and group ``G`` (``g = group_size`` inputs, ``g / 4`` chunks of 4) the scale is
    ``s_G = max over G's chunks of (sum of |x| over the chunk) / 2 / 32767``. Each looked-up entry is off by
    at most ``s_G / 2`` (rounding to nearest) plus the fp32 roundoff of the table entry, of centring it and
    of dividing by ``s_G`` (below ``10 * 2^-24 * 32767 s_G``, about ``0.02 s_G``; we allow ``s_G / 32``), and
    each plane's sum over ``G`` has ``g / 4`` entries, so::

        table term = sum_G (g / 4) * (1/2 + 1/32) * s_G * sum_{i=1..k} |c_i[G, r]|

    plus the fp32 arithmetic of the fold (``s_G P + X_G / 2``, times ``c_i``, summed over the ``G (k+1)``
    terms of a row), bounded by ``(G (k+1) + 4) * 2^-24 * sum_G (sum_{i=0..k} |c_i[G, r]|) * ||x_G||_1``.
    ``coeffs`` is the fp16 ``[groups, k+1, N]`` tensor (``c_1..c_k``, then ``c_0``).
    """
    if x.dim() != 2 or coeffs.dim() != 3:
        raise ValueError(f"x must be [M, in] and coeffs [groups, k+1, out], got {tuple(x.shape)} and {tuple(coeffs.shape)}")
    m, kdim = x.shape
    groups, kp1, _ = coeffs.shape
    if group_size <= 0 or group_size % 4 or groups * group_size != kdim or kp1 < 2:
        raise ValueError(
            f"group_size {group_size} with coeffs {tuple(coeffs.shape)} does not fit x's {kdim} inputs "
            "(need a positive multiple of 4 with groups * group_size == in and k >= 1)"
        )
    xa = x.detach().double().abs().reshape(m, groups, group_size)
    scale = xa.reshape(m, groups, group_size // 4, 4).sum(-1).amax(-1) / 2 / 32767  # [M, G]
    c = coeffs.double().abs()
    table = (scale * (group_size / 4) * (0.5 + 1 / 32)) @ c[:, : kp1 - 1].sum(1)
    roundoff = (groups * kp1 + 4) * 2.0**-24 * (xa.sum(-1) @ c.sum(1))
    return table + roundoff


@KERNELS.register("cpu_lut")
class CpuLutKernel(Kernel):
    #: Just above ``torch`` (0): ``auto`` takes it for every CPU call it supports (the Triton kernels, 10
    #: and 20, skip CPU tensors under ``auto``), unless a plugin kernel with a higher priority does too.
    priority = 1

    def supports(self, layer: PackedLinear, x: torch.Tensor) -> str | None:
        if x.device.type != "cpu" or layer.planes.device.type != "cpu":
            return f"the native kernel runs on CPU tensors; got input on {x.device}, planes on {layer.planes.device}"
        if x.dtype not in DTYPES:
            return f"input dtype {x.dtype} is not supported; allowed: {[str(d) for d in DTYPES]}"
        return native().reason

    def runs_on(self, device: torch.device) -> str | None:
        if device.type != "cpu":
            return f"the native kernel runs on CPU tensors, not on {device.type}"
        return native().reason

    def skipped(self, reason: str) -> None:
        if reason == native().reason:  # the library, not the call: every CPU layer falls back
            _warn_fallback(reason)

    def forward(self, layer: PackedLinear, x: torch.Tensor) -> torch.Tensor:
        plan = layer._kernel_cache.get(self.name)
        if plan is None or plan.planes is not layer.planes or plan.coeffs is not layer.coeffs or plan.bias is not layer.bias:
            column_major_planes(layer)
            plan = layer._kernel_cache[self.name] = _Plan(layer.planes, layer.coeffs, layer.bias, layer.group_size)
        if torch.compiler.is_compiling() or (x.requires_grad and torch.is_grad_enabled()):
            return torch.ops.bpdq.cpu_lut_linear(x, plan.planes, plan.coeffs, plan.bias, plan.group_size)
        return plan(x)


def _warn_fallback(reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"bpdq: the native CPU kernel 'cpu_lut' is unavailable ({reason}); CPU layers use the slower "
            "'torch' kernel",
            RuntimeWarning,
            stacklevel=3,
        )


class _Plan:
    """A layer's buffers, checked once, with the arguments of the C calls that do not change per call
    (cached on the layer; remade when a buffer is replaced)."""

    def __init__(self, planes: torch.Tensor, coeffs: torch.Tensor, bias: torch.Tensor | None, group_size: int) -> None:
        k, n, c = planes.shape
        if planes.dtype != torch.uint8 or not is_column_major(planes):
            raise ValueError("planes must be uint8 [k, out, in/8] stored column-major (bpdq.kernels.layout)")
        if group_size <= 0 or group_size % 8 or (8 * c) % group_size:
            raise ValueError(f"group_size {group_size} must be a positive multiple of 8 dividing {8 * c}")
        if coeffs.dtype != torch.float16 or tuple(coeffs.shape) != ((8 * c) // group_size, k + 1, n) or not coeffs.is_contiguous():
            raise ValueError(
                f"coeffs must be contiguous float16 {[(8 * c) // group_size, k + 1, n]}, got {coeffs.dtype}{list(coeffs.shape)}"
            )
        self.planes, self.coeffs, self.bias, self.group_size = planes, coeffs, bias, group_size
        self.k, self.n, self.kdim = k, n, 8 * c
        self._bias_args()

    def _bias_args(self) -> tuple[int | None, int]:
        """The bias's pointer and dtype code, taken per call: ``bias.data = other`` keeps the object but
        replaces (and may free) its storage."""
        bias, n = self.bias, self.n
        if bias is None:
            return None, 0
        if tuple(bias.shape) != (n,) or bias.dtype not in _DT or not bias.is_contiguous():
            raise ValueError(f"bias must be contiguous float32/bfloat16/float16 ({n},), got {bias.dtype}{list(bias.shape)}")
        return bias.data_ptr(), _DT[bias.dtype]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.kdim:
            raise ValueError(f"x must be [M, {self.kdim}], got {tuple(x.shape)}")
        if x.dtype not in DTYPES:
            raise TypeError(f"x dtype {x.dtype} is not supported; allowed: {[str(d) for d in DTYPES]}")
        nat = native()
        if nat.reason is not None:
            raise RuntimeError(f"the native CPU kernel is unavailable: {nat.reason}")
        m = x.shape[0]
        if x.stride(1) != 1:
            x = x.contiguous()
        if m > MAX_TOKENS:
            return self._tiled(nat, x)
        y = torch.empty((m, self.n), dtype=x.dtype)
        bias_ptr, bias_dt = self._bias_args()
        status = nat.lib.bpdq_lut_gemv(
            x.data_ptr(), _DT[x.dtype], x.stride(0), m, self.kdim,
            self.planes.data_ptr(), self.coeffs.data_ptr(), self.k, self.n, self.group_size,
            bias_ptr, bias_dt, y.data_ptr(), _DT[x.dtype], self.n, nat.isa, torch.get_num_threads(),
        )  # fmt: skip
        if status:
            raise MemoryError(f"bpdq_lut_gemv failed (status {status}) for M={m}, shape ({self.n}, {self.kdim})")
        return y

    def _tiled(self, nat: Native, x: torch.Tensor) -> torch.Tensor:
        """Large M: dequantize row tiles into one reused buffer and multiply each with ``torch.mm``."""
        n, kdim = self.n, self.kdim
        rows = max(32, TILE_WEIGHTS // kdim // 32 * 32)
        tile = torch.empty(min(rows, n), kdim, dtype=x.dtype)
        yt = torch.empty(n, x.shape[0], dtype=x.dtype)  # y^T: each tile's rows are contiguous
        xt = x.t()
        threads = torch.get_num_threads()
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            status = nat.lib.bpdq_dequant(
                self.planes.data_ptr(), self.coeffs.data_ptr(), self.k, n, kdim, self.group_size, r0, r1,
                tile.data_ptr(), _DT[x.dtype], threads,
            )  # fmt: skip
            if status:
                raise RuntimeError(f"bpdq_dequant failed (status {status}) for rows {r0}..{r1}")
            torch.mm(tile[: r1 - r0], xt, out=yt[r0:r1])
        y = yt.t().contiguous()
        if self.bias is not None:
            y += self.bias.to(y.dtype)
        return y


def cpu_lut_linear(
    x: torch.Tensor, planes: torch.Tensor, coeffs: torch.Tensor, bias: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """``x [M, in] @ W_hat^T + bias`` in ``x.dtype``; ``planes`` column-major (:func:`column_major_planes`)."""
    return _Plan(planes, coeffs, bias, group_size)(x)


@torch.library.custom_op("bpdq::cpu_lut_linear", mutates_args=())
def _cpu_lut_linear_op(
    x: torch.Tensor, planes: torch.Tensor, coeffs: torch.Tensor, bias: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    return cpu_lut_linear(x, planes, coeffs, bias, group_size)


def _setup_context(ctx, inputs, output) -> None:
    x, planes, coeffs, _, group_size = inputs
    ctx.save_for_backward(planes, coeffs)
    ctx.group_size, ctx.dtype = group_size, x.dtype


def _backward(ctx, grad):
    """Gradient for ``x`` only (``grad @ W_hat``, through the reference dequantization): packed weights
    and the bias of a quantized layer are not trained."""
    planes, coeffs = ctx.saved_tensors
    w = dequantize_packed(planes, coeffs, ctx.group_size).to(ctx.dtype)
    return grad.to(ctx.dtype) @ w, None, None, None, None


_cpu_lut_linear_op.register_autograd(_backward, setup_context=_setup_context)


@_cpu_lut_linear_op.register_fake
def _(x: torch.Tensor, planes: torch.Tensor, coeffs: torch.Tensor, bias: torch.Tensor | None, group_size: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], planes.shape[1])
