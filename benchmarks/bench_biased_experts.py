"""Experts with biases and the clamped SwiGLU (GPT-OSS's): the grouped node against the
per-expert loop, which is what impl="grouped" ran for such experts before the node took biases.

One MoE layer shaped like `moekit bench layer`'s "coarse" (d_model 512, 8 experts of width
1792, top-2) but with GPT-OSS's expert options (router bias, expert biases, clamped SwiGLU);
the same weights, the two impls timed interleaved (pairs, order flipped every pair) on one
thread; median of the per-pair time ratios loop / grouped, with the interquartile range, and
the load average before and after. Outputs of the two are compared first.

    python benchmarks/bench_biased_experts.py [--tokens 2048] [--pairs 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from moekit import MoEConfig, MoELayer


def layer(dtype: torch.dtype) -> MoELayer:
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=512, d_expert=1792, num_experts=8, top_k=2, router="softmax", norm_topk_prob=True,
                    router_bias=True, expert_proj_bias=True, activation="clamped_swiglu", swiglu_limit=7.0)
    m = MoELayer(cfg)
    with torch.no_grad():  # biases start at zero; random ones make the comparison mean something
        m.experts.b_in.normal_(std=0.1), m.experts.b_out.normal_(std=0.1)
    return m.to(dtype)


def step(m: MoELayer, impl: str, x: torch.Tensor, dy: torch.Tensor | None) -> float:
    m.impl = impl
    t0 = time.perf_counter()
    if dy is None:
        with torch.no_grad():
            m(x)
    else:
        m(x.detach().requires_grad_(True)).backward(dy)
        for p in m.parameters():
            p.grad = None
    return time.perf_counter() - t0


def case(dtype: torch.dtype, train: bool, tokens: int, pairs: int) -> tuple[float, float, float, float]:
    m = layer(dtype).train(train)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, tokens, 512, generator=g).to(dtype)
    dy = torch.randn(1, tokens, 512, generator=g).to(dtype) if train else None
    with torch.no_grad():
        m.impl = "loop"
        ref = m(x).float()
        m.impl = "grouped"
        err = (m(x).float() - ref).abs().max().item() / ref.abs().max().item()
    for impl in ("loop", "grouped"):  # warm-up
        step(m, impl, x, dy)
    ratios = []
    for i in range(pairs):
        order = ("loop", "grouped") if i % 2 == 0 else ("grouped", "loop")
        t = {impl: step(m, impl, x, dy) for impl in order}
        ratios.append(t["loop"] / t["grouped"])
    q = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), q[0], q[2], err


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048, help="tokens per call (default: 2048)")
    p.add_argument("--pairs", type=int, default=15, help="interleaved pairs per case (default: 15)")
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; one thread; {args.tokens} tokens")
    print(f"{'dtype':<5} {'mode':<8} {'loop/grouped':>12} {'IQR':>13} {'max rel diff':>12}")
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for mode in ("fwd", "fwd+bwd"):
            med, lo, hi, err = case(dtype, mode == "fwd+bwd", args.tokens, args.pairs)
            print(f"{name:<5} {mode:<8} {med:>11.2f}x {lo:>6.2f}-{hi:<6.2f} {err:>12.1e}", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
