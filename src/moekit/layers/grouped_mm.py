"""Grouped expert computation: gather, every expert's FFN on its contiguous slice, weighted
scatter back, as one autograd node.

Shape legend: T tokens, M dispatched slots (sorted by expert), D model dim, F expert hidden
width, H = F_in first-projection width (2F for SwiGLU, gate first), E experts. ``offs`` [E]
int32 is the running end of each expert's slice (cumsum of the counts), the layout
``torch.nn.functional.grouped_mm`` takes. ``token_ids`` [M] and ``weights`` [M] say which
token each slot came from and what its output is multiplied by (``dispatch.py``).

Weights are [out, in] per expert (``experts.py``): w_in [E, H, D], w_out [E, D, F]; optional
biases b_in [E, H], b_out [E, D] (GPT-OSS). The activations live in ``grouped_act.py``.

Plan of ``grouped_moe``, per block of slots (forward, then backward of the autograd.Function):
    1. x = x_TD[token_ids]                                  [m, D]
    2. h = x @ w_in[e]^T (+ b_in[e])                        [m, H]   (gate and up in one matmul)
    3. a = act(h) * w        the routing weight, on the narrow side  [m, F]
    4. y = a @ w_out[e]^T (+ w * b_out[e], in fp32)         [m, D]
    5. out_TD += index_add(token_ids, y)                    [T, D] fp32
    backward, given d_out [T, D]; saves only h (x_TD, token_ids, weights are small or live anyway):
    6. dy = d_out[token_ids]; du = dy @ w_out[e]            [m, D], [m, F]
    7. dw = rowsum(act(h) * du); dw_out[e] = dy^T @ a       (a recomputed from h, times w)
    8. dh = act'(h) * (du * w)                              (written over a)
    9. x = x_TD[token_ids] again; dx = dh @ w_in[e]; dw_in[e] = dh^T @ x
   10. dx_TD += index_add(token_ids, dx)

Two schedules run the same steps (``pick_schedule``):
- ``"grouped"``: one block of all M slots; each matmul is one ``grouped_mm`` call over every
  expert's slice. On a GPU that is one kernel per projection instead of one per expert.
- ``"blocked"``: blocks of a few consecutive experts (about ``BLOCK_BYTES`` wide), each run
  through all of its steps before the next begins; inside a block the matmuls are one ``mm``
  per expert. On a CPU a block's intermediates (a few MB) stay in cache, where the grouped
  schedule streams k copies of the input ([M, D], 64 MB for 4096 tokens at top-8) through
  memory between every two steps; the matmuls are the same (CPU ``grouped_mm`` is a loop of
  ``mm`` over the slices). Fine-grained fwd+bwd went from 1.5x to about 1.1x the dense FFN's
  time with it (docs/benchmarks.md). It is also the fallback wherever ``grouped_mm`` is
  missing (older torch, CUDA fp32, odd widths).
On CPU in half precision the blocked schedule's slices are first padded to bucketed lengths
(``row_padding.py``: pad slots with routing weight 0, laid out by the same gather), so that
oneDNN builds a bounded number of matmul primitives.

Why one node: autograd of the separate steps keeps the gathered x [M, D] alive until backward
(k copies of the input; re-gathering costs one pass), multiplies the routing weight on the
wide [M, D] output and again in backward, and scatters with ``index_put_``, which on CPU is
several times slower than ``index_add_``. Why custom matmul backward: autograd of
``grouped_mm`` itself is not usable on every build (on torch 2.13 CPU its backward fails on
expanded gradients), and autograd through a Python loop would save a and both halves of h.
Without grad (inference prefill) h is not kept either: each block's h is a temporary.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from moekit.layers.grouped_act import ARG_COUNTS, activate, activation_grad, weighted_activation
from moekit.layers.row_padding import pad_slices, wants_padding

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
SCHEDULES = ("grouped", "blocked")


class _Block(NamedTuple):
    """Slots [start, end) of a few consecutive experts (blocked: ``experts`` holds each one's
    (expert, start, end) within the block), or of every expert (grouped: ``experts`` None,
    the slices given by offs)."""

    start: int
    end: int
    experts: tuple[tuple[int, int, int], ...] | None


# Blocked schedule: experts join a block until its widest intermediate ([m, max(H, D)]) holds
# this many bytes. Small enough to stay in cache (a 32 MB L3 holds a block's few such
# tensors), large enough that the Python and dispatch cost of a block's ~25 elementwise and
# indexing ops is shared by several small experts (fine fp32: 2048 slots, 16 blocks instead
# of 64). An expert wider than the budget (coarse: 1024 slots x 3584) is a block alone.
BLOCK_BYTES = 4 << 20


def grouped_mm_supported(x: torch.Tensor) -> bool:
    """Whether this torch build runs ``grouped_mm`` for x's device and dtype."""
    if _GROUPED_MM is None:
        return False
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return False  # torch 2.13's meta kernel (used when tracing) accepts bf16 only
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16)
    if x.device.type == "cuda":  # the fused kernels are bf16; fp32 falls back to the loop
        return x.dtype == torch.bfloat16
    return False


