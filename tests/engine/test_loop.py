"""quantize_model on tiny random Llama / Qwen2 / Qwen3 models (bpdq/engine/loop.py): every solver end to end,
rules and skips, sequential calibration on the quantized layers' outputs, determinism, errors, devices and
hooks."""

from __future__ import annotations

import copy
import gc
import json
import os

import pytest
import torch
from torch import nn

import bpdq
from bpdq.linear import QuantLinear
from bpdq.solvers.rtn import RTN
from tests.tiny_models import ARCHITECTURES, TINY_CALIBRATION, TINY_RECIPE, tiny_model, tiny_model_dir, tiny_tokenizer

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
    assert report.calibration == {"windows": 3, "seq_len": 24, "autocast": "none"}
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


def test_an_integer_weight_is_refused_naming_the_linear(tmp_path):
    from safetensors.torch import load_file, save_file

    src = tiny_model_dir(tmp_path / "src", "llama", layers=1, max_shard_size="10GB")
    shard = next(src.glob("*.safetensors"))
    tensors = load_file(str(shard))
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"].to(torch.int32)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(TypeError, match="cannot quantize model.layers.0.mlp.up_proj: weight must be floating point"):
        bpdq.quantize(src, {"quantize": TINY_RECIPE, "output": str(tmp_path / "out"), "resume": "auto", "progress": False})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"], "no output, no state, no lock left"


def test_quantizing_twice_is_refused():
    model, tok = tiny_model("llama", layers=1), tiny_tokenizer()
    bpdq.quantize_model(model, tok, recipe=TINY_RECIPE, calibration=TINY_CALIBRATION, progress=False)
    with pytest.raises(ValueError, match="already"):
        bpdq.quantize_model(model, tok, recipe=TINY_RECIPE, calibration=TINY_CALIBRATION, progress=False)


def test_progress_bar_and_log_lines(caplog):
    model, tok = tiny_model("llama", layers=2), tiny_tokenizer()
    with caplog.at_level("INFO", logger="bpdq.engine"):
        bpdq.quantize_model(model, tok, recipe=TINY_RECIPE, calibration=TINY_CALIBRATION, progress=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "bpdq.engine"]
    assert any("layer 1/2" in m for m in lines) and any("layer 2/2" in m and "ETA" in m for m in lines)


# ---- model directories (lazy source), streaming checkpoints, data-free runs, failures -------------------------

