"""Add a grid: a uniform grid whose range is clipped to a fraction of each group's min..max.

Importing this file registers the grid as ``clipped_uniform`` (so ``bpdq quantize --plugin
docs/examples/add_grid.py`` can use it from a config); running it shows the grid in use from Python and from
a config (``bpdq.QuantizeConfig.from_dict``) on a tiny random Llama. See docs/guides/add-a-grid.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from pydantic import Field

import bpdq
from bpdq.grids import Grid, ridge_lstsq, round_coeffs
from bpdq.options import Options


class ClippedUniformOptions(Options):
    bits: int = Field(default=3, ge=1, le=8, description="bits per weight (2^bits levels), 1..8")
    clip: float = Field(default=0.9, gt=0.0, le=1.0, description="fraction of the min..max range kept, (0, 1]")


@bpdq.GRIDS.register("clipped_uniform")
class ClippedUniformGrid(Grid):
    """2^bits evenly spaced levels over ``clip`` times each row's [min, max] (outliers are clamped)."""

    Options = ClippedUniformOptions

    @property
    def planes(self) -> int:
        return self.options.bits

    def _init(self, w: torch.Tensor) -> torch.Tensor:
        # w: [rows, g], one row of one group per row. Return coefficients [rows, k+1] = [c_1..c_k, c_0].
        maxq = 2**self.planes - 1
        lo = w.amin(dim=1).clamp(max=0) * self.options.clip
        hi = w.amax(dim=1).clamp(min=0) * self.options.clip
        scale = round_coeffs((hi - lo) / maxq)  # fp16 storage precision
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant row, or one below fp16's range
        zero = torch.round(-lo / scale).clamp(0, maxq)
        return round_coeffs(self._uniform(scale, -scale * zero.to(scale.dtype)))

    def _fit(self, w, codes, whiten, alpha):
        # Refit only a scale and an offset for fixed codes, so the grid stays uniform (the default
        # Grid._fit would fit all k+1 coefficients freely, like the bit-plane grid).
        design = torch.stack([codes.to(w.dtype), torch.ones_like(w)], dim=-1)  # [rows, g, 2]
        scale_offset = ridge_lstsq(design, w, whiten, alpha)  # [rows, 2]
        return self._uniform(scale_offset[:, 0], scale_offset[:, 1])

    def _uniform(self, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        powers = 2.0 ** torch.arange(self.planes, dtype=scale.dtype, device=scale.device)
        return torch.cat([scale.unsqueeze(1) * powers, offset.unsqueeze(1)], dim=1)


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _example_utils import ByteTokenizer, tiny_llama  # the tiny random Llama and tokenizer of every example

    # 1. From Python: a heavy-tailed weight, plain vs clipped 2-bit uniform grids (RTN without refits,
    #    group 128). Clipping sacrifices the few outliers for a finer step everywhere else.
    torch.manual_seed(0)
    weight = torch.distributions.StudentT(3.0).sample((64, 128))
    mse = {}
    for grid in ({"type": "uniform", "bits": 2}, {"type": "clipped_uniform", "bits": 2, "clip": 0.7}):
        qw = bpdq.quantize_weight(weight, grid=grid, solver={"type": "rtn", "refits": 0}, group_size=128)
        mse[grid["type"]] = (qw.dequantize() - weight).pow(2).mean().item()
        print(f"{grid['type']:>16}: bpw {qw.bits_per_weight:.3f}, weight MSE {mse[grid['type']]:.4f}")
    print("stored grid config:", qw.grid)
    if not mse["clipped_uniform"] < mse["uniform"]:
        raise SystemExit(f"expected clipping to lower the MSE of heavy-tailed weights, got {mse}")

    layer = bpdq.QuantLinear.from_linear(
        torch.nn.Linear(128, 32), grid="clipped_uniform", solver="rtn", group_size=32
    )
    print(layer)

    # 2. From a config (the fields of a strategy file, less `model:`): GPTQ over the new grid.
    config = bpdq.QuantizeConfig.from_dict({
        "quantize": {"group_size": 32, "grid": {"type": "clipped_uniform", "bits": 3, "clip": 0.9},
                     "solver": {"type": "gptq"}},
        "calibration": {"samples": 4, "seq_len": 32}, "device": "cpu", "progress": False,
    })
    report = bpdq.quantize(tiny_llama(), config, tokenizer=ByteTokenizer())
    grids = {m.recipe["grid"]["type"] for m in report.quantized}
    print(f"quantized {report.n_quantized} linears with grids {grids}, {report.avg_bpw_quantized:.3f} bpw")
    if grids != {"clipped_uniform"}:
        raise SystemExit(f"expected every linear on the clipped_uniform grid, got {grids}")


if __name__ == "__main__":
    main()