def pick_schedule(x: torch.Tensor, widths: tuple[int, ...]) -> str:
    """"grouped" where ``grouped_mm`` runs on x and is worth it, else "blocked" (see above).
    CPU takes "blocked", except while torch.compile traces (one traceable call per matmul
    instead of a Python loop over data-dependent slice lengths)."""
    aligned = all(w * x.element_size() % 16 == 0 for w in widths)  # grouped_mm's stride rule
    if not (aligned and grouped_mm_supported(x)):
        return "blocked"
    return "grouped" if x.device.type != "cpu" or torch.compiler.is_compiling() else "blocked"


def _blocks(offs: torch.Tensor, num_slots: int, schedule: str, row_bytes: int) -> list[_Block]:
    """The schedule's blocks; ``row_bytes``: one slot's row of the block's widest intermediate."""
    if schedule == "grouped":
        return [_Block(0, num_slots, None)]  # no host sync: the slices stay on the device
    budget = max(1, BLOCK_BYTES // row_bytes)  # slots per block
    blocks, members, start, begin = [], [], 0, 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            members.append((e, start - begin, end - begin))
        start = end
        if members and end - begin >= budget:
            blocks.append(_Block(begin, end, tuple(members)))
            members, begin = [], end
    if members:
        blocks.append(_Block(begin, start, tuple(members)))
    return blocks


def _cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), read from
    /proc/cpuinfo; False where that cannot be read (then the layout copy below is kept)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


CPU_NATIVE_BF16 = _cpu_has_native_bf16()  # read once: torch.compile traces plain constants


def _fast_layout(w: torch.Tensor) -> torch.Tensor:
    """w [E, K, N] in a memory layout the CPU kernels run fast. fp32, and bf16 on CPUs with
    bf16 hardware: as it comes (every layout runs at the same speed; a copy costs ~9 ms per
    32 MB). bf16 on CPUs that emulate it (AVX2): column-major per expert, the layout
    ``F.linear`` weights have and oneDNN's emulated bf16 GEMM wants (several times faster
    than row-major). The forward's operands (w.mT views of the [out, in] weights) already
    are; the backward's get a copy."""
    if w.dtype == torch.bfloat16 and w.device.type == "cpu" and not CPU_NATIVE_BF16:
        return w if w.stride(-2) == 1 else w.mT.contiguous().mT
    return w if w.stride(-1) == 1 or w.stride(-2) == 1 else w.contiguous()


def _mm(a: torch.Tensor, w: torch.Tensor, blk: _Block, offs: torch.Tensor, out=None,
        bias: torch.Tensor | None = None, eid: torch.Tensor | None = None) -> torch.Tensor:
    """a [m, K] (the block's slots), w [E, K, N] -> [m, N]: each slice times its expert's w,
    plus its expert's row of ``bias`` [E, N] when given (``eid`` [m]: each slot's expert, for
    the grouped schedule; per expert, addmm adds it as F.linear does)."""
    if blk.experts is None:
        y = _GROUPED_MM(a, w, offs=offs)
        return y if bias is None else y.add_(bias.index_select(0, eid))
    if len(blk.experts) == 1:
        e = blk.experts[0][0]
        return torch.mm(a, w[e], out=out) if bias is None else torch.addmm(bias[e], a, w[e], out=out)
    out = a.new_empty(a.shape[0], w.shape[-1]) if out is None else out
    for e, s, t in blk.experts:
        if bias is None:
            torch.mm(a[s:t], w[e], out=out[s:t])
        else:
            torch.addmm(bias[e], a[s:t], w[e], out=out[s:t])
    return out


