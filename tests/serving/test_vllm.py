"""bpdq checkpoints served by vLLM (CPU build) through the plugin in bpdq/serving/vllm.py.

Runs only in the vLLM virtual environment (``scripts/test_vllm.sh`` selects ``-m vllm``; the main suite deselects
the marker, and without vLLM the module is skipped). Engine starts dominate the time, so each engine is shared
by the tests of one checkpoint: the SmolLM2 k=2 checkpoint in ``vllm.LLM`` (perplexity, greedy continuations,
the docs example), a tiny heads-divisible Llama with ``tensor_parallel_size=2`` and, in ``vllm serve``, the mixed
2/3-bit SmolLM2 checkpoint.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm", reason="vLLM is not installed here; scripts/test_vllm.sh runs these in .venv-vllm")

import bpdq  # noqa: E402
from bpdq.calibration import load_text  # noqa: E402
from bpdq.evaluate import eval_windows, perplexity  # noqa: E402
from tests.serving import checkpoints  # noqa: E402

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]
TEXT = "builtin:python-docs-test"
SEQ_LEN, WINDOWS = 256, 4
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "The Python list method append"]
NEW_TOKENS = 16
#: Engine settings shared by the tests: fp32 like the transformers reference, a small context and a fixed KV cache
#: (vLLM's CPU backend otherwise reserves a fraction of the machine's memory and refuses to start when it is busy).
KV_CACHE_BYTES = 256 * 2**20
ENGINE = {"dtype": "float32", "max_model_len": 512, "enforce_eager": True, "seed": 0, "kv_cache_memory_bytes": KV_CACHE_BYTES}


def _shutdown(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def vllm_perplexity(llm, windows: torch.Tensor) -> float:
    """Perplexity of ``windows`` from vLLM's prompt log-probabilities (the protocol of bpdq.evaluate)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=w.tolist()) for w in windows]
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0), use_tqdm=False)
    nll, count = 0.0, 0
    for out in outs:
        for token, logprobs in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
            nll -= logprobs[token].logprob
            count += 1
    assert count == windows.shape[0] * (windows.shape[1] - 1)
    return math.exp(nll / count)


def _relative(a: float, b: float) -> float:
    return abs(a - b) / b


@pytest.fixture(scope="module")
def smollm2_k2(tmp_path_factory):
    return checkpoints.smollm2(tmp_path_factory.mktemp("ckpt") / "smollm2-k2")


@pytest.fixture(scope="module")
def tokenizer(smollm2_k2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_k2)


@pytest.fixture(scope="module")
def reference(smollm2_k2):
    """transformers + bpdq on the checkpoint (what ``bpdq eval`` runs): perplexity and greedy continuations."""
    model, tok = bpdq.load(smollm2_k2)
    text = load_text(TEXT)
    ppl = perplexity(model, tok, text, seq_len=SEQ_LEN, max_windows=WINDOWS)
    _cache_dequantized_weights(model)  # generation below: one dequantization instead of one per token
    continuations = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
        continuations.append((ids[0].tolist(), out[0, ids.shape[1]:].tolist()))
    windows = eval_windows(tok, text, SEQ_LEN, WINDOWS)
    del model
    return {"ppl": ppl, "continuations": continuations, "windows": windows}


def _cache_dequantized_weights(model: torch.nn.Module) -> None:
    """Replace each QuantLinear by an nn.Linear holding its dequantized weight: the same arithmetic as the
    plain-PyTorch kernel (``F.linear(x, dequantize_packed(...))``, fp32 here), without redoing it per token."""
    from bpdq.linear import QuantLinear
    from bpdq.quantized import dequantize_packed

    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):
            dense = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            dense.weight.data = dequantize_packed(m.planes, m.coeffs, m.group_size)
            if m.bias is not None:
                dense.bias.data = m.bias.data
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, dense)


