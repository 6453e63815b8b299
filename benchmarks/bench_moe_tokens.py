"""How many routed tokens an expert needs before its own Hessian beats the layer's pooled one.

No real mixture-of-experts model ships offline, so the experts are *upcycled* from a real dense model: the
MLP of a few SmolLM2-135M layers (hidden 576, intermediate 1536) split into ``--experts`` experts of
``1536 / experts`` rows each, with a router whose rows are k-means centroids of the layer's MLP inputs (top-2
routing: tokens of one cluster go to the same experts, as trained routers do). The inputs are real: the
MLP inputs of the built-in model on ``builtin:python-docs`` (calibration) and ``builtin:python-docs-test``
(held out).

For every expert and every count ``n`` (a multiple of the hidden size), its ``gate_up`` weight is quantized
(BPDQ k=2, g=64, the solver defaults) with three Hessians: ``routed`` (``n`` of its routed calibration tokens),
``pooled`` (every calibration token of the layer) and ``mixed`` (the ``n`` routed tokens plus the pooled
Hessian scaled to ``--prior`` tokens). The score is the relative output error on the held-out tokens
routed to that expert, ``|X (W - Q)^T|^2 / |X W^T|^2``, averaged over experts, layers and ``--seeds``
subsamples. The table gives, per ``n / hidden``, each variant's error relative to ``pooled``.

    python benchmarks/bench_moe_tokens.py               # about 10 minutes on one core
    python benchmarks/bench_moe_tokens.py --smoke       # seconds: checks it runs
"""

from __future__ import annotations

import argparse
import json
import time

import torch

RECIPE = {"grid": {"type": "bitplane", "planes": 2}, "solver": "bpdq", "group_size": 64}


def mlp_inputs(model, tokenizer, text: str, samples: int, seq_len: int, layers: list[int]) -> dict[int, torch.Tensor]:
    """The MLP inputs (post-attention norm outputs) of ``layers`` on ``samples`` windows of ``text``."""
    from bpdq.calibration import calibration_windows

    windows = calibration_windows(tokenizer, {"text": text, "samples": samples, "seq_len": seq_len, "seed": 0})
    got: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    hooks = [model.model.layers[i].post_attention_layernorm.register_forward_hook(
        lambda _m, _a, out, i=i: got[i].append(out.detach().reshape(-1, out.shape[-1]))) for i in layers]
    with torch.no_grad():
        for w in windows:
            model(w[None])
    for h in hooks:
        h.remove()
    return {i: torch.cat(v) for i, v in got.items()}


def kmeans(x: torch.Tensor, k: int, iters: int = 20) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(x, dim=-1)
    centres = x[torch.randperm(x.shape[0], generator=gen)[:k]].clone()
    for _ in range(iters):
        assign = (x @ centres.T).argmax(-1)
        for c in range(k):
            members = x[assign == c]
            if len(members):
                centres[c] = torch.nn.functional.normalize(members.mean(0), dim=0)
    return centres


def route(x: torch.Tensor, router: torch.Tensor, active: int) -> torch.Tensor:
    return (torch.nn.functional.normalize(x, dim=-1) @ router.T).topk(active, dim=-1).indices


def hessian(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return (2.0 * x.T @ x / max(1, x.shape[0])).float()


def relative_error(w: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ (w - q).T) ** 2).sum() / (x @ w.T).pow(2).sum())