def _wgrad(a: torch.Tensor, g: torch.Tensor, blk: _Block, offs: torch.Tensor, out: torch.Tensor | None):
    """a [m, K], g [m, N] -> [E, K, N], expert e's slice(a)^T @ slice(g): written into out[e]
    (blocked), or a new tensor (grouped; an expert with an empty slice gets zeros)."""
    if blk.experts is None:
        return _GROUPED_MM(a.t(), g, offs=offs)
    for e, s, t in blk.experts:
        torch.mm(a[s:t].t(), g[s:t], out=out[e])
    return out


def _into(buf: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """An uninitialized [rows, cols] tensor in the memory of ``buf`` (a dead buffer) when it
    fits, else a new one. On CPU, first touch of a fresh 32-64 MB tensor costs page faults
    worth about as much as the elementwise op that fills it (docs/benchmarks.md)."""
    if buf.is_contiguous() and buf.numel() >= rows * cols:
        return buf.view(-1)[: rows * cols].view(rows, cols)
    return buf.new_empty(rows, cols)


def _row_bytes(x_TD: torch.Tensor, w_in: torch.Tensor) -> int:
    return max(w_in.shape[1], x_TD.shape[-1]) * x_TD.element_size()


class _Extras(NamedTuple):
    """What only some experts have: biases b_in [E, H] and b_out [E, D] (either may be None),
    ``eid`` [M] each slot's expert (None without biases), ``act_args`` of the activation."""

    b_in: torch.Tensor | None = None
    b_out: torch.Tensor | None = None
    eid: torch.Tensor | None = None
    act_args: tuple = ()


def _forward(x_TD, token_ids, weights, w_in, w_out, offs, activation: str, schedule: str, blocks, keep_h: bool,
             extras: _Extras = _Extras()):
    """Steps 1-5 over every block: out_TD [T, D] fp32, and h [M, H] when ``keep_h``."""
    dtype = x_TD.dtype
    # .to(dtype): a no-op unless fp32 master weights meet half activations (autocast).
    w_T = w_in.to(dtype).mT, w_out.to(dtype).mT  # [E, D, H], [E, F, D] views
    # b_in joins h in the compute dtype, as F.linear's bias; b_out is added to the fp32 sum.
    b_in = None if extras.b_in is None else extras.b_in.to(dtype)
    extras = extras._replace(b_in=b_in, b_out=None if extras.b_out is None else extras.b_out.float())
    h_all = x_TD.new_empty(token_ids.shape[0], w_in.shape[1]) if keep_h and schedule == "blocked" else None
    # Accumulate a token's k contributions in fp32, so bf16 outputs do not round against each other.
    out_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
    for blk in blocks:
        h = _forward_block(x_TD, token_ids, weights, w_T, offs, blk, activation, out_TD, h_all, extras)
        if schedule == "grouped" and keep_h:
            h_all = h
    return out_TD, h_all


def _forward_block(x_TD, token_ids, weights, w_T, offs, blk: _Block, activation: str, out_TD, h_all,
                   extras: _Extras):
    """Steps 1-5 for one block, adding into out_TD; returns its h (a view of h_all when given).
    A function per block, so a block's temporaries are freed before the next block's exist."""
    rows = slice(blk.start, blk.end)
    ids = token_ids[rows]
    eid = None if extras.eid is None else extras.eid[rows]
    x = x_TD.index_select(0, ids)  # [m, D]; index_select beats x_TD[ids] on CPU
    h = _mm(x, w_T[0], blk, offs, out=None if h_all is None else h_all[rows], bias=extras.b_in, eid=eid)  # [m, H]
    # x is dead now (the backward gathers it again rather than keep k copies of the input
    # alive): act(h) goes into its memory.
    a = activate(h, activation, _into(x, h.shape[0], w_T[1].shape[1]), extras.act_args)  # [m, F]
    a.mul_(weights[rows].to(x.dtype)[:, None])
    y = _mm(a, w_T[1], blk, offs).float()  # [m, D]
    if extras.b_out is not None:  # the output bias is part of the expert: weighted like the rest
        y.addcmul_(extras.b_out.index_select(0, eid), weights[rows].float()[:, None])
    out_TD.index_add_(0, ids, y)
    return h


class _GroupedMoE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, token_ids, weights, w_in, w_out, offs, activation: str, schedule: str, blocks,
                b_in, b_out, eid, act_args: tuple):
        extras = _Extras(b_in, b_out, eid, act_args)
        with torch.autocast(x_TD.device.type, enabled=False):
            out_TD, h = _forward(x_TD, token_ids, weights, w_in, w_out, offs, activation, schedule, blocks, True, extras)
        ctx.save_for_backward(x_TD, token_ids, weights, h, w_in, w_out, offs, b_in, b_out, eid)
        ctx.activation, ctx.schedule, ctx.blocks, ctx.act_args = activation, schedule, blocks, act_args
        return out_TD

    @staticmethod
    def backward(ctx, d_out):
        with torch.autocast(d_out.device.type, enabled=False):
            return _GroupedMoE._backward(ctx, d_out)

    @staticmethod
    def _backward(ctx, d_out):
        x_TD, token_ids, weights, h_all, w_in, w_out, offs, b_in, b_out, eid = ctx.saved_tensors
        dtype, act = x_TD.dtype, (ctx.activation, ctx.act_args)
        need_x, need_w, need_in, need_out = (ctx.needs_input_grad[i] for i in (0, 2, 3, 4))
        need_b_in, need_b_out = ctx.needs_input_grad[9], ctx.needs_input_grad[10]
        blocks = ctx.blocks
        d_out = d_out.to(dtype)  # [T, D] once, rather than every gathered copy (k times as many rows)
        w_b = _fast_layout(w_in.to(dtype)) if need_x else None, _fast_layout(w_out.to(dtype))  # [E, H, D], [E, D, F]
        grads = {
            "weights": torch.empty(token_ids.shape, dtype=torch.float32, device=x_TD.device),  # [M]
            "x": torch.zeros_like(x_TD) if need_x else None,
            "w_in": None, "w_out": None,
            # bias gradients: sums over each expert's slots, in fp32 (index_add_ over eid)
            "b_in": torch.zeros(b_in.shape, dtype=torch.float32, device=b_in.device) if need_b_in else None,
            "b_out": torch.zeros(b_out.shape, dtype=torch.float32, device=b_out.device) if need_b_out else None,
        }
        extras = _Extras(None, None if b_out is None else b_out.float(), eid)
        if ctx.schedule == "blocked":  # each expert's block writes its slice; idle experts get zeros
            idle = sorted(set(range(w_in.shape[0])) - {e for b in blocks for e, _, _ in b.experts})
            grads["w_in"] = _empty_grad(w_in, dtype, idle) if need_in else None
            grads["w_out"] = _empty_grad(w_out, dtype, idle) if need_out else None
        for blk in blocks:
            _backward_block(x_TD, token_ids, weights, h_all, w_b, offs, blk, act, d_out, grads, need_in, need_out,
                            extras)
        d_w_in = grads["w_in"].to(w_in.dtype) if need_in else None
        d_w_out = grads["w_out"].to(w_out.dtype) if need_out else None
        d_weights = grads["weights"].to(weights.dtype) if need_w else None
        d_b_in = grads["b_in"].to(b_in.dtype) if need_b_in else None
        d_b_out = grads["b_out"].to(b_out.dtype) if need_b_out else None
        return grads["x"], None, d_weights, d_w_in, d_w_out, None, None, None, None, d_b_in, d_b_out, None, None


