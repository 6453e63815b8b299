"""bpdq/kernels/cpu_lut.py: the native CPU kernel against the fp64 reference, on every path this CPU has.

The library must be built (``pip install -e .`` or ``python setup.py build_ext --inplace``); without it these
tests fail with the reason. Paths the CPU lacks are checked to be refused, not skipped. The paths with exact
fp32 tables are held to the torch kernel's roundoff; the integer-table paths (``cpu_lut.INT_TABLE_ISAS``,
decode sizes) to that plus, per output, the analytic bound of their table rounding (``cpu_lut.lut_error_bound``).
"""

from __future__ import annotations

import time
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bpdq.kernels import KernelUnavailableError, cpu_lut, select_kernel
from bpdq.kernels.layout import column_major_planes, is_column_major
from bpdq.linear import QuantLinear
from tests.kernels.reference import assert_matches_reference, random_format_layer, random_layer, reference
from tests.strategies import codes_and_coeffs, seeds

ISAS = ("portable", "avx2", "avx512")
DTYPES = [torch.float32, torch.bfloat16]
DTYPE_IDS = ["fp32", "bf16"]
#: Every group size is a multiple of 8; these cover one byte per group, odd byte counts and the usual sizes.
GROUP_SIZES = (8, 24, 32, 64, 128, 192, 256)
#: M = 1..8 take the lookup tables, 13 the tiled dequantize + matmul path.
TOKENS = (1, 2, 3, 4, 5, 6, 7, 8, 13)
MAX_LUT_TOKENS = cpu_lut.MAX_TOKENS


def best() -> str:
    return cpu_lut.native().best


def check(layer: QuantLinear, x: torch.Tensor, isa: str) -> None:
    """The kernel on the forced path ``isa`` against the reference, with the integer tables' bound where they run."""
    extra = None
    if isa in cpu_lut.INT_TABLE_ISAS and 0 < x.shape[0] <= MAX_LUT_TOKENS:
        extra = cpu_lut.lut_error_bound(x, layer.coeffs, layer.group_size)
    assert_matches_reference(layer, x, "cpu_lut", extra)


def use_env(mp, name: str, value: str) -> None:
    """Set a variable the kernel reads when the library is loaded, and make it load again."""
    mp.setenv(name, value)
    cpu_lut.native.cache_clear()


@pytest.fixture(autouse=True)
def _library():
    cpu_lut.native.cache_clear()
    lib = cpu_lut.native().lib
    assert lib is not None, f"the native library is needed for these tests: {cpu_lut.native().reason}"
    yield
    cpu_lut.native.cache_clear()  # after monkeypatch restored the environment


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    """Force one path; a path this CPU lacks must be refused with the reason."""
    use_env(monkeypatch, cpu_lut.ISA_ENV, request.param)
    if ISAS.index(request.param) > ISAS.index(best()):
        layer = random_layer(2, 32, 8, 64, bias=False, seed=0)
        layer.set_kernel("cpu_lut")
        with pytest.raises(KernelUnavailableError, match=f"{cpu_lut.ISA_ENV}={request.param} but this CPU"):
            layer(torch.randn(1, 64))
        return None
    return request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_matches_reference(isa, k, group_size, dtype):
    if isa is None:
        return  # refused, checked by the fixture
    in_features = 2 * group_size if group_size >= 64 else 6 * group_size
    # 75 rows: two 32-row blocks on the vector paths plus 11 tail rows
    layer = random_layer(k, group_size, 75, in_features, bias=k % 2 == 1, seed=10 * k + group_size)
    gen = torch.Generator().manual_seed(k)
    for m in TOKENS:
        check(layer, torch.randn(m, in_features, generator=gen).to(dtype), isa)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_every_group_size_of_a_small_shape(isa, dtype):
    # 192 inputs allow g = 8, 16, 24, 32, 48, 64, 96, 192; 37 rows: one 32-row vector step and 5 scalar rows
    if isa is None:
        return
    sizes = [g for g in range(8, 193, 8) if 192 % g == 0]
    assert sizes == [8, 16, 24, 32, 48, 64, 96, 192]
    gen = torch.Generator().manual_seed(7)
    for k in (1, 2, 3, 4):
        for g in sizes:
            layer = random_layer(k, g, 37, 192, bias=g % 16 == 0, seed=100 * k + g)
            for m in range(1, MAX_LUT_TOKENS + 1):
                check(layer, torch.randn(m, 192, generator=gen).to(dtype), isa)


