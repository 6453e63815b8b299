"""Add a kernel: a plain-PyTorch "plane-wise" GEMV that works on the bit-planes instead of a dense weight.

With ``W_hat = c_0 + sum_i c_i B_i`` per row and group (docs/format.md), ``y = x W_hat^T`` is, per group,
``sum_i c_i * (x_group . B_i) + c_0 * sum(x_group)``: one 0/1 matmul per plane, then a weighted sum by the
coefficients. The unpacked planes are prepared once per layer and cached (``Kernel.prepare``). Its
``[groups, tokens, out]`` intermediate must fit a fixed budget (``supports`` says why not otherwise), so
``auto`` falls back to the ``torch`` kernel for large calls. Importing this file registers it as
``planewise``; running it checks it against the reference kernel and uses it from Python and from a
config (``bpdq.QuantizeConfig.from_dict``). See docs/guides/add-a-kernel.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import bpdq
from bpdq.bits import unpack_bits
from bpdq.kernels import Kernel, select_kernel

#: Largest ``[groups, tokens, out]`` fp32 intermediate, in elements (4 MiB).
MAX_INTERMEDIATE = 2**20


@bpdq.KERNELS.register("planewise")
class PlanewiseKernel(Kernel):
    priority = 5  # above "torch" (0): `auto` prefers it whenever it supports the call

    def supports(self, layer, x):
        need = (layer.in_features // layer.group_size) * x.shape[0] * layer.out_features
        if need > MAX_INTERMEDIATE:
            return f"planewise needs a {need}-element intermediate, over its budget of {MAX_INTERMEDIATE}"
        return None

    def prepare(self, layer):
        # canonical uint8[k, out, in/8] -> float {0,1}[groups, k, g, out], computed once per layer
        k, out, _ = layer.planes.shape
        bits = unpack_bits(layer.planes).to(torch.float32)  # [k, out, in]
        return bits.view(k, out, -1, layer.group_size).permute(2, 0, 3, 1).contiguous()

    def forward(self, layer, x):
        planes = self.packed(layer)  # cached result of prepare()
        groups, k, g, out = planes.shape
        xg = x.to(torch.float32).view(x.shape[0], groups, g).transpose(0, 1)  # [groups, M, g]
        coeffs = layer.coeffs.to(torch.float32)  # [groups, k+1, out]: planes first, offset last
        y = xg.sum(-1, keepdim=True) * coeffs[:, k].unsqueeze(1)  # offsets: [groups, M, out]
        for i in range(k):
            y += (xg @ planes[:, i]) * coeffs[:, i].unsqueeze(1)
        y = y.sum(0)
        if layer.bias is not None:
            y += layer.bias.to(torch.float32)
        return y.to(x.dtype)


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _example_utils import ByteTokenizer, tiny_llama  # the tiny random Llama and tokenizer of every example

    # 1. From Python: the new kernel against the reference, explicitly and through `auto`.
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96)
    layer = bpdq.QuantLinear.from_linear(linear, grid={"type": "bitplane", "planes": 3}, group_size=64,
                                         kernel="planewise")
    x = torch.randn(4, 256)
    reference = bpdq.QuantLinear.from_quantized(layer.quantized_weight(), linear.bias, kernel="torch")
    err = (layer(x) - reference(x)).abs().max().item()
    print(f"planewise vs torch reference: max |diff| = {err:.2e}")
    if err > 1e-4:
        raise SystemExit(f"planewise disagrees with the reference kernel (max |diff| {err})")
    layer.set_kernel("auto")
    for tokens in (4, 8192):
        print(f"auto with {tokens:>4} tokens ->", select_kernel("auto", layer, torch.randn(tokens, 256)).name)
    layer.set_kernel("planewise")
    try:
        layer(torch.randn(8192, 256))
    except bpdq.KernelUnavailableError as exc:
        print("explicit choice that cannot run:", exc)

    # 2. From a config: every quantized linear of a tiny Llama runs on the new kernel.
    config = bpdq.QuantizeConfig.from_dict({
        "quantize": {"group_size": 32, "grid": {"type": "bitplane", "planes": 2}, "solver": "rtn",
                     "kernel": "planewise"},
        "calibration": {"samples": 4, "seq_len": 32}, "device": "cpu", "progress": False,
    })
    model = tiny_llama()
    bpdq.quantize(model, config, tokenizer=ByteTokenizer())
    quantized = [m for m in model.modules() if isinstance(m, bpdq.QuantLinear)]
    kernels = {m.kernel for m in quantized}
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        logits = model(ids).logits
        for m in quantized:
            m.set_kernel("torch")
        diff = (logits - model(ids).logits).abs().max().item()
    print(f"QuantLinear kernels: {kernels}; logits vs the torch kernel: max |diff| = {diff:.2e}")
    if kernels != {"planewise"} or diff > 1e-4:
        raise SystemExit(f"expected every QuantLinear on planewise, matching torch; got {kernels}, {diff}")


if __name__ == "__main__":
    main()