def _backward_block(x_TD, token_ids, weights, h_all, w_b, offs, blk: _Block, act: tuple, d_out, grads: dict,
                    need_in: bool, need_out: bool, extras: _Extras) -> None:
    """Steps 6-10 for one block, writing into ``grads`` (the grouped schedule's weight
    gradients are new tensors, stored there). ``act``: (activation, act_args). With biases,
    y = w * (act(h) @ w_out^T + b_out): dL/dw gains dy . b_out, dL/db_out = sum of w * dy
    and dL/db_in = sum of dh, each over the expert's slots."""
    rows = slice(blk.start, blk.end)
    ids, h, w_M1 = token_ids[rows], h_all[rows], weights[rows].to(x_TD.dtype)[:, None]
    eid = None if extras.eid is None else extras.eid[rows]
    dy = d_out.index_select(0, ids)  # [m, D]
    du = _mm(dy, w_b[1], blk, offs)  # [m, F]
    dh = torch.empty_like(h)
    u, grads["weights"][rows] = weighted_activation(h, du, w_M1, dh, *act)  # u lives in dh's memory
    if extras.b_out is not None:
        dy32 = dy.float()
        grads["weights"][rows] += torch.linalg.vecdot(dy32, extras.b_out.index_select(0, eid))
        if grads["b_out"] is not None:
            grads["b_out"].index_add_(0, eid, dy32 * weights[rows].float()[:, None])  # dy32 may be dy itself
    if need_out:
        grads["w_out"] = _wgrad(dy, u, blk, offs, out=grads["w_out"])  # [E, D, F]
    dh = activation_grad(h, du.mul_(w_M1), dh, *act)  # [m, H], over u
    if grads["b_in"] is not None:
        grads["b_in"].index_add_(0, eid, dh.float())
    if grads["x"] is None and not need_in:
        return
    x = torch.index_select(x_TD, 0, ids, out=dy)  # gathered again, into dy's memory
    if need_in:
        grads["w_in"] = _wgrad(dh, x, blk, offs, out=grads["w_in"])  # [E, H, D]
    if grads["x"] is not None:
        grads["x"].index_add_(0, ids, _mm(dh, w_b[0], blk, offs))  # [m, D] -> [T, D]


