"""What `--prefill-chunk N` trades: prefill speed against peak memory, on `moekit bench
generate`'s 389M model (Mixtral-shaped, 8 experts top-2), one thread.

- ``speed``: prefill tokens/s of whole prompts against chunks of N tokens per forward (the
  engine's chunked prefill), interleaved in one process, fresh prompts every pair, order flipped
  every pair; per-pair ratio chunked / whole, median and range.
- ``memory``: peak RSS over weights + KV cache of a fresh process generating 16 tokens, whole
  prompts and chunks of N (``moekit.bench.generate.peak_memory``, the bench's memory phase);
  memory does not depend on the machine's load, the prompts' routing moves it by ~10 MB.

    python benchmarks/bench_prefill_chunk.py speed [--chunk 256] [--pairs 7]
    python benchmarks/bench_prefill_chunk.py memory [--chunk 256] [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import moekit
from moekit.bench.generate import DTYPES, bench_config, build_export, peak_memory
from moekit.inference.engine import Engine
from moekit.inference.sampling import SamplingParams

CASES = ((8, 128), (1, 990))  # (batch, prompt tokens): the bench's batch-8 rows, one long prompt


def prefill_tps(model, prompts: list[list[int]], chunk: int | None) -> float:
    engine = Engine(model, max_batch=len(prompts), max_len=len(prompts[0]) + 2, prefill_chunk=chunk)
    t0 = time.perf_counter()
    engine.generate(prompts, SamplingParams(max_new_tokens=1, temperature=0))  # the prefill's one token
    return len(prompts) * len(prompts[0]) / (time.perf_counter() - t0)


def speed(folder: str, dtype: str, chunk: int, pairs: int) -> None:
    model = moekit.from_pretrained(folder, dtype=DTYPES[dtype]).eval()
    for batch, length in CASES:
        g = torch.Generator().manual_seed(batch)
        new = lambda: torch.randint(0, model.cfg.vocab_size, (batch, length), generator=g).tolist()  # noqa: E731
        for c in (None, chunk):  # warm-up
            prefill_tps(model, new(), c)
        ratios = []
        for i in range(pairs):
            p = new()
            tps = {c: prefill_tps(model, p, c) for c in ((None, chunk) if i % 2 == 0 else (chunk, None))}
            ratios.append(tps[chunk] / tps[None])
        print(f"{dtype} batch {batch} x {length}: chunks of {chunk} / whole prompt, per pair: median "
              f"{statistics.median(ratios):.3f}, range {min(ratios):.3f}-{max(ratios):.3f} ({pairs} pairs)", flush=True)


def memory(folder: str, dtype: str, chunk: int, runs: int) -> None:
    cfg = bench_config(False)
    for batch, length in CASES:
        for c in (None, chunk):
            over = [peak_memory(folder, cfg, dtype, batch, length, 16, c)["overhead"] for _ in range(runs)]
            print(f"{dtype} batch {batch} x {length}, {'whole prompts' if c is None else f'chunks of {c}'}: peak over "
                  f"weights + KV {', '.join(f'{100 * o:+.1f}%' for o in over)} ({runs} fresh processes)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("speed", "memory"))
    p.add_argument("--chunk", type=int, default=256, help="prompt tokens per prefill forward (default: 256)")
    p.add_argument("--dtypes", default="bf16,fp32", help="comma list of bf16, fp32 (default: both)")
    p.add_argument("--pairs", type=int, default=7, help="speed: interleaved pairs (default: 7)")
    p.add_argument("--runs", type=int, default=3, help="memory: fresh processes per setting (default: 3)")
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="moekit-prefill-chunk-") as folder:
        build_export(bench_config(False), folder)
        for dtype in args.dtypes.split(","):
            if args.what == "speed":
                speed(folder, dtype, args.chunk, args.pairs)
            else:
                memory(folder, dtype, args.chunk, args.runs)


if __name__ == "__main__":
    main()
