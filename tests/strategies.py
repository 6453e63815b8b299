"""Hypothesis strategies shared by the test suite: shapes, bits, group sizes, weights, grids.

Weights are drawn as (distribution, scale, seed) and generated with torch, so that examples stay small to
describe and shrink well while covering awkward inputs (constant rows, many zeros, heavy tails, offsets).
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from bpdq.grids import BitPlaneGrid, UniformGrid

GROUP_SIZES = (32, 64, 128, 256)
DISTRIBUTIONS = ("normal", "uniform", "student_t", "positive", "sparse", "constant_rows")

seeds = st.integers(min_value=0, max_value=2**31 - 1)
low_bits = st.integers(min_value=1, max_value=4)
any_bits = st.integers(min_value=1, max_value=8)
group_sizes = st.sampled_from(GROUP_SIZES)
scales = st.sampled_from((1e-3, 0.02, 1.0, 30.0))
float_dtypes = st.sampled_from((torch.float32, torch.float16, torch.bfloat16))


def make_weight(rows: int, cols: int, distribution: str, scale: float, seed: int) -> torch.Tensor:
    """A float32 ``[rows, cols]`` tensor of the named kind (deterministic in ``seed``)."""
    gen = torch.Generator().manual_seed(seed)
    if distribution == "normal":
        w = torch.randn(rows, cols, generator=gen)
    elif distribution == "uniform":
        w = torch.rand(rows, cols, generator=gen) * 2 - 1
    elif distribution == "student_t":
        w = student_t(rows, cols, df=3.0, generator=gen)
    elif distribution == "positive":
        w = torch.rand(rows, cols, generator=gen) + 0.5
    elif distribution == "sparse":
        w = torch.randn(rows, cols, generator=gen) * (torch.rand(rows, cols, generator=gen) < 0.2)
    elif distribution == "constant_rows":
        w = torch.randn(rows, 1, generator=gen).expand(rows, cols).clone()
    else:
        raise ValueError(f"unknown distribution {distribution!r}; known: {DISTRIBUTIONS}")
    return (w * scale).to(torch.float32)


def student_t(rows: int, cols: int, *, df: float, generator: torch.Generator) -> torch.Tensor:
    """Heavy-tailed samples: normal / sqrt(chi2(df) / df), chi2 built from ``df`` squared normals."""
    z = torch.randn(rows, cols, generator=generator)
    chi2 = torch.randn(int(df), rows, cols, generator=generator).pow(2).sum(0)
    return z / torch.sqrt(chi2 / df)


@st.composite
def weights(
    draw, *, cols: int | None = None, max_rows: int = 6, max_cols: int = 256, distributions=DISTRIBUTIONS
) -> torch.Tensor:
    """A float32 weight ``[rows, cols]`` (``cols`` drawn as a multiple of 8 up to ``max_cols`` if not given)."""
    rows = draw(st.integers(min_value=1, max_value=max_rows))
    if cols is None:
        cols = 8 * draw(st.integers(min_value=1, max_value=max_cols // 8))
    return make_weight(rows, cols, draw(st.sampled_from(distributions)), draw(scales), draw(seeds))


@st.composite
def grouped_weights(
    draw, *, max_rows: int = 6, max_groups: int = 3, group_size=group_sizes
) -> tuple[torch.Tensor, int]:
    """``(weight [out, groups * g], g)`` with ``g`` from :data:`GROUP_SIZES`."""
    g = draw(group_size)
    n_groups = draw(st.integers(min_value=1, max_value=max_groups))
    return draw(weights(cols=g * n_groups, max_rows=max_rows)), g


@st.composite
def codes_and_coeffs(draw, *, planes=low_bits, max_out: int = 6, max_groups: int = 3, group_size=group_sizes):
    """``(codes int64 [out, in], coeffs float32 [out, groups, k+1], k, g)`` in the solver layout."""
    k = draw(planes)
    g = draw(group_size)
    out = draw(st.integers(min_value=1, max_value=max_out))
    n_groups = draw(st.integers(min_value=1, max_value=max_groups))
    gen = torch.Generator().manual_seed(draw(seeds))
    codes = torch.randint(0, 2**k, (out, n_groups * g), generator=gen)
    coeffs = torch.randn(out, n_groups, k + 1, generator=gen) * draw(scales)
    return codes, coeffs, k, g


@st.composite
def uniform_grids(draw, *, bits=low_bits) -> UniformGrid:
    return UniformGrid(bits=draw(bits), symmetric=draw(st.booleans()))


@st.composite
def bitplane_grids(draw, *, planes=low_bits) -> BitPlaneGrid:
    return BitPlaneGrid(planes=draw(planes))
