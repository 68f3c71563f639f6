"""Fast decode's GEMV kernel, built by AOTInductor (now) against the same kernel through
torch.compile (before): batch-1 decode tokens/s of the engine on `moekit bench generate`'s
model, interleaved in one process, with the plain engine as the reference.

    python benchmarks/bench_fast_decode_kernel.py --pairs 5            # fp32 and bf16, 1 thread
    python benchmarks/bench_fast_decode_kernel.py --quick --pairs 3    # the ~50M model

"before" is the previous ``small_linear``: the kernel through ``torch.compile`` (~28 us of
dynamo guards and wrapper per call), hence only for matrices of at least 2 MB, F.linear below.
"after" is the current one: AOTInductor's runner (~2 us per call), every matrix. Each pair
runs the three engines one after another in a rotating order; medians over the pairs, with
min-max, and the fraction of the bandwidth bound (`moekit bench generate`'s definition, with
the copy bandwidth measured in this run).
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from moekit.bench.generate import bandwidth_bound_tps, bench_config, copy_bandwidth, time_moekit
from moekit.inference import fast_decode
from moekit.model import MoETransformer

OLD_MIN_KERNEL_BYTES = 2 << 20
_compiled = {}


def old_small_linear(x_MK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
    """The previous small_linear, kept here as the baseline."""
    M = x_MK.shape[0]
    if M == 1 and w_NK.numel() * w_NK.element_size() >= OLD_MIN_KERNEL_BYTES:
        n = torch.get_num_threads()
        if n not in _compiled:
            _compiled[n] = torch.compile(fast_decode._gemv, dynamic=True, options={"cpp.threads": n})
        return _compiled[n](x_MK.contiguous(), w_NK.detach())
    if M <= fast_decode.MM_T_MAX_ROWS and x_MK.dtype == torch.float32:
        return torch.mm(w_NK, x_MK.t()).t().contiguous()
    return F.linear(x_MK, w_NK)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=5, help="interleaved rounds of the three engines (default 5)")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16 (default both)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default 128)")
    p.add_argument("--new-tokens", type=int, default=32, help="decoded tokens per run (default 32)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    p.add_argument("--quick", action="store_true", help="the ~50M model instead of ~390M")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = bench_config(args.quick)
    new_small_linear = fast_decode.small_linear
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s, {args.threads} thread(s), {args.pairs} pairs, "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens")
    for name in args.dtypes.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        torch.manual_seed(0)
        model = MoETransformer(cfg).to(dtype).eval()
        prompt = [torch.randint(0, cfg.vocab_size, (args.prompt_len,)).tolist()]
        ways = {"plain": (False, new_small_linear), "before": (True, old_small_linear),
                "after": (True, new_small_linear)}
        for fast, fn in ways.values():  # warm-up: compile / build / load every kernel
            fast_decode.small_linear = fn
            time_moekit(model, prompt, 4, fast_decode=fast)
        tps: dict[str, list[float]] = {k: [] for k in ways}
        for i in range(args.pairs):
            order = list(ways)[i % 3:] + list(ways)[:i % 3]
            for k in order:
                fast, fn = ways[k]
                fast_decode.small_linear = fn
                tps[k].append(time_moekit(model, prompt, args.new_tokens, fast_decode=fast).decode_tps)
        fast_decode.small_linear = new_small_linear
        bound = bandwidth_bound_tps(cfg, dtype.itemsize, args.prompt_len + args.new_tokens / 2, bandwidth)
        med = {k: statistics.median(v) for k, v in tps.items()}
        for k, v in tps.items():
            print(f"{name} {k:>6}: {med[k]:6.1f} tok/s (min {min(v):.1f}, max {max(v):.1f}) = "
                  f"{100 * med[k] / bound:.0f} % of the bound {bound:.1f}")
        ratios = [a / b for a, b in zip(tps["after"], tps["before"])]
        print(f"{name} after/before per pair: median {statistics.median(ratios):.2f}x "
              f"({min(ratios):.2f}-{max(ratios):.2f}); after/plain {med['after'] / med['plain']:.2f}x")


if __name__ == "__main__":
    main()