@pytest.fixture(scope="module")
def llm(smollm2_k2):
    """The docs' example (docs/serving.md) builds the engine: it runs here with the test checkpoint."""
    namespace = {"checkpoint": str(smollm2_k2), "ENGINE": ENGINE}
    exec(compile(docs_example(), "docs/serving.md[python]", "exec"), namespace)  # noqa: S102
    engine = namespace["llm"]
    try:
        # a 2-bit RTN model may well continue with blank lines: check tokens, not visible text
        assert len(namespace["outputs"][0].outputs[0].token_ids) > 0, "the docs example generated nothing"
        yield engine
    finally:
        _shutdown(engine)


def docs_example() -> str:
    """The first python block of docs/serving.md, with the test's engine settings added to ``LLM(...)``."""
    doc = (REPO / "docs" / "serving.md").read_text(encoding="utf-8")
    block = re.search(r"```python\n(.*?)```", doc, re.DOTALL).group(1)
    assert "LLM(model=checkpoint)" in block, "docs/serving.md's example must build LLM(model=checkpoint)"
    return block.replace("LLM(model=checkpoint)", "LLM(model=checkpoint, **ENGINE)")


def test_docs_example_runs(llm):
    # the docs example built the engine (fixture); vLLM chose the plugin from config.json's quant_method
    assert llm.llm_engine.model_config.quantization == "bpdq"


def test_perplexity_matches_bpdq_eval(llm, reference):
    ppl = vllm_perplexity(llm, reference["windows"])
    log.info("SmolLM2 k=2 perplexity: vLLM %.4f, bpdq eval %.4f", ppl, reference["ppl"])
    assert _relative(ppl, reference["ppl"]) < 0.01


def test_greedy_continuations_match_transformers(llm, reference):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, temperature=0.0)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids, _ in reference["continuations"]]
    outs = llm.generate(prompts, params, use_tqdm=False)
    agree = []
    for out, (_, expected) in zip(outs, reference["continuations"]):
        got = list(out.outputs[0].token_ids)
        agree.append(next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected))))
    log.info("greedy agreement with transformers+bpdq (leading tokens of %d): %s", NEW_TOKENS, agree)
    assert min(agree) >= 4, f"leading tokens equal to transformers+bpdq per prompt: {agree}"


# ---- the plugin's pieces, without an engine -------------------------------------------------------------------


def _table(planes: dict[str, int], group_size: int = 64) -> dict:
    modules = {n: {"planes": k, "group_size": group_size, "bias": False} for n, k in planes.items()}
    return {"quant_method": "bpdq", "format_version": 1, "modules": modules}


def test_entry_point_registers_and_config_reads_the_table_and_only_bpdq():
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config
    from vllm.plugins import load_general_plugins

    from bpdq.serving.vllm import BpdqVllmConfig

    load_general_plugins()  # what every vLLM process does: runs bpdq's entry point

    config = get_quantization_config("bpdq").from_config(_table({"model.layers.0.mlp.down_proj": 2}))
    assert isinstance(config, BpdqVllmConfig) and config.get_name() == "bpdq"
    assert config.modules["model.layers.0.mlp.down_proj"]["planes"] == 2
    with pytest.raises(ValueError, match="not a bpdq checkpoint: quantization_config.quant_method is 'gptq'"):
        BpdqVllmConfig.from_config({"quant_method": "gptq", "bits": 4, "group_size": 128})
    # vLLM picks the method named by quant_method; bpdq claims no other checkpoint format
    gptq = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}
    assert BpdqVllmConfig.override_quantization_method(gptq, None) is None
    assert [m for m in QUANTIZATION_METHODS if m != "bpdq" and get_quantization_config(m) is BpdqVllmConfig] == []