def checkpoint_files(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.suffix == ".safetensors" or p.name.endswith("index.json")}


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: s["type"])
def test_a_model_directory_gives_the_in_memory_checkpoint_bytes(arch, solver, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_model_dir(tmp_path / "src", arch, layers=3, max_shard_size="100KB")
    recipe = {**TINY_RECIPE, "solver": solver}
    model, tok = AutoModelForCausalLM.from_pretrained(src), tiny_tokenizer()
    bpdq.quantize_model(model, tok, recipe=recipe, calibration=TINY_CALIBRATION, progress=False,
                        output=tmp_path / "streamed", max_shard_size="20KB")
    bpdq.save(model, tok, tmp_path / "saved", max_shard_size="20KB")
    bpdq.quantize_model(src, tok, recipe=recipe, calibration=TINY_CALIBRATION, progress=False,
                        output=tmp_path / "lazy", max_shard_size="20KB")
    lazy = checkpoint_files(tmp_path / "lazy")
    assert len(lazy) == 5  # a shard per layer, one for the rest, the index
    assert lazy == checkpoint_files(tmp_path / "saved") == checkpoint_files(tmp_path / "streamed")
    loaded, _ = bpdq.load(tmp_path / "lazy")
    assert torch.equal(loaded(PROBE).logits, model(PROBE).logits)


def test_data_free_rtn_needs_no_text_and_runs_no_forward(tmp_path, monkeypatch):
    src = tiny_model_dir(tmp_path / "src", "llama", layers=2)
    reference = tiny_model("llama", layers=2)
    bpdq.quantize_model(reference, None, recipe=TINY_RECIPE, progress=False)  # in memory, no tokenizer either

    def no_forward(*args, **kwargs):
        raise AssertionError("a data-free run must not run any forward")

    for cls in {type(reference.model), type(reference.model.layers[0]), type(reference.model.embed_tokens)}:
        monkeypatch.setattr(cls, "forward", no_forward)
    report = bpdq.quantize_model(src, recipe=TINY_RECIPE, progress=False, output=tmp_path / "out")
    assert report.n_quantized == 14 and report.calibration == {}
    assert checkpoint_files(tmp_path / "out")["model.safetensors"] == checkpoint_files(
        bpdq.save(reference, tiny_tokenizer(), tmp_path / "ref"))["model.safetensors"]
    with pytest.raises(ValueError, match="calibration is required.*Hessian"):
        bpdq.quantize_model(src, recipe={**TINY_RECIPE, "solver": "gptq"}, progress=False, output=tmp_path / "gptq")
    assert not (tmp_path / "gptq").exists()


def rss_bytes():
    from bpdq.engine.source import return_freed_memory

    gc.collect()
    return_freed_memory()  # count what is held, not the allocator's free blocks
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("solver,calibration,hidden", [("rtn", None, 512), ("gptq", TINY_CALIBRATION, 256)])
def test_rss_growth_per_finished_layer_is_bounded(tmp_path, solver, calibration, hidden):
    """A released layer holds nothing: memory does not grow with the number of finished layers (a layer that
    stayed would add its own size each time)."""
    sizes = {"hidden_size": hidden, "intermediate_size": 2 * hidden}
    src = tiny_model_dir(tmp_path / "src", "llama", layers=10, max_shard_size="5MB", **sizes)
    layer_bytes = sum(p.numel() * 4 for p in tiny_model("llama", layers=1, **sizes).model.layers[0].parameters())
    seen: list[int] = []

    class Measure(bpdq.Stage):
        name = "measure"

        def after_write(self, step):
            seen.append(rss_bytes())

    config = bpdq.QuantizeConfig(quantize={**TINY_RECIPE, "solver": solver}, calibration=calibration or {},
                                 output=str(tmp_path / "out"), max_shard_size="100KB", device="cpu", progress=False)
    bpdq.quantize(src, config, tokenizer=tiny_tokenizer(), stages=[Measure()])
    growth = (sum(seen[-3:]) - sum(seen[1:4])) / 3 / (len(seen) - 4)
    assert growth < 0.25 * layer_bytes, f"RSS grows {growth / 1e6:.2f} MB per finished layer: {seen}"
    assert str(src) not in open("/proc/self/maps").read()


@pytest.mark.parametrize("case", ["pickle", "missing-shard", "wrong-shape", "unwritable"])
def test_bad_input_is_named_and_leaves_nothing(case, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    src = tiny_model_dir(tmp_path / "src", "llama", layers=2, max_shard_size="100KB")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    out = tmp_path / "out"
    if case == "pickle":
        for shard in src.glob("*.safetensors"):
            torch.save(load_file(str(shard)), src / f"{shard.stem}.bin")
            shard.unlink()
        (src / "model.safetensors.index.json").unlink()
        monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickle file was opened"))
        match = "bpdq reads safetensors only"
    elif case == "missing-shard":
        gone = index["weight_map"]["model.layers.1.mlp.down_proj.weight"]
        (src / gone).unlink()
        match = f"names shard '{gone}', which is missing"
    elif case == "wrong-shape":
        shard = src / index["weight_map"]["model.layers.1.self_attn.o_proj.weight"]
        tensors = load_file(str(shard))
        tensors["model.layers.1.self_attn.o_proj.weight"] = torch.zeros(64, 32)
        save_file(tensors, str(shard))
        match = "'model.layers.1.self_attn.o_proj.weight'.* has shape \\(64, 32\\)"
    else:
        (tmp_path / "ro").write_text("a file, so nothing can be created below it")
        out = tmp_path / "ro" / "out"
        match = f"output directory '{out}' cannot be written"
    monkeypatch.setattr("bpdq.engine.loop._run", lambda *a, **k: pytest.fail("work started before the check"))
    with pytest.raises(ValueError, match=match):
        bpdq.quantize_model(src, recipe={**TINY_RECIPE, "solver": "gptq"}, calibration=TINY_CALIBRATION,
                            progress=False, output=out)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_failure_mid_run_leaves_no_output(tmp_path, register):
    calls = []

    class FailsLate(RTN):
        requires_hessian = True

        def _solve(self, W, H, grid, group_size):
            calls.append(1)
            if len(calls) == 9:
                raise RuntimeError("solver crashed")
            return super()._solve(W, H, grid, group_size)

    register(bpdq.SOLVERS, "fails-late", FailsLate)
    src = tiny_model_dir(tmp_path / "src", "qwen2", layers=2)
    with pytest.raises(RuntimeError, match="solver crashed"):
        bpdq.quantize_model(src, recipe={**TINY_RECIPE, "solver": "fails-late"}, calibration=TINY_CALIBRATION,
                            progress=False, output=tmp_path / "out", max_shard_size=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_offloaded_activations_give_the_same_checkpoint(tmp_path, caplog):
    src = tiny_model_dir(tmp_path / "src", "qwen3", layers=2)
    recipe = {**TINY_RECIPE, "solver": "gptq"}
    bpdq.quantize_model(src, recipe=recipe, calibration=TINY_CALIBRATION, progress=False, output=tmp_path / "a")
    with caplog.at_level("INFO", logger="bpdq.engine.loop"):
        bpdq.quantize_model(src, recipe=recipe, calibration={**TINY_CALIBRATION, "offload": "9KB"}, progress=False,
                            output=tmp_path / "b")
    assert any("1 of 1 batches offloaded" in r.getMessage() for r in caplog.records)
    assert checkpoint_files(tmp_path / "a") == checkpoint_files(tmp_path / "b")


def test_stages_see_each_layer_and_a_post_solve_stage_changes_the_next_inputs(tmp_path):
    def run_with(stages):
        model = tiny_model("llama", layers=2)
        config = bpdq.QuantizeConfig(quantize={**TINY_RECIPE, "solver": "gptq"}, calibration=TINY_CALIBRATION,
                                     device="cpu", progress=False)
        report = bpdq.quantize(model, config, tokenizer=tiny_tokenizer(), stages=stages)
        return model, report

    events = []

    class Halve(bpdq.Stage):
        name = "halve"

        def after_solve(self, step):
            events.append(("solve", step.prefix, all(isinstance(m, QuantLinear) for g in step.plan for m in
                                                     (step.layer.get_submodule(r) for r in g)), step.outputs is None))
            if step.index == 0:
                step.layer.self_attn.o_proj.coeffs.mul_(0.5)

        def after_write(self, step):
            events.append(("write", step.prefix, len(step.records), step.outputs is not None))

        def finish(self, report):
            report.extra[self.name] = len(events)

    changed, report = run_with([Halve()])
    assert events == [("solve", "model.layers.0", True, True), ("write", "model.layers.0", 7, True),
                      ("solve", "model.layers.1", True, True), ("write", "model.layers.1", 7, False)]
    assert report.stages == ["halve"] and report.extra == {"halve": 4}
    plain, _ = run_with([])
    assert not torch.equal(changed.model.layers[1].mlp.down_proj.coeffs, plain.model.layers[1].mlp.down_proj.coeffs), (
        "layer 1 is calibrated on the outputs of the changed layer 0")


def test_rules_that_quantize_nothing_are_refused_before_calibration(monkeypatch):
    import bpdq.engine.loop as run

    def unreachable(*args, **kwargs):
        raise AssertionError("calibration ran")

    monkeypatch.setattr(run, "capture_layer_inputs", unreachable)
    model, tok = tiny_model("llama", layers=1), tiny_tokenizer()
    rules = [{"match": r".*self_attn.*", "skip": True}, {"match": r".*mlp.*", "skip": True}]
    with pytest.raises(ValueError, match="the rules skip all 7 decoder linears and no rule asks for 'lm_head': nothing would be quantized"):
        bpdq.quantize_model(model, tok, recipe=TINY_RECIPE, calibration=TINY_CALIBRATION, rules=rules, progress=False)
    with pytest.raises(ValueError, match="holds no QuantLinear module: nothing was quantized"):
        bpdq.save(model, tok, "unused-directory")


def test_freed_memory_is_returned_after_every_sequential_group(monkeypatch):
    import bpdq.engine.loop
    from bpdq.models.base import get_adapter

    calls = []
    monkeypatch.setattr(bpdq.engine.loop, "return_freed_memory", lambda: calls.append(1))
    model = tiny_model("llama")
    groups = len(get_adapter(model).linear_groups(model.model.layers[0]))
    bpdq.quantize_model(model, tiny_tokenizer(), recipe=TINY_RECIPE, calibration=TINY_CALIBRATION, progress=False)
    assert groups > 1 and len(calls) == groups * len(model.model.layers)


@pytest.mark.parametrize("tied", [False, True])
def test_a_lazy_run_drops_embeddings_and_head_between_capture_and_the_end(tmp_path, monkeypatch, tied):
    from transformers import AutoModelForCausalLM

    from bpdq.engine.source import LazySource

    src = tiny_model_dir(tmp_path / "src", "llama", layers=2, tie_word_embeddings=tied)
    rules = [{"match": "lm_head", "grid": {"type": "bitplane", "planes": 4}}]
    outside_at_layer_load = []
    load = LazySource.load

    def spy(self, name):
        if name.startswith("model.layers."):
            outside_at_layer_load.append((self.model.model.embed_tokens.weight.is_meta, self.model.lm_head.weight.is_meta))
        return load(self, name)

    monkeypatch.setattr(LazySource, "load", spy)
    tok = tiny_tokenizer()
    bpdq.quantize_model(src, tok, recipe=TINY_RECIPE, calibration=TINY_CALIBRATION, rules=rules, progress=False,
                        output=tmp_path / "lazy")
    assert outside_at_layer_load == [(True, True)] * 2
    model = AutoModelForCausalLM.from_pretrained(src)
    bpdq.quantize_model(model, tok, recipe=TINY_RECIPE, calibration=TINY_CALIBRATION, rules=rules, progress=False)
    bpdq.save(model, tok, tmp_path / "saved")
    assert checkpoint_files(tmp_path / "lazy") == checkpoint_files(tmp_path / "saved")  # head quantized the same