def main() -> None:
    from bpdq.models.hub import load_pretrained
    from bpdq.solvers.build import quantize_weight

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", default="4,14,24")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--active", type=int, default=2)
    p.add_argument("--samples", type=int, default=64, help="calibration windows of 512 tokens")
    p.add_argument("--counts", default="0.0625,0.125,0.25,0.5,1,2", help="n as multiples of the hidden size")
    p.add_argument("--prior", type=float, default=0.25, help="the pooled Hessian's weight in 'mixed', x hidden tokens")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--projection", choices=["gate_up", "down"], default="gate_up",
                   help="down: the expert's down slice, on its intermediate activations (n counts its input width)")
    p.add_argument("--prior-sample", type=int, default=0, help="the pooled Hessian from this many random tokens (0: all)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json")
    args = p.parse_args()
    if args.smoke:
        args.layers, args.samples, args.counts, args.seeds, args.experts = "4", 4, "0.125,1", 1, 4
    layers = [int(i) for i in args.layers.split(",")]
    counts = [float(c) for c in args.counts.split(",")]
    torch.manual_seed(0)
    model, tokenizer = load_pretrained("smollm2-135m", dtype="float32")
    model.eval()
    cal = mlp_inputs(model, tokenizer, "builtin:python-docs", args.samples, 512, layers)
    test = mlp_inputs(model, tokenizer, "builtin:python-docs-test", 16 if not args.smoke else 2, 512, layers)
    hidden = model.config.hidden_size
    errors: dict[tuple[float, str], list[float]] = {}
    routed_counts = []
    start = time.perf_counter()
    for i in layers:
        mlp = model.model.layers[i].mlp
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach()  # [2I, H]
        inter = mlp.gate_proj.weight.shape[0]
        width = inter // args.experts
        router = kmeans(cal[i], args.experts)
        r_cal, r_test = route(cal[i], router, args.active), route(test[i], router, args.active)
        for e in range(args.experts):
            rows = torch.cat([torch.arange(e * width, (e + 1) * width), inter + torch.arange(e * width, (e + 1) * width)])
            w = gate_up[rows]
            mine = cal[i][(r_cal == e).any(-1)]
            held = test[i][(r_test == e).any(-1)]
            pool, width_in = cal[i], hidden
            if args.projection == "down":  # the expert's down slice on its (full-precision) intermediate activations
                def inner(x: torch.Tensor, w: torch.Tensor = w) -> torch.Tensor:
                    gate, up = (x @ w.T).chunk(2, dim=-1)
                    return torch.nn.functional.silu(gate) * up
                w = mlp.down_proj.weight.detach()[:, e * width:(e + 1) * width]
                mine, held, pool, width_in = inner(mine), inner(held), inner(cal[i]), width
            if args.prior_sample:
                pool = pool[torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(99))[:args.prior_sample]]
            pooled = hessian(pool)
            routed_counts.append(mine.shape[0])
            if held.shape[0] < 16:
                continue
            base = relative_error(w, quantize_weight(w, pooled.clone(), **RECIPE).dequantize(), held)
            for c in counts:
                n = int(round(c * width_in))
                if n > mine.shape[0]:
                    continue
                for seed in range(args.seeds):
                    pick = mine[torch.randperm(mine.shape[0], generator=torch.Generator().manual_seed(seed))[:n]]
                    h_routed = hessian(pick)
                    prior = args.prior * width_in
                    h_mixed = (n * h_routed + prior * pooled) / (n + prior)
                    for name, h in (("routed", h_routed), ("mixed", h_mixed)):
                        err = relative_error(w, quantize_weight(w, h, **RECIPE).dequantize(), held)
                        errors.setdefault((c, name), []).append(err / base)
    print(f"upcycled SmolLM2-135M MLPs, layers {layers}, {args.experts} experts of {width} ({args.active} active), "
          f"{args.projection} (pooled Hessian from {args.prior_sample or 'all'} tokens), "
          f"{args.samples} x 512 calibration tokens (routed per expert: {min(routed_counts)}-{max(routed_counts)}), "
          f"BPDQ k=2 g=64; error on held-out routed tokens relative to the pooled Hessian's (< 1: better); "
          f"'mixed' adds the pooled Hessian as {args.prior:g} x hidden tokens; {time.perf_counter() - start:.0f} s\n")
    print("| routed tokens n | n / input width | routed / pooled | mixed / pooled | cases |")
    print("|---|---|---|---|---|")
    rows = []
    for c in counts:
        r, m = errors.get((c, "routed"), []), errors.get((c, "mixed"), [])
        if not r:
            continue
        row = {"n": int(round(c * (hidden if args.projection == "gate_up" else width))), "fraction": c, "routed": sum(r) / len(r), "mixed": sum(m) / len(m),
               "cases": len(r)}
        rows.append(row)
        print(f"| {row['n']} | {c:g} | {row['routed']:.3f} | {row['mixed']:.3f} | {row['cases']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