@pytest.mark.parametrize("out_features", [1, 7, 31, 32, 33, 97, 200])
def test_odd_output_sizes(isa, out_features):
    if isa is None:
        return
    layer = random_layer(2, 64, out_features, 128, bias=True, seed=out_features)
    gen = torch.Generator().manual_seed(out_features)
    for m in (1, 8, 9):
        check(layer, torch.randn(m, 128, generator=gen), isa)


@pytest.mark.parametrize("out_features", [8, 56, 64, 72, 120, 160, 200, 2100])
def test_row_blocks_chunks_and_tails(isa, out_features):
    # The vector paths take rows in steps of 32 (the last < 32 rows are scalar) inside chunks of 8192 / M rows
    # rounded down to 32; AVX2 in register blocks of up to 64 rows, AVX-512 of up to 128 (64-row steps, a last
    # 32 rows through the AVX2 block). Scalar rows only, one step, blocks at and past 64 rows, 128 + 32 and
    # 128 + 64 rows (+ 8 scalar), and 2100 rows, which cross a chunk for M >= 4 (2048 rows at M = 4, 1024 at
    # M = 8) and end on 52 rows (32 + 20 scalar)
    if isa is None:
        return
    layer = random_layer(3, 32, out_features, 96, bias=True, seed=out_features)
    gen = torch.Generator().manual_seed(out_features)
    for m in range(1, MAX_LUT_TOKENS + 1):
        check(layer, torch.randn(m, 96, generator=gen), isa)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_strided_inputs_zero_rows_and_batches(isa, dtype):
    if isa is None:
        return
    layer = random_layer(3, 32, 40, 128, bias=True, seed=3)
    layer.set_kernel("cpu_lut")
    for m in (5, 12):
        x = torch.randn(128, m).T.to(dtype)  # column-major: each row's features are strided
        assert not x.is_contiguous()
        check(layer, x, isa)
        x = torch.randn(m, 256)[:, ::2].to(dtype)  # rows 256 apart, features stride 2
        check(layer, x, isa)
        x = torch.randn(m, 300)[:, 100:228].to(dtype)  # contiguous features, row stride 300
        check(layer, x, isa)
    layer.set_kernel("cpu_lut")
    assert layer(torch.randn(0, 128, dtype=dtype)).shape == (0, 40)
    batch = torch.randn(2, 3, 128, dtype=dtype)
    torch.testing.assert_close(layer(batch), layer(batch.reshape(6, 128)).reshape(2, 3, 40), rtol=0, atol=0)
    zeros = torch.zeros(3, 128, dtype=dtype)  # zero activations: the bias alone
    torch.testing.assert_close(layer(zeros), layer.bias.to(dtype).expand(3, 40), rtol=0, atol=0)
    x = torch.randn(4, 128).to(dtype)
    x[:, 32:64] = 0  # a zero group (integer tables: scale 0) and zero tokens among non-zero ones
    x[1] = 0
    check(layer, x, isa)
    with torch.no_grad():
        layer.coeffs[:, :, 5:9] = 0  # zero rows of W_hat: the bias alone, exactly
    torch.testing.assert_close(layer(x)[:, 5:9], layer.bias[5:9].to(dtype).expand(4, 4), rtol=0, atol=0)


@pytest.mark.parametrize("group_size", [512, 520, 1024])
def test_groups_past_the_int16_span(isa, group_size):
    # Integer tables add their low bytes up in int16 over at most 64 byte columns (512 inputs, each column
    # adding up to 2 * 255); larger groups are split into spans. Worst case for overflow: every plane byte 0xff
    # and all-equal inputs, so every looked-up entry is the table's maximum.
    if isa is None:
        return
    layer = random_layer(2, group_size, 40, 2 * group_size, bias=False, seed=group_size)
    with torch.no_grad():
        layer.planes.fill_(255)
    for m in (1, 3, 8):
        check(layer, torch.ones(m, layer.in_features), isa)
        check(layer, torch.randn(m, layer.in_features), isa)