def test_fused_layers_take_all_parts_or_none():
    from bpdq.serving.vllm import BpdqVllmConfig

    attn = "model.layers.0.self_attn"
    config = BpdqVllmConfig.from_config(_table({f"{attn}.q_proj": 2, f"{attn}.k_proj": 2, f"{attn}.v_proj": 3}))
    config.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    assert [n for n, _ in config._parts(f"{attn}.qkv_proj")] == [f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"]
    assert config._parts(f"{attn}.o_proj") == []
    del config.modules[f"{attn}.k_proj"]
    with pytest.raises(ValueError, match=r"quantizes only some of them \(not \['model.layers.0.self_attn.k_proj'\]\)"):
        config._parts(f"{attn}.qkv_proj")


def _method(planes: dict[str, int], group_size: int = 64):
    from bpdq.serving.vllm import BpdqLinearMethod

    table = _table(planes, group_size)["modules"]
    return BpdqLinearMethod("layer", list(table.items()))


def test_group_cut_by_tensor_parallel_split_is_refused():
    method = _method({"model.layers.0.mlp.down_proj": 2}, group_size=128)
    method.prefix = "model.layers.0.mlp.down_proj"
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.down_proj': tensor parallelism over 2 ranks splits its "
                       r"384 input columns into 192 per rank, which cuts its groups of 128 columns"):
        method.create_weights(torch.nn.Module(), 192, [256], 384, 256, torch.float32, weight_loader=None)


def test_fused_parts_with_fewer_planes_load_padded_and_compute_exactly():
    from bpdq.linear import QuantLinear
    from bpdq.quantized import dequantize_packed

    torch.manual_seed(0)
    parts = [QuantLinear.from_linear(torch.nn.Linear(128, n, bias=False), grid={"type": "bitplane", "planes": k},
                                     solver="rtn", group_size=64) for n, k in ((32, 2), (16, 3))]
    method = _method({"a": 2, "b": 3})
    layer = torch.nn.Module()

    def fused_loader(param, loaded, shard):  # what vLLM's merged layer does with output_dim
        offset = 0 if shard == 0 else 32
        param.data.narrow(param.output_dim, offset, loaded.shape[param.output_dim]).copy_(loaded)

    method.create_weights(layer, 128, [32, 16], 128, 48, torch.float32, weight_loader=fused_loader)
    assert layer.planes.shape == (3, 48, 16) and layer.coeffs.shape == (2, 4, 48)
    for shard, part in enumerate(parts):
        layer.planes.weight_loader(layer.planes, part.planes, shard)
        layer.coeffs.weight_loader(layer.coeffs, part.coeffs, shard)
    method.process_weights_after_loading(layer)
    expected = torch.cat([dequantize_packed(p.planes, p.coeffs, 64) for p in parts])
    assert torch.equal(dequantize_packed(layer.planes, layer.coeffs, 64), expected)
    x = torch.randn(5, 128)
    bias = torch.randn(48)
    assert torch.equal(method.apply(layer, x, bias), torch.cat([p(x) for p in parts], 1) + bias)
    with pytest.raises(ValueError, match="checkpoint planes tensor is torch.uint8\\[4, 32, 16\\], expected"):
        layer.planes.weight_loader(layer.planes, torch.zeros(4, 32, 16, dtype=torch.uint8), 0)


# ---- tensor parallelism -------------------------------------------------------------------------------------


def _tp_env() -> dict[str, str]:
    return {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}


@pytest.fixture()
def tp_env(monkeypatch):
    for k, v in _tp_env().items():
        monkeypatch.setenv(k, v)


