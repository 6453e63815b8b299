"""Mixtures of experts served by vLLM (CPU build) through bpdq's fused-MoE method (bpdq/serving/vllm.py).

The method's pieces without an engine (weights created, stacked checkpoint tensors loaded per rank, the forward
against bpdq's QuantExperts), then engines: tiny quantized Qwen3-MoE and Qwen2-MoE in ``vllm.LLM`` (the Qwen3-MoE
also over two ranks, tensor- and expert-parallel), their greedy tokens and prompt log-probabilities against
``bpdq.load``'s model. Runs only in the vLLM virtual environment
(``scripts/test_vllm.sh``).
"""

from __future__ import annotations

import gc
import logging
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm", reason="vLLM is not installed here; scripts/test_vllm.sh runs these in .venv-vllm")

import bpdq  # noqa: E402
from bpdq.experts import QuantExperts  # noqa: E402
from tests.serving import checkpoints  # noqa: E402

log = logging.getLogger(__name__)
E, H, INTER = 8, 64, 64
PROJECTIONS = {"gate_up_proj": {"planes": 2, "group_size": 32}, "down_proj": {"planes": 3, "group_size": 16}}
NAMES = ["gate_up_planes", "gate_up_coeffs", "down_planes", "down_coeffs"]


def random_experts(projections=PROJECTIONS, inter=INTER) -> QuantExperts:
    """A QuantExperts with random bit-planes and coefficients (any values are a valid quantized module)."""
    experts = QuantExperts(E, H, inter, projections=projections, act_fn=torch.nn.functional.silu)
    g = torch.Generator().manual_seed(0)
    for name in ("gate_up", "down"):
        planes, coeffs = getattr(experts, f"{name}_planes"), getattr(experts, f"{name}_coeffs")
        planes.copy_(torch.randint(0, 256, planes.shape, generator=g, dtype=torch.uint8))
        coeffs.copy_((torch.randn(coeffs.shape, generator=g) * 0.05).half())
    return experts


class FakeRoutedExperts(torch.nn.Module):
    """What the method uses of vLLM's RoutedExperts: the MoE config (tensor-parallel rank and size, experts),
    the global->local expert map, and a load_weights for the names it does not load itself."""

    def __init__(self, tp_rank: int = 0, tp_size: int = 1, local: list[int] | None = None) -> None:
        super().__init__()
        self.moe_config = SimpleNamespace(activation=SimpleNamespace(value="silu"), is_act_and_mul=True,
                                          tp_rank=tp_rank, tp_size=tp_size, num_experts=E)
        self.params_dtype = torch.float32
        self.apply_router_weight_on_input = False
        self.local = list(range(E)) if local is None else local
        self.expert_map = None
        if local is not None:
            self.expert_map = torch.full((E,), -1, dtype=torch.int32)
            self.expert_map[torch.tensor(local)] = torch.arange(len(local), dtype=torch.int32)

    def _map_global_expert_id_to_local_expert_id(self, e: int) -> int:
        return self.local.index(e) if e in self.local else -1

    def load_weights(self, weights):
        for name, _ in weights:
            yield f"vllm:{name}"


def build(experts: QuantExperts, layer: FakeRoutedExperts, projections=PROJECTIONS):
    from bpdq.serving.vllm import BpdqFusedMoEMethod

    method = BpdqFusedMoEMethod("model.layers.0.mlp.experts", {"type": "experts", "projections": projections},
                                layer.moe_config)
    tp = layer.moe_config.tp_size
    method.create_weights(layer, len(layer.local), H, experts.intermediate_dim // tp, torch.float32,
                          weight_loader=None, unpadded_hidden_size=H, global_num_experts=E)
    tensors = [(n, getattr(experts, n)) for n in NAMES] + [("0.gate_proj.weight", torch.zeros(1))]
    loaded = list(layer.load_weights(iter(tensors)))
    assert sorted(loaded) == sorted(NAMES + ["vllm:0.gate_proj.weight"])
    method.process_weights_after_loading(layer)
    return method


def routing(tokens: int = 23, top_k: int = 2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:top_k] for _ in range(tokens)]).to(torch.int32)
    weights = torch.rand(tokens, top_k, generator=g).softmax(-1)
    return x, weights, ids


