"""bpdq/allocation.py: planes per module meet a target bpw from below, monotone in the target."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bpdq.allocation import ModuleLoss, allocate_planes, bpw_range
from bpdq.quantized import QuantizedWeight, bits_per_weight

G = 64


def _modules(draw_losses, sizes):
    return [ModuleLoss(f"m{i}", p, dict(enumerate(ls, start=1))) for i, (p, ls) in enumerate(zip(sizes, draw_losses))]


losses4 = st.lists(st.floats(0.0, 100.0, allow_nan=False), min_size=4, max_size=4)
module_lists = st.integers(1, 12).flatmap(
    lambda n: st.tuples(st.lists(losses4, min_size=n, max_size=n), st.lists(st.integers(1, 50).map(lambda x: x * G * 9), min_size=n, max_size=n))
)
lo, hi = bpw_range(G)
targets = st.floats(lo, hi, allow_nan=False)


def test_bpw_formula_matches_quantized_weight():
    import torch

    for k in (1, 2, 3, 4):
        qw = QuantizedWeight.from_codes(torch.zeros(2, 128, dtype=torch.int64), torch.zeros(2, 2, k + 1), planes=k, group_size=G)
        assert bits_per_weight(k, G) == qw.bits_per_weight
    assert bpw_range(64) == (1.5, 5.25) and bpw_range(128) == (1.25, 4.625)


@settings(max_examples=40, deadline=None)
@given(case=module_lists, target=targets)
def test_meets_the_target_within_one_step_and_never_exceeds_it(case, target):
    mods = _modules(*case)
    alloc = allocate_planes(mods, target, G)
    total = sum(m.params for m in mods)
    bits = sum(m.params * bits_per_weight(alloc.planes[m.name], G) for m in mods)
    assert alloc.bpw == pytest.approx(bits / total, rel=1e-12)
    assert alloc.bpw <= target * (1 + 1e-12)
    # any single further plane on any module that is not at the top would exceed the target, or the
    # shortfall is below the largest single upgrade step (one module's granularity)
    largest_step = max(m.params * (bits_per_weight(4, G) - bits_per_weight(1, G)) for m in mods)
    assert (target - alloc.bpw) * total < largest_step + 1e-6 or all(k == 4 for k in alloc.planes.values())
    assert alloc.loss == pytest.approx(sum(m.losses[alloc.planes[m.name]] for m in mods))
    assert set(alloc.planes.values()) <= {1, 2, 3, 4}


@settings(max_examples=30, deadline=None)
@given(case=module_lists, t1=targets, t2=targets)
def test_monotone_in_the_target(case, t1, t2):
    mods = _modules(*case)
    a, b = sorted((t1, t2))
    low, high = allocate_planes(mods, a, G), allocate_planes(mods, b, G)
    assert all(high.planes[n] >= low.planes[n] for n in low.planes)
    assert high.bpw >= low.bpw
    # where more planes never hurt (real layers), the summed loss is monotone too
    decreasing = _modules([sorted(ls, reverse=True) for ls in case[0]], case[1])
    assert allocate_planes(decreasing, b, G).loss <= allocate_planes(decreasing, a, G).loss + 1e-9


def test_spends_bits_where_they_lower_the_loss_most():
    sensitive = ModuleLoss("sensitive", 576 * 576, {1: 100.0, 2: 30.0, 3: 10.0, 4: 4.0})
    robust = ModuleLoss("robust", 576 * 576, {1: 1.0, 2: 0.5, 3: 0.3, 4: 0.2})
    alloc = allocate_planes([sensitive, robust], bits_per_weight(2, G) + 0.5 * (bits_per_weight(3, G) - bits_per_weight(2, G)), G)
    assert alloc.planes == {"sensitive": 3, "robust": 2} or alloc.planes["sensitive"] > alloc.planes["robust"]
    # the extremes: everything at one plane / at four planes
    assert set(allocate_planes([sensitive, robust], lo, G).planes.values()) == {1}
    assert set(allocate_planes([sensitive, robust], hi, G).planes.values()) == {4}
    # a uniform target on identical modules gives the uniform allocation
    same = [ModuleLoss(f"s{i}", 4096, {1: 8.0, 2: 4.0, 3: 2.0, 4: 1.0}) for i in range(5)]
    assert set(allocate_planes(same, bits_per_weight(2, G), G).planes.values()) == {2}


def test_a_useless_plane_is_still_spent_to_meet_the_target():
    flat = ModuleLoss("flat", 4096, {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0})
    assert allocate_planes([flat], hi, G).planes == {"flat": 4}


def test_report_lists_every_module():
    mods = [ModuleLoss(f"model.layers.{i}.mlp.down_proj", 4096, {1: 9.0, 2: 3.0, 3: 1.0, 4: 0.5}) for i in range(3)]
    alloc = allocate_planes(mods, 2.75, G)
    text = str(alloc)
    assert "target 2.75" in text and all(m.name in text for m in mods)
    assert alloc.to_dict()["histogram"] == alloc.histogram and sum(alloc.histogram.values()) == 3


@pytest.mark.parametrize("target", [1.49, 5.26, float("nan")])
def test_unreachable_targets_name_the_allowed_range(target):
    m = ModuleLoss("m", 4096, {1: 1.0, 2: 0.5, 3: 0.2, 4: 0.1})
    with pytest.raises(ValueError, match=r"allowed 1\.5\.\.5\.25|finite number"):
        allocate_planes([m], target, G)


def test_bad_module_lists_are_errors():
    good = {1: 1.0, 2: 0.5, 3: 0.2, 4: 0.1}
    with pytest.raises(ValueError, match="at least one module"):
        allocate_planes([], 2.75, G)
    with pytest.raises(ValueError, match=r"losses for planes \[4\] are missing"):
        allocate_planes([ModuleLoss("m", 64, {1: 1.0, 2: 0.5, 3: 0.2})], 2.75, G)
    with pytest.raises(ValueError, match="params must be a positive int"):
        allocate_planes([ModuleLoss("m", 0, good)], 2.75, G)
    with pytest.raises(ValueError, match="listed twice"):
        allocate_planes([ModuleLoss("m", 64, good), ModuleLoss("m", 64, good)], 2.75, G)
    with pytest.raises(ValueError, match="finite and >= 0"):
        allocate_planes([ModuleLoss("m", 64, {**good, 2: float("inf")})], 2.75, G)
    with pytest.raises(ValueError, match="multiple of 8"):
        allocate_planes([ModuleLoss("m", 64, good)], 2.75, 60)