@settings(max_examples=40, deadline=None)
@given(case=codes_and_coeffs(group_size=st.sampled_from(GROUP_SIZES), max_out=40), tokens=st.integers(1, 12),
       bf16=st.booleans(), bias=st.booleans(), seed=seeds, isa=st.sampled_from(ISAS))  # fmt: skip
def test_random_formats(case, tokens, bf16, bias, seed, isa):
    if ISAS.index(isa) > ISAS.index(best()):
        isa = best()
    layer, x = random_format_layer(case, tokens, torch.bfloat16 if bf16 else torch.float32, bias, seed)
    with pytest.MonkeyPatch.context() as mp:  # hypothesis runs examples outside function-scoped fixtures
        use_env(mp, cpu_lut.ISA_ENV, isa)
        check(layer, x, isa)
    cpu_lut.native.cache_clear()


def test_paths_agree_and_threads_do_not_change_the_result(monkeypatch):
    # 2048 x 4096 at k=2 is large enough for the C code to split rows over two threads
    layer = random_layer(2, 64, 2048, 4096, bias=False, seed=1)
    layer.set_kernel("cpu_lut")
    x = torch.randn(2, 4096)
    results = {}
    threads = torch.get_num_threads()
    try:
        for isa in ISAS[: ISAS.index(best()) + 1]:
            use_env(monkeypatch, cpu_lut.ISA_ENV, isa)
            torch.set_num_threads(1)
            results[isa] = layer(x)
            torch.set_num_threads(2)
            assert torch.equal(layer(x), results[isa])  # each row is computed the same way by any thread
    finally:
        torch.set_num_threads(threads)
    ref = reference(layer, x)
    for isa, y in results.items():
        slack = cpu_lut.lut_error_bound(x, layer.coeffs, 64) if isa in cpu_lut.INT_TABLE_ISAS else 0.0
        assert ((y.double() - ref).abs() - slack).max() < 1e-4 * ref.abs().max(), isa
    integer = [results[isa] for isa in cpu_lut.INT_TABLE_ISAS if isa in results]
    for y in integer[1:]:  # the same tables, exact integer sums and the same fp32 fold at any vector width
        assert torch.equal(y, integer[0])


def _pool_layer_and_inputs():
    # 2048 x 4096 at k=2: large enough for the C code to split the rows (lookup tables, M <= 8) and the
    # dequantized tiles (M = 16) over threads
    layer = random_layer(2, 64, 2048, 4096, bias=True, seed=3)
    layer.set_kernel("cpu_lut")
    gen = torch.Generator().manual_seed(3)
    return layer, [torch.randn(m, 4096, generator=gen) for m in (1, 3, 16)]


def _same(y: torch.Tensor, want: torch.Tensor) -> bool:
    """Bit-identical for the lookup tables; the tiles' matmul is torch's, whose sums depend on its threads."""
    if y.shape[0] <= MAX_LUT_TOKENS:
        return torch.equal(y, want)
    return torch.allclose(y, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_the_worker_pool_gives_the_single_thread_result_for_any_thread_count_and_concurrent_callers():
    import threading

    layer, xs = _pool_layer_and_inputs()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = [layer(x) for x in xs]
        for n in (4, 2, 3, 2):  # more workers than ranges after the first job: idle workers must not run one
            torch.set_num_threads(n)
            for _ in range(3):
                assert all(_same(layer(x), w) for x, w in zip(xs, want)), n
        # callers on several Python threads (ctypes drops the GIL): one holds the pool, the others spawn threads
        torch.set_num_threads(2)
        errors: list[str] = []

        def caller(i: int) -> None:
            for r in range(20):
                j = (i + r) % len(xs)
                if not _same(layer(xs[j]), want[j]):
                    errors.append(f"caller {i} round {r}")

        ts = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in ts), "a concurrent caller hung"
        assert not errors, errors
    finally:
        torch.set_num_threads(threads)