def test_weights_load_and_apply_equals_quant_experts():
    experts = random_experts()
    layer = FakeRoutedExperts()
    method = build(experts, layer)
    assert layer.gate_up_planes.shape == (E, 2, 2 * INTER, H // 8) and layer.down_coeffs.shape == (E, 4, 4, H)
    for n in NAMES:
        assert torch.equal(getattr(layer, n), getattr(experts, n)), n
    x, weights, ids = routing()
    out = method.apply(layer, x, weights, ids)
    expected = experts(x, ids.long(), weights)
    assert expected.abs().max() > 0 and torch.equal(out, expected)


def test_tensor_parallel_ranks_sum_to_the_whole_layer():
    experts = random_experts()
    x, weights, ids = routing()
    parts = []
    for rank in range(2):
        layer = FakeRoutedExperts(tp_rank=rank, tp_size=2)
        method = build(experts, layer)
        assert layer.gate_up_planes.shape[2] == INTER and layer.down_planes.shape[3] == INTER // 2 // 8
        # rank r holds its half of the gate rows and of the up rows
        half = INTER // 2
        gate_rows = experts.gate_up_planes[:, :, rank * half:(rank + 1) * half]
        up_rows = experts.gate_up_planes[:, :, INTER + rank * half:INTER + (rank + 1) * half]
        assert torch.equal(layer.gate_up_planes, torch.cat([gate_rows, up_rows], 2))
        parts.append(method.apply(layer, x, weights, ids))
    torch.testing.assert_close(parts[0] + parts[1], experts(x, ids.long(), weights), rtol=1e-4, atol=1e-4)


def test_expert_parallel_rank_computes_only_its_experts():
    experts = random_experts()
    local = [4, 5, 6, 7]
    layer = FakeRoutedExperts(local=local)
    method = build(experts, layer)
    assert layer.down_planes.shape[0] == 4 and torch.equal(layer.down_planes, experts.down_planes[4:])
    x, weights, ids = routing()
    out = method.apply(layer, x, weights, ids)
    others = torch.where(ids >= 4, ids, -1).long()  # QuantExperts skips ids outside its experts
    assert torch.equal(out, experts(x, others, weights))


def test_tensor_parallel_split_cutting_a_group_is_refused():
    from bpdq.serving.vllm import BpdqFusedMoEMethod

    projections = {"gate_up_proj": {"planes": 2, "group_size": 32}, "down_proj": {"planes": 2, "group_size": 64}}
    layer = FakeRoutedExperts(tp_rank=0, tp_size=2)
    method = BpdqFusedMoEMethod("model.layers.0.mlp.experts", {"type": "experts", "projections": projections},
                                layer.moe_config)
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.experts' down_proj: tensor parallelism over 2 ranks "
                       r"splits its 64 input columns into 32 per rank, which cuts its groups of 64 columns"):
        method.create_weights(layer, E, H, INTER // 2, torch.float32, weight_loader=None)


def test_checkpoint_tensor_of_the_wrong_shape_is_refused():
    experts = random_experts()
    layer = FakeRoutedExperts()
    # the table says 2 planes for down_proj, the checkpoint's tensors hold 3
    with pytest.raises(ValueError, match=r"checkpoint down_planes tensor is torch.uint8\[8, 3, 64, 8\], expected "
                       r"torch.uint8\[8, 2, 64, 8\] \(2 planes, group size 16, 8 experts\)"):
        build(experts, layer, projections={**PROJECTIONS, "down_proj": {"planes": 2, "group_size": 16}})


def test_a_linear_entry_on_the_experts_layer_is_refused():
    from vllm.model_executor.layers.fused_moe import RoutedExperts

    from bpdq.serving.vllm import BpdqVllmConfig

    config = BpdqVllmConfig.from_config({"quant_method": "bpdq", "format_version": 1, "modules": {
        "model.layers.0.mlp.experts": {"planes": 2, "group_size": 32, "bias": False}}})
    layer = RoutedExperts.__new__(RoutedExperts)  # only its type matters before the method is built
    with pytest.raises(ValueError, match="needs a \"type\": \"experts\" entry"):
        config.get_quant_method(layer, "model.layers.0.mlp.experts")


def test_block_named_differently_by_vllm_outside_mixtral_is_refused():
    from vllm.model_executor.layers.fused_moe import RoutedExperts

    from bpdq.serving.vllm import BpdqVllmConfig

    projections = {name: {"planes": 2, "group_size": 32} for name in ("gate_up_proj", "down_proj")}
    config = BpdqVllmConfig.from_config({"quant_method": "bpdq", "format_version": 1, "modules": {
        "model.layers.0.mlp.experts": {"type": "experts", "projections": projections}}})
    layer = RoutedExperts.__new__(RoutedExperts)
    # `block_sparse_moe` in a model that is not vLLM's Mixtral (here: no model being built): no rename is known
    with pytest.raises(ValueError, match=r"names the mixture of experts block 'model.layers.0.mlp.experts' "
                       r"\(transformers' module name\), vLLM's None names it "
                       r"'model.layers.0.block_sparse_moe.experts'.*for Mixtral only"):
        config.get_quant_method(layer, "model.layers.0.block_sparse_moe.experts")


# ---- one engine: a tiny Qwen3-MoE ---------------------------------------------------------------------------

ENGINE = {"dtype": "float32", "max_model_len": 256, "enforce_eager": True, "seed": 0,
          "kv_cache_memory_bytes": 64 * 2**20}
NEW_TOKENS = 12


def reference(ckpt):
    """bpdq.load's model on the prompts: (prompt token ids, their log-probabilities, greedy continuation)."""
    from tests.tiny_models import tiny_tokenizer

    model, _ = bpdq.load(ckpt)
    assert isinstance(model.model.layers[0].mlp.experts, QuantExperts)
    tok = tiny_tokenizer()
    out = []
    with torch.no_grad():
        for text in ("def fibonacci(n):", "The Python list method append", "import os\n"):
            ids = tok(text).input_ids
            x = torch.tensor([ids])
            logprobs = model(x).logits.log_softmax(-1)[0]
            prompt_lp = logprobs[:-1].gather(1, x[0, 1:, None])[:, 0]
            greedy = model.generate(x, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
            out.append((ids, prompt_lp, greedy[0, len(ids):].tolist()))
    return out


def experts_layout(model: torch.nn.Module) -> tuple[str, list[int]]:
    """In each vLLM worker: the method of layer 0's experts and the shape of its ``gate_up_planes``."""
    layer = model.model.layers[0]
    block = layer.block_sparse_moe if hasattr(layer, "block_sparse_moe") else layer.mlp  # vLLM's Mixtral names
    routed = block.experts.routed_experts
    return type(routed.quant_method).__name__, list(routed.gate_up_planes.shape)


def check_served(ckpt, monkeypatch, layouts, tolerance=1e-3, **engine):
    """Serve ``ckpt`` in ``vllm.LLM`` and compare with :func:`reference`: equal greedy tokens, prompt
    log-probabilities within ``tolerance``; ``layouts``: each rank's ``gate_up_planes`` shape."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    expected = reference(ckpt)
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model sends a function to the workers
    llm = LLM(model=str(ckpt), **ENGINE, **engine)
    try:
        assert llm.llm_engine.model_config.quantization == "bpdq"
        assert llm.apply_model(experts_layout) == [("BpdqFusedMoEMethod", shape) for shape in layouts]
        params = SamplingParams(max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, temperature=0.0, prompt_logprobs=0)
        outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids, _, _ in expected], params, use_tqdm=False)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    for out, (ids, prompt_lp, greedy) in zip(outs, expected):
        got_lp = torch.tensor([lp[t].logprob for t, lp in zip(ids[1:], out.prompt_logprobs[1:])])
        diff = (got_lp - prompt_lp).abs().max().item()
        got = list(out.outputs[0].token_ids)
        log.info("%s prompt %s: max |logprob diff| %.2e, vLLM %s, bpdq %s", engine, ids[:4], diff, got, greedy)
        # a wrong expert, shard or routing changes log-probabilities by far more than float32 rounding
        assert prompt_lp.min() < -1.0 and diff < tolerance, (diff, prompt_lp)
        assert got == greedy


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe", "mixtral"])
def test_tiny_moe_served_matches_bpdq_load(tmp_path, monkeypatch, arch):
    # 8 experts, 2 planes, gate and up rows of 64 each, 128 / 8 bytes of input columns; Mixtral's checkpoint
    # says `mlp` (transformers 5), vLLM's Mixtral `block_sparse_moe`: the plugin maps one to the other. Mixtral's
    # prompts differ by up to 1.2e-3 here (its unquantized model by 1e-5), Qwen's by 3e-4; a wrong expert by > 0.1
    check_served(checkpoints.tiny_moe(tmp_path / arch, arch), monkeypatch, [[8, 2, 128, 16]],
                 tolerance=2e-3 if arch == "mixtral" else 1e-3)


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tensor", "expert"])
def test_tiny_qwen3_moe_over_two_ranks(tmp_path, monkeypatch, expert_parallel):
    # tensor parallelism splits each expert's 64 intermediate rows in two (whole groups of 32 for down_proj);
    # expert parallelism gives each rank 4 of the 8 experts
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    layout = [4, 2, 128, 16] if expert_parallel else [8, 2, 64, 16]
    check_served(checkpoints.tiny_moe(tmp_path / "qwen3_moe"), monkeypatch, [layout, layout], tensor_parallel_size=2,
                 enable_expert_parallel=expert_parallel)