def test_tensor_parallel_perplexity(tmp_path, tp_env, tokenizer):
    from vllm import LLM

    ckpt = checkpoints.tiny_llama(tmp_path / "tiny", tokenizer)
    model, tok = bpdq.load(ckpt)
    text = load_text(TEXT)
    ref = perplexity(model, tok, text, seq_len=SEQ_LEN, max_windows=WINDOWS)
    windows = eval_windows(tok, text, SEQ_LEN, WINDOWS)
    llm = LLM(model=str(ckpt), tensor_parallel_size=2, **ENGINE)
    try:
        ppl = vllm_perplexity(llm, windows)
    finally:
        _shutdown(llm)
    log.info("tiny Llama perplexity: vLLM tensor_parallel_size=2 %.4f, bpdq eval %.4f (vocab %d)", ppl, ref, len(tok))
    # uniform predictions would give perplexity = vocabulary size; the wide random initialisation gives peaked
    # (wrong) predictions, far from it, so a wrongly sharded weight would change the perplexity
    assert abs(math.log(ref / len(tok))) > 1, f"perplexity {ref:.1f} too close to uniform ({len(tok)})"
    assert _relative(ppl, ref) < 0.01


def test_tensor_parallel_split_cutting_a_group_is_refused(tmp_path, tp_env, capfd, tokenizer):
    from vllm import LLM

    # down_proj has 384 inputs = 3 groups of 128: two ranks would get 192 inputs each, cutting a group
    ckpt = checkpoints.tiny_llama(tmp_path / "cut", tokenizer, intermediate=384, group_size=128)
    capfd.readouterr()
    with pytest.raises(Exception):  # noqa: B017  (vLLM reports a worker's failure as its own RuntimeError)
        LLM(model=str(ckpt), tensor_parallel_size=2, **ENGINE)
    out, err = capfd.readouterr()  # the workers' tracebacks: they share this process's stdout/stderr
    expected = ("bpdq layer 'model.layers.0.mlp.down_proj': tensor parallelism over 2 ranks splits its 384 input "
                "columns into 192 per rank, which cuts its groups of 128 columns")
    assert expected in out + err, (out + err)[-3000:]


# ---- vllm serve ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_serve_mixed_checkpoint(tmp_path):
    """``vllm serve`` on 127.0.0.1 with the mixed 2/3-bit checkpoint: one completion request, the prompt's
    perplexity through the API within 1% of bpdq eval, then shut down; bounded in time."""
    ckpt = checkpoints.smollm2(tmp_path / "smollm2-mixed", mixed=True)
    model, tok = bpdq.load(ckpt)
    text = load_text(TEXT)
    windows = eval_windows(tok, text, SEQ_LEN, 2)
    ref = perplexity(model, tok, text, seq_len=SEQ_LEN, max_windows=2)
    del model
    port = _free_port()
    # `vllm serve` is this module's CLI; vllm-cpu 0.32.0's `vllm` script cannot start (it asks for the version of
    # a distribution named "vllm", and the CPU build is named "vllm-cpu"), so run the module it serves with
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(ckpt), "--host", "127.0.0.1",
           "--port", str(port),
           "--dtype", "float32", "--max-model-len", "512", "--enforce-eager", "--served-model-name", "bpdq-test",
           "--kv-cache-memory-bytes", str(KV_CACHE_BYTES)]
    logfile = tmp_path / "serve.log"
    with open(logfile, "wb") as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while True:
            assert server.poll() is None, f"vllm serve exited: {logfile.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"vllm serve not ready in time: {logfile.read_text()[-3000:]}"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                time.sleep(2)
        request = {"model": "bpdq-test", "prompt": [w.tolist() for w in windows], "max_tokens": 1, "echo": True,
                   "logprobs": 0, "temperature": 0.0}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(request).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            body = json.load(resp)
        nll, count = 0.0, 0
        for choice in body["choices"]:
            lps = choice["logprobs"]["token_logprobs"][1:SEQ_LEN]  # prompt tokens 2..SEQ_LEN (then the new one)
            nll -= sum(lps)
            count += len(lps)
        assert count == 2 * (SEQ_LEN - 1)
        ppl = math.exp(nll / count)
        log.info("mixed 2/3-bit SmolLM2 via vllm serve: perplexity %.4f, bpdq eval %.4f", ppl, ref)
        assert _relative(ppl, ref) < 0.01
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, 9)
                server.wait(timeout=30)
