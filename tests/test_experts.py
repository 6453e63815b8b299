"""QuantExperts (bpdq/experts.py): the forward equals the dense experts with the dequantized weights, only
routed experts compute, every kernel runs per expert, and the buffers round-trip through a state dict."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import bpdq
from bpdq.experts import QuantExperts
from bpdq.kernels import cpu_lut

E, H, INTER, TOKENS, TOP_K = 4, 64, 32, 12, 2


def solved_experts(kernel: str = "torch", seed: int = 0) -> tuple[QuantExperts, torch.Tensor, torch.Tensor]:
    """A QuantExperts of random experts (RTN, 2 planes on gate_up, 3 on down) and their dequantized weights."""
    g = torch.Generator().manual_seed(seed)
    gate_up, down = torch.randn(E, 2 * INTER, H, generator=g) / H**0.5, torch.randn(E, H, INTER, generator=g) / INTER**0.5
    recipes = {"gate_up_proj": (2, 32), "down_proj": (3, 32)}
    q = QuantExperts(E, H, INTER, projections={n: {"planes": k, "group_size": gs} for n, (k, gs) in recipes.items()},
                     act_fn=F.silu, kernel=kernel)
    for name, weights in (("gate_up_proj", gate_up), ("down_proj", down)):
        k, gs = recipes[name]
        for e in range(E):
            q.set_expert(name, e, bpdq.quantize_weight(weights[e], grid={"type": "bitplane", "planes": k},
                                                       solver="rtn", group_size=gs))
    dense_gu = torch.stack([q.quantized_weight("gate_up_proj", e).dequantize() for e in range(E)])
    dense_down = torch.stack([q.quantized_weight("down_proj", e).dequantize() for e in range(E)])
    return q, dense_gu, dense_down


def routing(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(TOKENS, H, generator=g)
    index = torch.stack([torch.randperm(E - 1, generator=g)[:TOP_K] for _ in range(TOKENS)])  # never expert E-1
    weights = torch.softmax(torch.randn(TOKENS, TOP_K, generator=g), dim=-1)
    return x, index, weights


def dense_reference(x, index, weights, gate_up, down):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(index.shape[1]):
            e = int(index[t, slot])
            gate, up = F.linear(x[t], gate_up[e]).chunk(2)
            out[t] += weights[t, slot] * F.linear(F.silu(gate) * up, down[e])
    return out


def test_forward_equals_the_dense_experts_and_only_routed_experts_run(monkeypatch):
    q, gate_up, down = solved_experts()
    x, index, weights = routing()
    ran: list[int] = []
    expert = QuantExperts.expert
    monkeypatch.setattr(QuantExperts, "expert", lambda self, e, h: ran.append(e) or expert(self, e, h))
    got = q(x, index, weights)
    expected = dense_reference(x, index, weights, gate_up, down)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert sorted(ran) == sorted(set(index.flatten().tolist())) and E - 1 not in ran


@pytest.mark.parametrize("kernel", ["cpu_lut", "triton_gemm"])
def test_every_kernel_runs_per_expert_like_the_torch_reference(kernel, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # Triton on the CPU through its interpreter
    if kernel == "cpu_lut":
        assert cpu_lut.native().reason is None, f"the native library is needed: {cpu_lut.native().reason}"
    q, _, _ = solved_experts(kernel)
    reference, _, _ = solved_experts("torch")
    x, index, weights = routing()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    got, expected = q(x, index, weights), reference(x, index, weights)
    assert (got - expected).abs().max() <= 1e-3 * expected.abs().max()
    assert all(torch.equal(v, before[k]) for k, v in q.state_dict().items()), "the stored layout never changes"


def test_state_dict_round_trip_and_shape_checks():
    q, _, _ = solved_experts()
    x, index, weights = routing()
    empty = QuantExperts(E, H, INTER, projections={"gate_up_proj": {"planes": 2, "group_size": 32},
                                               "down_proj": {"planes": 3, "group_size": 32}}, act_fn=F.silu, kernel="torch")
    empty.load_state_dict(q.state_dict())
    assert torch.equal(empty(x, index, weights), q(x, index, weights))
    assert sorted(q.state_dict()) == ["down_coeffs", "down_planes", "gate_up_coeffs", "gate_up_planes"]
    assert tuple(q.gate_up_planes.shape) == (E, 2, 2 * INTER, H // 8) and tuple(q.down_coeffs.shape) == (E, INTER // 32, 4, H)
    with pytest.raises(ValueError, match="group size 16, the module holds .* and 32"):
        q.set_expert("down_proj", 0, bpdq.quantize_weight(torch.randn(H, INTER), grid={"type": "bitplane", "planes": 3},
                                                          solver="rtn", group_size=16))
    with pytest.raises(ValueError, match="in_features 32 is not divisible by group_size 64"):
        QuantExperts(E, H, INTER, projections={"gate_up_proj": {"planes": 2, "group_size": 32},
                                           "down_proj": {"planes": 2, "group_size": 64}}, act_fn=F.silu)
