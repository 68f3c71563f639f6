"""Padded expert slices (``layers/row_padding.py``) on and off, on `moekit bench generate`'s 389M
model in bf16, one thread. Padding is switched off by replacing ``grouped_mm.wants_padding``,
which is what the node did before it existed.

- ``prefill``: whole-model prefill tokens/s at batch 1 and 8 (128-token prompts, fresh prompts
  every pair, so fresh routing), padding off and on interleaved in one process, order flipped
  every pair; per-pair ratio padded / unpadded, median and range.
- ``server``: RSS of one process generating (batch 1, 2 new tokens) from prompts of distinct
  lengths 65-996 in shuffled order, after ``malloc_trim``, over the RSS after loading, every 10
  prompts: what oneDNN's primitive cache (one primitive per matmul shape) grows to. Memory does
  not depend on the machine's load. Run it once per setting: the cache lives for the process.

    python benchmarks/bench_row_padding.py prefill [--pairs 9]
    python benchmarks/bench_row_padding.py server --padding off|on [--prompts 50]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import tempfile

import torch

import moekit
from moekit.bench.generate import _rss_bytes, bench_config, build_export, time_moekit
from moekit.layers import grouped_mm

PADDING = grouped_mm.wants_padding


def set_padding(on: bool) -> None:
    grouped_mm.wants_padding = PADDING if on else (lambda x, schedule: False)


def prompts(g: torch.Generator, batch: int, length: int) -> list[list[int]]:
    return torch.randint(0, 32000, (batch, length), generator=g).tolist()


def prefill(model, pairs: int) -> None:
    for batch in (1, 8):
        g = torch.Generator().manual_seed(batch)
        tps = {False: [], True: []}
        for on in (False, True):  # warm-up
            set_padding(on)
            time_moekit(model, prompts(g, batch, 128), 2)
        for i in range(pairs):
            p = prompts(g, batch, 128)
            for on in (False, True) if i % 2 == 0 else (True, False):
                set_padding(on)
                tps[on].append(time_moekit(model, p, 2).prefill_tps)
        ratios = [b / a for a, b in zip(tps[False], tps[True])]
        print(f"batch {batch}: prefill tok/s unpadded {statistics.median(tps[False]):.0f}, padded "
              f"{statistics.median(tps[True]):.0f}; padded / unpadded per pair: median {statistics.median(ratios):.3f}, "
              f"range {min(ratios):.3f}-{max(ratios):.3f} ({pairs} pairs)", flush=True)


def server(model, on: bool, n: int, base: int) -> None:
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc_trim(0)
    after_load = _rss_bytes("VmRSS") - base
    set_padding(on)
    lengths = [65 + 19 * i for i in range(n)]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(1)).tolist()
    g = torch.Generator().manual_seed(0)
    for j, i in enumerate(order, start=1):
        time_moekit(model, prompts(g, 1, lengths[i]), 2)
        if j % 10 == 0 or j == n:
            libc.malloc_trim(0)
            print(f"padding {'on' if on else 'off'}: {j} prompts, RSS over loading "
                  f"{(_rss_bytes('VmRSS') - base - after_load) / 2**20:.0f} MB", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("check", choices=["prefill", "server"], help="what to measure (module docstring)")
    ap.add_argument("--padding", choices=["off", "on"], default="on", help="server: padded slices or not")
    ap.add_argument("--pairs", type=int, default=9, help="prefill: interleaved off/on pairs per batch size")
    ap.add_argument("--prompts", type=int, default=50, help="server: prompts of distinct lengths (at most 50)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"load average at start: {os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        build_export(bench_config(False), folder)
        base = _rss_bytes("VmRSS")
        model = moekit.from_pretrained(folder, dtype=torch.bfloat16).eval()
        if args.check == "prefill":
            prefill(model, args.pairs)
        else:
            server(model, args.padding == "on", min(args.prompts, 50), base)
    print(f"load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
