"""Mixtures of experts (bpdq/engine/moe.py, bpdq/models/moe.py): Qwen3-MoE, Qwen2-MoE and Mixtral quantized
expert by expert, saved, loaded by bpdq.load and transformers, from a model directory and in memory, resumed;
one expert's result equals quantize_weight with the Hessian of the tokens routed to it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import bpdq
import bpdq.engine.loop as run_module
from bpdq.calibration import calibration_windows
from bpdq.engine.interrupt import RunInterrupted
from bpdq.experts import QuantExperts
from bpdq.linear import QuantLinear
from bpdq.solvers.hessian import HessianAccumulator
from tests.tiny_models import MOE_ARCHITECTURES, TINY_CALIBRATION, tiny_model, tiny_model_dir, tiny_tokenizer

RECIPE = {"group_size": 32, "grid": {"type": "bitplane", "planes": 2}, "solver": "gptq"}


def config(output=None, **extra):
    return {"calibration": TINY_CALIBRATION, "quantize": RECIPE, "progress": False, "max_shard_size": "40KB",
            **({"output": str(output)} if output is not None else {}), **extra}


def checkpoint_files(path: Path) -> dict[str, bytes]:
    """The weights, the shard index and the quantization_config (the rest names where the model came from)."""
    files = {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.suffix == ".safetensors"}
    files["model.safetensors.index.json"] = (path / "model.safetensors.index.json").read_bytes()
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    return files | {"quantization_config": json.dumps(qc, sort_keys=True).encode()}


def ids(n: int = 24) -> torch.Tensor:
    return torch.randint(0, len(tiny_tokenizer()), (2, n), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_every_expert_is_quantized_and_both_loaders_give_the_same_logits(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    model = tiny_model(arch)
    report = bpdq.quantize(model, config(tmp_path / "out"), tokenizer=tiny_tokenizer())
    for i, layer in enumerate(model.model.layers):
        experts = layer.mlp.experts
        assert isinstance(experts, QuantExperts) and experts.num_experts == 8
        for proj in ("gate_up_proj", "down_proj"):
            planes, coeffs = experts.packed(proj)
            assert all(coeffs[e].abs().sum() > 0 for e in range(8)), f"layer {i} {proj}: an expert left empty"
            names = {m.name for m in report.modules if not m.skipped}
            assert all(f"model.layers.{i}.mlp.experts.{e}.{proj}" in names for e in range(8))
        assert type(layer.mlp.gate).__name__.endswith("Router"), "the router stays in 16 bits"
        assert isinstance(layer.self_attn.q_proj, QuantLinear)
        if arch == "qwen2_moe":
            assert isinstance(layer.mlp.shared_expert.down_proj, QuantLinear)
            assert isinstance(layer.mlp.shared_expert_gate, torch.nn.Linear), "the shared expert's gate stays dense"
    experts_records = [m for m in report.modules if m.calibration is not None]
    assert len(experts_records) == 2 * 8 * 2
    assert {m.calibration["hessian"] for m in experts_records} <= {"mixed", "pooled"}
    for m in experts_records:  # routed tokens plus the pooled Hessian; no routed token: the pooled Hessian alone
        assert (m.calibration["hessian"] == "pooled") == (m.calibration["tokens"] == 0), m
    x = ids()
    with torch.no_grad():
        expected = model(x).logits
        loaded, _ = bpdq.load(tmp_path / "out")
        via_bpdq = loaded(x).logits
        via_hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()(x).logits
    assert isinstance(loaded.model.layers[1].mlp.experts, QuantExperts)
    assert torch.equal(via_bpdq, expected) and torch.equal(via_hf, expected)
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    entry = qc["modules"]["model.layers.0.mlp.experts"]
    assert entry["type"] == "experts" and entry["projections"]["down_proj"]["planes"] == 2


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_a_model_directory_gives_the_in_memory_bytes_and_a_resumed_run_too(tmp_path, arch, monkeypatch):
    src = tiny_model_dir(tmp_path / "src", arch)
    bpdq.quantize(tiny_model(arch), config(tmp_path / "memory"), tokenizer=tiny_tokenizer())
    bpdq.quantize(src, config(tmp_path / "lazy"))
    reference = checkpoint_files(tmp_path / "memory")
    assert checkpoint_files(tmp_path / "lazy") == reference
    out = tmp_path / "resumed"
    with monkeypatch.context() as m:
        m.setattr(run_module, "stop_requested", lambda: True)
        with pytest.raises(RunInterrupted):
            bpdq.quantize(src, config(out, resume="auto"))
    other = {**TINY_CALIBRATION, "moe_all_experts": True}
    with pytest.raises(ValueError, match="moe_all_experts"):
        bpdq.quantize(src, config(out, resume="required", calibration=other))
    bpdq.quantize(src, config(out, resume="required"))
    assert checkpoint_files(out) == reference


def test_zero_routed_experts_use_the_pooled_hessian_and_all_experts_calibrates_each_on_every_token(tmp_path):
    model = tiny_model("qwen3_moe", layers=1)
    router = model.model.layers[0].mlp.gate

    def never_6_or_7(hidden):  # Qwen3-MoE's router, with experts 6 and 7 masked out
        logits = torch.nn.functional.linear(hidden.reshape(-1, 64), router.weight)
        probs = torch.softmax(logits.masked_fill(torch.arange(8) >= 6, float("-inf")), dim=-1, dtype=torch.float)
        top, index = torch.topk(probs, 2, dim=-1)
        return logits, (top / top.sum(dim=-1, keepdim=True)).to(logits.dtype), index

    router.forward = never_6_or_7
    report = bpdq.quantize(model, config(calibration={**TINY_CALIBRATION, "moe_prior": 0}), tokenizer=tiny_tokenizer())
    by_name = {m.name: m.calibration for m in report.modules if m.calibration}
    assert by_name["model.layers.0.mlp.experts.7.gate_up_proj"] == {"tokens": 0, "hessian": "pooled"}
    assert by_name["model.layers.0.mlp.experts.6.down_proj"] == {"tokens": 0, "hessian": "pooled"}
    assert all(c["hessian"] == "routed" for n, c in by_name.items() if ".experts.6." not in n and ".experts.7." not in n)
    report = bpdq.quantize(tiny_model("qwen3_moe", layers=1),
                           config(calibration={**TINY_CALIBRATION, "moe_all_experts": True}), tokenizer=tiny_tokenizer())
    assert {m.calibration["hessian"] for m in report.modules if m.calibration} == {"all"}


@pytest.mark.parametrize("prior", [1.0, 0.0, 3.0])
def test_one_expert_equals_quantize_weight_with_the_hessian_of_its_routed_tokens(prior):
    model = tiny_model("mixtral", layers=1)
    dense_gate_up = model.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    batches = torch.stack(calibration_windows(tiny_tokenizer(), TINY_CALIBRATION)).split(8)
    routed: dict[int, HessianAccumulator] = {e: HessianAccumulator(64) for e in range(8)}
    pooled = HessianAccumulator(64)

    def grab(_module, args):
        x, index = args[0], args[1]
        pooled.add(x)
        for e in range(8):
            routed[e].add(x[(index == e).any(dim=-1)])

    handle = model.model.layers[0].mlp.experts.register_forward_pre_hook(grab)
    with torch.no_grad():
        for b in batches:
            model(input_ids=b)
    handle.remove()
    expert = max(range(8), key=lambda e: routed[e].n)
    rules = [{"match": r".*self_attn\..*", "skip": True}]  # the experts then see the full-precision stream
    calibration = {**TINY_CALIBRATION, "moe_prior": prior}
    report = bpdq.quantize(model, config(rules=rules, calibration=calibration), tokenizer=tiny_tokenizer())
    n = routed[expert].n
    share = n / (n + prior * 64)  # the pooled Hessian weighs as prior x 64 (the hidden size) tokens
    hessian = routed[expert].hessian.mul_(share).add_(pooled.hessian, alpha=1.0 - share) if prior else routed[expert].hessian
    expected = bpdq.quantize_weight(dense_gate_up[expert], hessian, grid=RECIPE["grid"],
                                    solver=RECIPE["solver"], group_size=32)
    record = next(m for m in report.modules if m.name == f"model.layers.0.mlp.experts.{expert}.gate_up_proj")
    assert record.calibration == {"tokens": n, "hessian": "mixed" if prior else "routed"}
    got = model.model.layers[0].mlp.experts.quantized_weight("gate_up_proj", expert)
    assert routed[expert].n >= 64
    assert torch.equal(got.planes, expected.planes) and torch.equal(got.coeffs, expected.coeffs)


@pytest.mark.parametrize("extra, named", [({"tuning": {}}, "tuning"), ({"target_bpw": 3.0}, "target_bpw"),
                                          ({"calibration": {**TINY_CALIBRATION, "asymmetric": True}}, "calibration.asymmetric")])
def test_quality_options_are_refused_on_experts_before_any_work(tmp_path, extra, named):
    with pytest.raises(ValueError, match=f"{named}.*not supported on a mixture of experts"):
        bpdq.quantize(tiny_model("qwen3_moe"), config(tmp_path / "out", **extra), tokenizer=tiny_tokenizer())
    assert not (tmp_path / "out").exists()


def test_the_cli_quantizes_a_mixtral_directory_and_refuses_tuning_with_exit_2(tmp_path):
    from tests.cli.conftest import run_many, write_config

    src = tiny_model_dir(tmp_path / "src", "mixtral")
    base = {"model": str(src), "calibration": TINY_CALIBRATION, "quantize": RECIPE, "device": "cpu"}
    ok = write_config(tmp_path / "ok.yaml", {**base, "output": str(tmp_path / "ok")})
    tuned = write_config(tmp_path / "tuned.yaml", {**base, "output": str(tmp_path / "tuned"), "tuning": {}})
    procs = run_many({"ok": ["quantize", str(ok)], "tuned": ["quantize", str(tuned)]})
    assert procs["ok"].returncode == 0, procs["ok"].stderr
    model, _ = bpdq.load(tmp_path / "ok")
    assert all(isinstance(layer.mlp.experts, QuantExperts) for layer in model.model.layers)
    assert procs["tuned"].returncode == 2 and "tuning is not supported on a mixture of experts" in procs["tuned"].stderr
    assert not (tmp_path / "tuned").exists()


def test_an_unregistered_mixture_of_experts_in_the_fused_layout_is_detected(tmp_path):
    import transformers

    from bpdq.models import get_adapter

    olmoe = transformers.OlmoeConfig(vocab_size=len(tiny_tokenizer()), hidden_size=64, intermediate_size=32,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      num_experts=8, num_experts_per_tok=2, max_position_embeddings=256)
    olmoe.architectures = ["OlmoeForCausalLM"]
    torch.manual_seed(0)
    model = transformers.OlmoeForCausalLM(olmoe).eval()
    assert "OlmoeForCausalLM" not in bpdq.ADAPTERS and get_adapter(model).experts is not None
    model.save_pretrained(tmp_path / "src")
    tiny_tokenizer().save_pretrained(tmp_path / "src")
    report = bpdq.quantize(tmp_path / "src", config(tmp_path / "out"))
    assert len([m for m in report.modules if m.calibration is not None]) == 2 * 8 * 2
    loaded, _ = bpdq.load(tmp_path / "out")
    assert all(isinstance(layer.mlp.experts, QuantExperts) for layer in loaded.model.layers)


def test_rules_give_each_projection_its_recipe_and_a_half_skip_is_refused(tmp_path):
    rules = [{"match": r".*experts\.down_proj", "grid": {"type": "bitplane", "planes": 3}}]
    model = tiny_model("mixtral", layers=1)
    bpdq.quantize(model, config(tmp_path / "out", quantize={**RECIPE, "solver": "rtn"}, rules=rules), tokenizer=tiny_tokenizer())
    experts = model.model.layers[0].mlp.experts
    assert experts.meta["gate_up_proj"]["planes"] == 2 and experts.meta["down_proj"]["planes"] == 3
    loaded, _ = bpdq.load(tmp_path / "out")
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    skip_down = [{"match": r".*experts\.down_proj", "skip": True}]
    with pytest.raises(ValueError, match="skips one of .*gate_up_proj.*down_proj.*but not the other"):
        bpdq.quantize(tiny_model("mixtral", layers=1), config(tmp_path / "half", rules=skip_down), tokenizer=tiny_tokenizer())
    assert not (tmp_path / "half").exists()
    skip_both = [{"match": r".*experts\..*", "skip": True}]
    report = bpdq.quantize(tiny_model("mixtral", layers=1), config(rules=skip_both), tokenizer=tiny_tokenizer())
    assert [m.name for m in report.modules if m.skipped] == ["model.layers.0.mlp.experts.gate_up_proj",
                                                              "model.layers.0.mlp.experts.down_proj"]


def test_inspect_lists_each_expert_of_a_checkpoint(tmp_path):
    from tests.cli.conftest import json_stdout, run_cli

    bpdq.quantize(tiny_model("qwen3_moe", layers=1), config(tmp_path / "out"), tokenizer=tiny_tokenizer())
    info = json_stdout(run_cli("inspect", str(tmp_path / "out"), "--json"))
    names = [m["name"] for m in info["modules"]]
    assert info["modules_quantized"] == 4 + 8 * 2 and info["modules_skipped"] == 0
    assert "model.layers.0.mlp.experts.7.down_proj" in names and len(names) == len(set(names)) == 20
    (tmp_path / "out" / "bpdq_report.json").unlink()
    info = json_stdout(run_cli("inspect", str(tmp_path / "out"), "--json"))
    assert info["modules_quantized"] == 4 + 2 and {m["planes"] for m in info["modules"]} == {2}


def test_offloaded_activations_and_expert_inputs_give_the_same_checkpoint(tmp_path, monkeypatch):
    import bpdq.engine.moe as moe

    bpdq.quantize(tiny_model("qwen3_moe"), config(tmp_path / "memory"), tokenizer=tiny_tokenizer())
    offloaded: list[int] = []
    capture = moe.capture_expert_inputs

    def spy(*args, **kwargs):
        store, counts = capture(*args, **kwargs)
        offloaded.append(store.n_offloaded)
        return store, counts

    monkeypatch.setattr(moe, "capture_expert_inputs", spy)
    offload = {**TINY_CALIBRATION, "offload": "9KB"}
    bpdq.quantize(tiny_model("qwen3_moe"), config(tmp_path / "offloaded", calibration=offload), tokenizer=tiny_tokenizer())
    assert checkpoint_files(tmp_path / "offloaded") == checkpoint_files(tmp_path / "memory")
    assert len(offloaded) == 2 and all(n > 0 for n in offloaded), "the captured expert inputs are offloaded too"
