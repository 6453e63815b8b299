"""quantize_model on tiny random Llama / Qwen2 / Qwen3 models (bpdq/pipeline/run.py): every solver end to end,
rules and skips, sequential calibration on the quantized layers' outputs, determinism, errors, devices and
hooks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bpdq
from bpdq.linear import QuantLinear
from bpdq.solvers.rtn import RTN
from tests.tiny_models import ARCHITECTURES, TINY_CALIBRATION, TINY_RECIPE, tiny_model, tiny_tokenizer

# few BPDQ iterations keep the tiny runs fast; the iteration count itself is the solver tests' business
SOLVERS = [s for s in ({"type": "rtn"}, {"type": "gptq"}, {"type": "bpdq", "iters": 2}) if s["type"] in bpdq.SOLVERS]
PROBE = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 8, 100, 12, 31, 64]])


def without_layers(model):
    clone = copy.deepcopy(model)
    clone.model.layers = nn.ModuleList()
    return clone


def linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear)) and ".layers." in n]


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: s["type"])
def test_every_solver_end_to_end(arch, solver, tmp_path):
    model, tok = tiny_model(arch), tiny_tokenizer()
    reference = model(PROBE).logits
    trivial = without_layers(model)(PROBE).logits  # the same model with its decoder layers left out
    names = linear_names(model)
    report = bpdq.quantize_model(model, tok, recipe={**TINY_RECIPE, "solver": solver}, calibration=TINY_CALIBRATION, device="cpu", progress=False)
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in names)
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.model.embed_tokens.weight
    assert [r.name for r in report.modules] == names
    assert report.n_quantized == len(names) == 7 * 2 and report.n_skipped == 0
    assert all(r.recipe["solver"]["type"] == solver["type"] and r.bits_per_weight == 2 + 16 * 3 / 32 for r in report.modules)
    if solver["type"] == "rtn":  # data-free: no Hessian, no proxy loss
        assert all(r.proxy_loss is None for r in report.modules) and report.calibration == {}
    else:
        assert all(r.proxy_loss is not None and 0 <= r.relative_loss < 1 for r in report.modules)
    assert report.avg_bpw_quantized == pytest.approx(3.5)
    logits = model(PROBE).logits
    assert torch.isfinite(logits).all() and not torch.equal(logits, reference)
    # 2-bit g32 on these random models: error <= ~0.18 of the logits' variance (measured on every arch and
    # solver), far below what leaving out the decoder layers costs (>= 0.44 of it)
    err = (logits - reference).pow(2).mean()
    assert err < 0.25 * reference.var()
    assert err < 0.4 * (trivial - reference).pow(2).mean()
    bpdq.save(model, tok, tmp_path / "ckpt", report=report)
    loaded, _ = bpdq.load(tmp_path / "ckpt")
    assert torch.equal(loaded(PROBE).logits, logits)


def test_layer_calibration_sees_quantized_predecessors(register):
    """Each linear's Hessian comes from the inputs it receives in the final, quantized model: earlier groups
    of its layer and all earlier layers were already quantized when it was calibrated."""
    seen: dict[int, torch.Tensor] = {}

    class Recording(RTN):
        requires_hessian = True  # a Hessian-free solver would make the run data-free

        def _solve(self, W, H, grid, group_size):
            seen[len(seen)] = H.clone()
            return super()._solve(W, H, grid, group_size)

    register(bpdq.SOLVERS, "recording-rtn", Recording)
    model, tok = tiny_model("llama", layers=3), tiny_tokenizer()
    bpdq.quantize_model(model, tok, recipe={**TINY_RECIPE, "solver": "recording-rtn"}, calibration=TINY_CALIBRATION, progress=False)
    windows = bpdq.calibration.calibration_windows(tok, TINY_CALIBRATION)
    accs = {}
    names = linear_names(model)
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda m, a, n=n: accs.setdefault(n, bpdq.solvers.hessian.HessianAccumulator(m.in_features)).add(a[0])
        )
        for n in names
    ]
    with torch.no_grad():
        model(torch.stack(windows), use_cache=False)
    for h in hooks:
        h.remove()
    assert len(seen) == len(names)
    for i, n in enumerate(names):
        torch.testing.assert_close(seen[i], accs[n].hessian, rtol=1e-4, atol=1e-5)


def test_rules_skip_and_override(tmp_path):
    model, tok = tiny_model("qwen2"), tiny_tokenizer()
    rules = [
        {"match": r".*\.mlp\.down_proj", "skip": True},
        {"match": r"model\.layers\.0\.self_attn\.q_proj", "group_size": 64, "grid": {"type": "bitplane", "planes": 3}},
    ]
    report = bpdq.quantize_model(model, tok, recipe=TINY_RECIPE, calibration=TINY_CALIBRATION, rules=rules, progress=False)
    down = [n for n in linear_names(model) if n.endswith("down_proj")]
    assert all(type(model.get_submodule(n)) is nn.Linear for n in down)
    q0 = model.model.layers[0].self_attn.q_proj
    assert isinstance(q0, QuantLinear) and (q0.k, q0.group_size) == (3, 64)
    assert (model.model.layers[1].self_attn.q_proj.k, model.model.layers[1].self_attn.q_proj.group_size) == (2, 32)
    skipped = {r.name for r in report.modules if r.skipped}
    assert skipped == set(down) and report.n_skipped == 2
    assert report.avg_bpw_model > report.avg_bpw_quantized
    bpdq.save(model, tok, tmp_path / "c")
    loaded, _ = bpdq.load(tmp_path / "c")
    assert type(loaded.model.layers[0].mlp.down_proj) is nn.Linear
    assert loaded.model.layers[0].self_attn.q_proj.k == 3
    assert torch.equal(loaded(PROBE).logits, model(PROBE).logits)


def test_lm_head_only_when_a_rule_asks(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    rules = [{"match": "lm_head", "grid": {"type": "bitplane", "planes": 4}}]
    report = bpdq.quantize_model(model, tok, recipe=TINY_RECIPE, calibration=TINY_CALIBRATION, rules=rules, progress=False)
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.k == 4
    assert isinstance(model.model.embed_tokens, nn.Embedding) and model.config.tie_word_embeddings is False
    assert report.modules[-1].name == "lm_head"
    bpdq.save(model, tok, tmp_path / "c")
    loaded, _ = bpdq.load(tmp_path / "c")
    assert isinstance(loaded.lm_head, QuantLinear)
    assert torch.equal(loaded(PROBE).logits, model(PROBE).logits)


def test_embeddings_are_never_quantized():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    with pytest.raises(ValueError, match="embedding"):
        bpdq.quantize_model(model, tok, recipe=TINY_RECIPE, calibration=TINY_CALIBRATION, rules=[{"match": ".*embed.*"}])


def test_same_seed_same_checkpoint_bytes(tmp_path):
    tok = tiny_tokenizer()
    recipe = {**TINY_RECIPE, "solver": SOLVERS[-1]}
    for run in ("a", "b"):
        model = tiny_model("qwen3", layers=1)
        bpdq.quantize_model(model, tok, recipe=recipe, calibration=TINY_CALIBRATION, progress=False)
        bpdq.save(model, tok, tmp_path / run)
    for f in ("model.safetensors", "config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    model = tiny_model("qwen3", layers=1)
    bpdq.quantize_model(model, tok, recipe=recipe, calibration={**TINY_CALIBRATION, "seed": 1}, progress=False)
    bpdq.save(model, tok, tmp_path / "c")
    assert (tmp_path / "c" / "model.safetensors").read_bytes() != (tmp_path / "a" / "model.safetensors").read_bytes()


def test_token_id_calibration_and_its_errors():
    model, tok = tiny_model("llama", layers=1), tiny_tokenizer()
    windows = [torch.randint(0, len(tok), (1, 24), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    report = bpdq.quantize_model(model, tok, recipe={**TINY_RECIPE, "solver": "gptq"}, calibration=windows, progress=False)
    assert report.calibration == {"windows": 3, "seq_len": 24}
    for bad, err in [
        ([torch.tensor([1.5, 2.0])], TypeError),
        ([torch.zeros(2, 3, dtype=torch.long)], ValueError),
        ([torch.tensor([10**6])], ValueError),
        ([], TypeError),
    ]:
        with pytest.raises(err):
            bpdq.quantize_model(tiny_model("llama", layers=1), tok, recipe={**TINY_RECIPE, "solver": "gptq"}, calibration=bad)


def test_argument_errors():
    model, tok = tiny_model("llama", layers=1), tiny_tokenizer()
    with pytest.raises(ValueError, match="CUDA is not available" if not torch.cuda.is_available() else "allowed"):
        bpdq.quantize_model(model, tok, recipe=TINY_RECIPE, calibration=TINY_CALIBRATION, device="cuda:0" if not torch.cuda.is_available() else "tpu")
    with pytest.raises(ValueError, match="allowed"):
        bpdq.quantize_model(model, tok, recipe=TINY_RECIPE, calibration=TINY_CALIBRATION, device="gpu")
    with pytest.raises(TypeError, match="recipe"):
        bpdq.quantize_model(model, tok, recipe="rtn", calibration=TINY_CALIBRATION)
    with pytest.raises(ValueError, match="cannot quantize model.layers.0.self_attn.q_proj.*allowed group sizes"):
        bpdq.quantize_model(model, tok, recipe={**TINY_RECIPE, "group_size": 48}, calibration=TINY_CALIBRATION, progress=False)


def test_quantizing_twice_is_refused():
    model, tok = tiny_model("llama", layers=1), tiny_tokenizer()
    bpdq.quantize_model(model, tok, recipe=TINY_RECIPE, calibration=TINY_CALIBRATION, progress=False)
    with pytest.raises(ValueError, match="already"):
        bpdq.quantize_model(model, tok, recipe=TINY_RECIPE, calibration=TINY_CALIBRATION, progress=False)


def test_progress_bar_and_log_lines(caplog):
    model, tok = tiny_model("llama", layers=2), tiny_tokenizer()
    with caplog.at_level("INFO", logger="bpdq.pipeline"):
        bpdq.quantize_model(model, tok, recipe=TINY_RECIPE, calibration=TINY_CALIBRATION, progress=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "bpdq.pipeline"]
    assert any("layer 1/2" in m for m in lines) and any("layer 2/2" in m and "ETA" in m for m in lines)