_POOL_CHILD = """
import sys, torch
sys.path.insert(0, {root!r})
from tests.kernels.test_cpu_lut import _pool_layer_and_inputs, _same
layer, xs = _pool_layer_and_inputs()
torch.set_num_threads(1)
want = [layer(x) for x in xs]
torch.set_num_threads(2)
for _ in range(50):  # with BPDQ_CPU_SPIN_US=0 every job wakes a sleeping worker
    assert all(_same(layer(x), w) for x, w in zip(xs, want))
import os
pid = os.fork()  # the child has none of the parent's workers and must start its own
if pid == 0:  # lookup tables only: torch's own OpenMP threads hang in a forked child (torch's limit, not ours)
    import signal
    signal.alarm(60)  # a hung child must not outlive the test
    ok = all(_same(layer(x), w) for x, w in zip(xs[:2], want) for _ in range(5))
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
print("ok")
"""


def test_sleeping_workers_wake_for_every_job_and_a_forked_child_gets_its_own():
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    env = {**__import__("os").environ, "BPDQ_CPU_SPIN_US": "0"}
    out = subprocess.run([sys.executable, "-c", _POOL_CHILD.format(root=root)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_integer_tables_are_used_their_error_holds_its_bound_and_the_bound_is_small(monkeypatch):
    # A 4096-input k=2 g=64 layer with Gaussian inputs, on every path this CPU has. The exact paths stay at
    # fp32 roundoff; the integer-table paths' error must exceed it clearly (the integer tables really run) and
    # stay within the analytic bound, and the bound itself must be small against the outputs' scale
    # (|x| @ |W_hat|^T), or it would hide bugs.
    layer = random_layer(2, 64, 256, 4096, bias=False, seed=4)
    layer.set_kernel("cpu_lut")
    x = torch.randn(3, 4096, generator=torch.Generator().manual_seed(4))
    ref = reference(layer, x)
    scale = (x.double().abs() @ layer.quantized_weight().dequantize(torch.float64).abs().T).max()
    errors = {}
    for isa in ISAS[: ISAS.index(best()) + 1]:
        use_env(monkeypatch, cpu_lut.ISA_ENV, isa)
        errors[isa] = (layer(x).double() - ref).abs()
    exact = max(err.max() for isa, err in errors.items() if isa not in cpu_lut.INT_TABLE_ISAS)
    assert exact < 1e-6 * scale
    bound = cpu_lut.lut_error_bound(x, layer.coeffs, 64)
    assert bound.max() < 1e-4 * scale
    for isa in cpu_lut.INT_TABLE_ISAS:
        if isa in errors:
            assert errors[isa].max() > 4 * exact, isa
            assert (errors[isa] <= bound).all(), isa


def test_unknown_isa_value_is_refused(monkeypatch):
    use_env(monkeypatch, cpu_lut.ISA_ENV, "sse9")
    monkeypatch.setattr(cpu_lut, "_warned", False)
    layer = random_layer(2, 32, 8, 64, bias=False, seed=0)
    layer.set_kernel("cpu_lut")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a pinned kernel raises; it does not announce a fallback first
        with pytest.raises(KernelUnavailableError, match=r"BPDQ_CPU_ISA='sse9' is not one of \['auto', 'portable'"):
            layer(torch.randn(1, 64))


@pytest.mark.parametrize("value", ["fast", "-5", "100001", "1.5"])
def test_a_bad_spin_time_is_refused_with_the_allowed_range(monkeypatch, value):
    use_env(monkeypatch, cpu_lut.SPIN_ENV, value)
    monkeypatch.setattr(cpu_lut, "_warned", False)
    layer = random_layer(2, 32, 8, 64, bias=False, seed=0)
    layer.set_kernel("cpu_lut")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(KernelUnavailableError, match=f"{cpu_lut.SPIN_ENV}='{value}' is not an integer from 0 to 100000"):
            layer(torch.randn(1, 64))
    use_env(monkeypatch, cpu_lut.SPIN_ENV, " 0 ")
    assert cpu_lut.native().reason is None


def test_missing_library_falls_back_to_torch_with_one_warning(monkeypatch):
    use_env(monkeypatch, cpu_lut.DISABLE_ENV, "1")
    monkeypatch.setattr(cpu_lut, "_warned", False)
    layers = [random_layer(2, 32, 8, 64, bias=False, seed=s) for s in range(2)]
    x = torch.randn(1, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for layer in layers:
            assert select_kernel("auto", layer, x).name == "torch"
            torch.testing.assert_close(layer(x), reference(layer, x).float(), rtol=1e-5, atol=1e-5)
    assert [str(w.message) for w in caught] == [
        f"bpdq: the native CPU kernel 'cpu_lut' is unavailable ({cpu_lut.DISABLE_ENV} is set); CPU layers use "
        "the slower 'torch' kernel"
    ]
    layers[0].set_kernel("cpu_lut")
    with pytest.raises(KernelUnavailableError, match=f"kernel 'cpu_lut' cannot run this layer: {cpu_lut.DISABLE_ENV}"):
        layers[0](x)


def test_auto_picks_the_native_kernel_for_cpu_float_and_bfloat16_only():
    layer = random_layer(2, 32, 8, 64, bias=False, seed=0)
    for dtype in DTYPES:
        assert select_kernel("auto", layer, torch.randn(3, 64, dtype=dtype)).name == "cpu_lut"
    assert select_kernel("auto", layer, torch.randn(3, 64, dtype=torch.float16)).name == "torch"
    layer.set_kernel("cpu_lut")
    with pytest.raises(KernelUnavailableError, match=r"input dtype torch.float16 is not supported; allowed"):
        layer(torch.randn(1, 64, dtype=torch.float16))


def test_planes_are_relaid_out_once_in_place_and_saved_canonically():
    layer = random_layer(3, 32, 40, 128, bias=False, seed=0)
    canonical = layer.planes.clone()
    layer.set_kernel("cpu_lut")
    layer(torch.randn(1, 128))
    relaid = layer.planes
    assert is_column_major(relaid) and torch.equal(relaid, canonical)
    plan = layer._kernel_cache["cpu_lut"]  # the call arguments, holding the same buffers (no copies)
    assert plan.planes is relaid and plan.coeffs is layer.coeffs
    assert relaid.untyped_storage().nbytes() == canonical.nbytes  # one copy of the planes
    assert column_major_planes(layer) is relaid
    layer(torch.randn(2, 128))
    assert layer.planes is relaid
    state = layer.state_dict()
    assert torch.equal(state["planes"].contiguous(), canonical)
    fresh = QuantLinear(128, 40, planes=3, group_size=32)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.planes, canonical)
    layer.to("cpu")  # a move keeps the layout (strides are preserved) and the values
    assert is_column_major(layer.planes) and torch.equal(layer.planes, canonical)


def test_native_functions_check_their_inputs():
    layer = random_layer(2, 32, 8, 64, bias=False, seed=0)
    x = torch.randn(1, 64)
    with pytest.raises(ValueError, match="stored column-major"):
        cpu_lut.cpu_lut_linear(x, layer.planes, layer.coeffs, None, 32)
    planes = column_major_planes(layer)
    with pytest.raises(ValueError, match=r"x must be \[M, 64\]"):
        cpu_lut.cpu_lut_linear(torch.randn(1, 32), planes, layer.coeffs, None, 32)
    with pytest.raises(ValueError, match="group_size 12 must be a positive multiple of 8"):
        cpu_lut.cpu_lut_linear(x, planes, layer.coeffs, None, 12)
    with pytest.raises(TypeError, match="x dtype torch.float64 is not supported"):
        cpu_lut.cpu_lut_linear(x.double(), planes, layer.coeffs, None, 32)


def test_torch_compile_traces_without_graph_breaks():
    torch._dynamo.reset()
    model = nn.Sequential(random_layer(2, 32, 48, 64, bias=True, seed=0), nn.ReLU(), random_layer(3, 16, 8, 48, bias=False, seed=1))
    x, x11 = torch.randn(2, 64), torch.randn(11, 64)  # 11 tokens: the tiled path, through the same custom op
    # Eager calls first: they choose the kernel per input size and relay the planes out (module mutations
    # that stay out of the traced graph); the compiled graph then only looks the choice up.
    eager, eager11 = model(x), model(x11)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)  # a graph break raises
    torch.testing.assert_close(compiled(x), eager, rtol=0, atol=0)
    torch.testing.assert_close(compiled(x11), eager11, rtol=0, atol=0)


def test_greedy_generation_matches_the_torch_kernel():
    from tests.tiny_models import tiny_model

    model = tiny_model("llama", layers=2, seed=0)
    for name, module in list(model.model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                q = QuantLinear.from_linear(child, grid={"type": "bitplane", "planes": 2}, group_size=32, kernel="torch")
                setattr(module, child_name, q)
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(ids, **kwargs)
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.set_kernel("cpu_lut")
        got = model.generate(ids, **kwargs)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("m", [1, 12])
def test_gradient_flows_to_the_input(m):
    layer = random_layer(2, 32, 24, 64, bias=True, seed=0)
    layer.set_kernel("cpu_lut")
    x = torch.randn(m, 64, requires_grad=True)
    layer(x).square().sum().backward()
    expected = torch.randn(m, 64, requires_grad=True)
    with torch.no_grad():
        expected.copy_(x)
    layer.set_kernel("torch")
    layer(expected).square().sum().backward()
    torch.testing.assert_close(x.grad, expected.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_smollm2_k2_greedy_tokens_match_the_torch_kernel():
    from bpdq.models import load_pretrained

    model, tok = load_pretrained("smollm2-135m")
    for module in list(model.model.layers.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):  # RTN, 2 planes, g=64: fast to build; the kernels see the format only
                setattr(module, name, QuantLinear.from_linear(child, grid={"type": "uniform", "bits": 2}, group_size=64))
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    tokens = {}
    for kernel in ("torch", "cpu_lut"):
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.set_kernel(kernel)
        with torch.no_grad():
            tokens[kernel] = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(tokens["cpu_lut"], tokens["torch"])


def test_lut_error_bound_rejects_shapes_that_do_not_fit():
    coeffs = torch.zeros(2, 3, 8, dtype=torch.float16)  # 2 groups, k=2, 8 rows
    assert cpu_lut.lut_error_bound(torch.ones(1, 128), coeffs, 64).shape == (1, 8)
    with pytest.raises(ValueError, match="does not fit"):
        cpu_lut.lut_error_bound(torch.ones(1, 128), coeffs, 32)
    with pytest.raises(ValueError, match="must be"):
        cpu_lut.lut_error_bound(torch.ones(128), coeffs, 64)


def test_a_bias_whose_storage_is_replaced_is_read_from_its_new_storage():
    layer = random_layer(2, 64, 40, 128, bias=True, seed=1)
    layer.set_kernel("cpu_lut")
    x = torch.randn(1, 128)
    layer(x)  # the plan exists now
    layer.bias.data = torch.randn(40)  # same Parameter object, new storage (the old one is freed)
    assert_matches_reference(layer, x, "cpu_lut", cpu_lut.lut_error_bound(x, layer.coeffs, layer.group_size))


def test_the_table_scratch_is_freed_when_its_thread_exits_or_on_release():
    import threading

    layer = random_layer(2, 64, 40, 4096, bias=False, seed=2)
    layer.set_kernel("cpu_lut")
    x = torch.randn(8, 4096)
    cpu_lut.release_scratch()
    before = cpu_lut.scratch_bytes()
    seen: list[int] = []

    def call() -> None:
        layer(x)
        seen.append(cpu_lut.scratch_bytes())

    for _ in range(3):  # a server's thread per request must not leak a table scratch per thread
        t = threading.Thread(target=call)
        t.start()
        t.join()
        assert seen[-1] > before  # the tables of 8 x 4096 inputs were allocated in that thread
        # join() returns when the Python thread is done; the OS thread (whose exit runs the destructor) ends
        # a moment later: wait for it, up to a bound far beyond any thread exit
        deadline = time.monotonic() + 10
        while cpu_lut.scratch_bytes() != before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cpu_lut.scratch_bytes() == before
    layer(x)
    assert cpu_lut.scratch_bytes() > before
    cpu_lut.release_scratch()  # the documented call frees the calling thread's scratch
    assert cpu_lut.scratch_bytes() == before
    layer(x)  # and the next call allocates it again
    assert torch.equal(layer(x), layer(x))