def _empty_grad(w: torch.Tensor, dtype: torch.dtype, idle: list[int]) -> torch.Tensor:
    """An uninitialized gradient for w in ``dtype`` whose idle experts' slices are zero."""
    g = torch.empty(w.shape, dtype=dtype, device=w.device)
    if idle:
        g[idle] = 0
    return g


def grouped_moe(
    x_TD: torch.Tensor,
    token_ids: torch.Tensor,
    weights: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    counts: torch.Tensor,
    activation: str,
    schedule: str | None = None,
    limit: float | None = None,
    b_in: torch.Tensor | None = None,
    b_out: torch.Tensor | None = None,
    act_args: tuple = (),
    pad: bool | None = None,
) -> torch.Tensor:
    """sum over slots m of token t: weights[m] * expert_e(m)(x_TD[t]), as [T, D] fp32.

    token_ids [M] and weights [M] are grouped by expert, counts [E] the slice lengths. Weights
    in another dtype than x (fp32 master weights, bf16 activations) are cast once per call;
    their gradients come back in the weights' dtype. Every expert gets a gradient, zeros when
    its slice is empty. ``schedule`` (default: ``pick_schedule``) forces "grouped" or "blocked".
    Experts with biases (GPT-OSS) pass b_in [E, H] and b_out [E, D]: expert e is then
    act(x @ w_in[e]^T + b_in[e]) @ w_out[e]^T + b_out[e]. ``act_args``: the activation's
    parameters (clamped_swiglu: limit, alpha; limited_swiglu: limit; see ``grouped_act.py``);
    ``limit`` is the same as act_args=(limit,), for limited_swiglu (DeepSeek-V4). ``pad``
    (default: ``row_padding.wants_padding``, CPU half precision) grows each expert's slice to a
    bucketed length, bounding the number of matmul shapes; the result is the same.
    """
    act_args = tuple(act_args) if limit is None else (*act_args, limit)
    if len(act_args) != ARG_COUNTS.get(activation, 0):
        raise ValueError(f"activation {activation!r} takes {ARG_COUNTS.get(activation, 0)} argument(s) (act_args, "
                         f"or limit for limited_swiglu); got {act_args}")
    if torch.is_autocast_enabled(x_TD.device.type):
        # The Function runs with autocast off; take autocast's compute dtype here instead.
        x_TD = x_TD.to(torch.get_autocast_dtype(x_TD.device.type))
    if schedule is None:
        schedule = pick_schedule(x_TD, (x_TD.shape[-1], w_in.shape[1], w_out.shape[-1]))
    elif schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")
    if wants_padding(x_TD, schedule) if pad is None else pad:
        token_ids, weights, counts = pad_slices(token_ids, weights, counts)  # [P], [P], [E]
    offs = torch.cumsum(counts, 0).to(torch.int32)  # [E]
    blocks = _blocks(offs, token_ids.shape[0], schedule, _row_bytes(x_TD, w_in))  # backward reuses them
    eid = None
    if b_in is not None or b_out is not None:  # [M]: each slot's expert, to find its bias rows
        eid = torch.repeat_interleave(torch.arange(counts.shape[0], device=counts.device), counts)
    args = (x_TD, token_ids, weights, w_in, w_out, offs, activation, schedule, blocks)
    trained = (x_TD, weights, w_in, w_out, b_in, b_out)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in trained):
        return _GroupedMoE.apply(*args, b_in, b_out, eid, act_args)
    with torch.autocast(x_TD.device.type, enabled=False):
        return _forward(*args, keep_h=False, extras=_Extras(b_in, b_out, eid, act_args))[0]
