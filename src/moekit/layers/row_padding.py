"""Padded expert slices: each expert's slice of dispatched slots grows to a bucketed length, so
the grouped node's per-expert matmuls come in a bounded set of shapes.

Shape legend: M dispatched slots (grouped by expert), P slots after padding (P >= M), E experts.

Why: on CPU, half-precision matmuls run through oneDNN, which builds a primitive for every new
shape and keeps it (an LRU cache of up to 1,024 entries, ``ONEDNN_PRIMITIVE_CACHE_CAPACITY``;
~0.65 MB each for the [n, 1024] x [1024, 3072] products of ``bench generate``'s model,
whatever n, measured). The blocked schedule multiplies each expert's slice alone, and its
row count differs per expert, per layer and per batch, so every prefill adds new primitives:
in ``bench generate`` (bf16) one generate left 93 MB of them and heap behind unpadded, 38 MB
padded, and a process that saw 50 prompt lengths held 617 MB unpadded (the cache full), 97 MB
padded (docs/benchmarks.md). MKL's fp32 GEMM keeps no such cache, and
CUDA takes the grouped schedule (one ``grouped_mm`` per projection), so both stay unpadded.

How, without a copy: the padding is done by the gather the node does anyway. ``pad_slices``
lays out the node's slot list with gaps: expert e's real slots first, then pad slots up to
``padded_rows(count)``. A pad slot repeats the token of its expert's last real slot (so it
computes a real, finite row, never uninitialized memory) with routing weight 0: its output is
act(h) * 0 @ w_out = exactly 0 (+ b_out * 0), added to that token's fp32 sum, which it leaves
unchanged. In training the same zero keeps the pad slots out of every gradient: dw_out sums
dy^T (act(h) * w), dw_in and dx come from dh = act'(h) * (du * w), and the bias gradients from
w * dy and dh (``grouped_mm.py``, steps 7-10); the routing-weight gradients of the pad slots
are dropped by the scatter that built ``weights_P`` (autograd's ``index_copy`` backward
gathers the real slots only). Each real row is the same row-by-row product as unpadded (GEMM
rows are independent), so outputs agree with the unpadded node to rounding (bitwise on the
CPU tried, docs/benchmarks.md).
"""

from __future__ import annotations

import torch

# Bucket rule: a slice of n rows grows to a multiple of max(MIN_BUCKET, 2^floor(log2 n) /
# STEPS_PER_OCTAVE). The extra rows stay under 1 / STEPS_PER_OCTAVE of n for n >= 64 (and
# under MIN_BUCKET rows below), while every doubling of n adds at most STEPS_PER_OCTAVE
# shapes: up to 2,048 rows, 24 row counts in all. Each distinct shape costs ~0.65 MB of
# primitive whatever its row count, so fewer buckets save memory and more save work. On
# ``bench generate``'s bf16 prefill (slices of 128-576 rows), two pairs of runs on the same
# prompts gave peaks over weights + KV of +23.3 / +19.8 % unpadded, +16.5 / +17.9 % with 8
# steps per octave, +15.7 / +15.5 % with 4, +15.9 / +13.8 % with a fixed multiple of 64 (runs
# of one rule differ by ~10 MB). The fixed 64 pads a fine-grained model's ~64-row slices by
# up to 63 rows, where 4 steps per octave pads them by at most 15.
MIN_BUCKET = 16
STEPS_PER_OCTAVE = 4


def padded_rows(n: int) -> int:
    """n rows -> the bucketed row count (0 stays 0: an idle expert gets no slots)."""
    if n <= 0:
        return 0
    step = max(MIN_BUCKET, (1 << (n.bit_length() - 1)) // STEPS_PER_OCTAVE)
    return -(-n // step) * step


def _onednn_half_dtypes() -> tuple[torch.dtype, ...]:
    """The half dtypes whose CPU matmuls this torch build sends to oneDNN: bf16 on x86 with
    AVX-512 (and Arm with bf16), fp16 only with AVX512-FP16 or AMX-FP16; elsewhere they take
    a GEMM without a primitive cache, where padding would only add rows."""
    try:
        ops = torch.ops.mkldnn
        checks = ((torch.bfloat16, ops._is_mkldnn_bf16_supported), (torch.float16, ops._is_mkldnn_fp16_supported))
        return tuple(dtype for dtype, supported in checks if supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return ()


ONEDNN_HALF = _onednn_half_dtypes()  # read once: torch.compile traces plain constants


def wants_padding(x: torch.Tensor, schedule: str) -> bool:
    """Pad where oneDNN multiplies the slices one expert at a time: the blocked schedule, on
    CPU, in a half dtype oneDNN takes, unless oneDNN is switched off (see the module docstring)."""
    return (schedule == "blocked" and x.device.type == "cpu" and x.dtype in ONEDNN_HALF
            and torch.backends.mkldnn.enabled)


def pad_slices(token_ids: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token_ids [M], weights [M], counts [E]) grouped by expert -> the same with every slice
    padded: token_ids_P [P] (a pad repeats its expert's last real token), weights_P [P] (0 at
    pads; differentiable in weights), counts_P [E] (``padded_rows`` of each count)."""
    sizes = counts.tolist()
    padded = [padded_rows(n) for n in sizes]
    if padded == sizes:
        return token_ids, weights, counts
    counts_P = torch.tensor(padded, dtype=counts.dtype, device=counts.device)
    starts_M = torch.cumsum(counts, 0) - counts  # [E] first slot of each expert
    starts_P = torch.cumsum(counts_P, 0) - counts_P  # [E] the same after padding
    # Each real slot moves by its expert's shift: the pad slots of the experts before it.
    real_P = torch.arange(token_ids.shape[0], device=counts.device) + torch.repeat_interleave(starts_P - starts_M, counts)
    last = token_ids[(starts_M + counts - 1).clamp(min=0)]  # [E] each expert's last real token
    token_ids_P = torch.repeat_interleave(last, counts_P).index_copy_(0, real_P, token_ids)  # [P]
    weights_P = weights.new_zeros(int(sum(padded))).index_copy(0, real_P, weights)  # [P]
    return token_ids_P, weights_P, counts_P
