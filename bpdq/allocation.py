"""Bit allocation: planes per module (1..4 at a fixed group size) so that the model meets a target bpw.

Input: for every module its parameter count and its measured proxy loss at each plane count. A module at
``k`` planes costs ``params * bpw(k)`` bits, ``bpw(k) = k + 16 (k+1) / g``
(:func:`bpdq.quantized.bits_per_weight`). Every module starts at ``min_planes``; the upgrades are the
segments of the lower convex hull of its ``(bits, loss)`` points (a Lagrangian relaxation: a module at the
hull never wants a point above it), ordered over all modules by loss decrease per extra bit (ties: module
order). The allocation is the longest prefix of that order that fits the budget
``target * sum(params)``, so:

- the average bpw never exceeds the target, and falls short of it by less than the next upgrade's cost (one
  module's step, at most ``max_planes - min_planes`` planes of one module);
- a higher target never gives fewer planes to any module (the prefix only grows): bpw and the summed loss
  are monotone in the target;
- upgrades that do not lower a module's loss come last, so a target is met even when more planes stop
  helping.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

from bpdq.quantized import COEFF_BITS, bits_per_weight

MIN_PLANES = 1
MAX_PLANES = 4

def bpw_range(group_size: int, min_planes: int = MIN_PLANES, max_planes: int = MAX_PLANES) -> tuple[float, float]:
    """The targets an allocation can meet at ``group_size``: ``(bpw(min_planes), bpw(max_planes))``."""
    if not isinstance(group_size, int) or group_size <= 0 or group_size % 8:
        raise ValueError(f"group_size must be a positive multiple of 8, got {group_size!r}")
    if not 1 <= min_planes <= max_planes <= 8:
        raise ValueError(f"planes range must satisfy 1 <= min_planes <= max_planes <= 8, got {min_planes}..{max_planes}")
    return bits_per_weight(min_planes, group_size), bits_per_weight(max_planes, group_size)


def check_target_bpw(target_bpw: float, group_size: int, min_planes: int = MIN_PLANES, max_planes: int = MAX_PLANES) -> None:
    """``ValueError`` naming the allowed range unless ``target_bpw`` can be met at ``group_size``."""
    lo, hi = bpw_range(group_size, min_planes, max_planes)
    if isinstance(target_bpw, bool) or not isinstance(target_bpw, (int, float)) or not math.isfinite(target_bpw):
        raise ValueError(f"target_bpw must be a finite number, got {target_bpw!r}")
    if not lo - 1e-9 <= target_bpw <= hi + 1e-9:
        raise ValueError(
            f"target_bpw {target_bpw} cannot be met at group_size {group_size}: allowed {lo:g}..{hi:g} "
            f"({min_planes}..{max_planes} planes at {COEFF_BITS}-bit coefficients per group)"
        )


@dataclass(frozen=True)
class ModuleLoss:
    """One module's size and its measured proxy loss at each plane count (``losses[k]``)."""

    name: str
    params: int
    losses: dict[int, float]


@dataclass
class Allocation:
    """Planes per module and what they cost; ``str()`` is a table for reports."""

    planes: dict[str, int]
    group_size: int
    target_bpw: float
    bpw: float  # the model's average over the allocated modules
    loss: float  # sum of the chosen modules' proxy losses
    params: dict[str, int] = field(default_factory=dict)

    @property
    def histogram(self) -> dict[int, int]:
        """Number of modules at each plane count."""
        return dict(sorted(Counter(self.planes.values()).items()))

    def to_dict(self) -> dict[str, object]:
        return {
            "target_bpw": self.target_bpw,
            "bpw": self.bpw,
            "group_size": self.group_size,
            "loss": self.loss,
            "histogram": self.histogram,
            "planes": dict(self.planes),
        }

    def __str__(self) -> str:
        width = max([len("module"), *(len(n) for n in self.planes)])
        lines = [
            f"bit allocation: {self.bpw:.4f} bpw (target {self.target_bpw:g}, group size {self.group_size}); "
            f"modules per planes: {', '.join(f'{k}: {n}' for k, n in self.histogram.items())}",
            f"{'module':<{width}}  {'params':>10}  planes",
        ]
        lines += [f"{name:<{width}}  {self.params.get(name, 0):>10}  {k}" for name, k in self.planes.items()]
        return "\n".join(lines)


def allocate_planes(
    modules: Sequence[ModuleLoss],
    target_bpw: float,
    group_size: int,
    *,
    min_planes: int = MIN_PLANES,
    max_planes: int = MAX_PLANES,
) -> Allocation:
    """Planes per module meeting ``target_bpw`` from below (see the module docstring for the guarantees)."""
    check_target_bpw(target_bpw, group_size, min_planes, max_planes)
    if not modules:
        raise ValueError("allocate_planes needs at least one module")
    ks = range(min_planes, max_planes + 1)
    names = set()
    for m in modules:
        if m.name in names:
            raise ValueError(f"module {m.name!r} is listed twice")
        names.add(m.name)
        if not isinstance(m.params, int) or m.params <= 0:
            raise ValueError(f"module {m.name!r}: params must be a positive int, got {m.params!r}")
        missing = [k for k in ks if k not in m.losses]
        if missing:
            raise ValueError(f"module {m.name!r}: losses for planes {missing} are missing (need {min_planes}..{max_planes})")
        bad = [k for k in ks if not math.isfinite(m.losses[k]) or m.losses[k] < 0]
        if bad:
            raise ValueError(f"module {m.name!r}: losses must be finite and >= 0, got {[m.losses[k] for k in bad]}")
    total = sum(m.params for m in modules)
    budget = target_bpw * total * (1 + 1e-12)
    planes = {m.name: min_planes for m in modules}
    used = sum(m.params * bits_per_weight(min_planes, group_size) for m in modules)
    steps = []
    for index, m in enumerate(modules):
        for seg, (k0, k1) in enumerate(_hull_segments(m, ks, group_size)):
            cost = m.params * (bits_per_weight(k1, group_size) - bits_per_weight(k0, group_size))
            gain = m.losses[k0] - m.losses[k1]
            steps.append((-gain / cost, index, seg, k1, cost))
    steps.sort()
    for _, index, _, k1, cost in steps:
        if used + cost > budget:
            break
        planes[modules[index].name] = k1
        used += cost
    loss = sum(m.losses[planes[m.name]] for m in modules)
    return Allocation(planes, group_size, float(target_bpw), used / total, loss, {m.name: m.params for m in modules})


def _hull_segments(m: ModuleLoss, ks: range, group_size: int) -> list[tuple[int, int]]:
    """Consecutive ``(k_from, k_to)`` along the lower convex hull of ``(bits(k), loss(k))``."""
    hull: list[int] = []
    for k in ks:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            xa, xb, xk = (bits_per_weight(j, group_size) for j in (a, b, k))
            ya, yb, yk = m.losses[a], m.losses[b], m.losses[k]
            if (xb - xa) * (yk - ya) - (yb - ya) * (xk - xa) <= 0:  # b lies on or above the chord a-k
                hull.pop()
            else:
                break
        hull.append(k)
    return list(zip(hull, hull[1:]))
