"""Grouped expert computation: gather, every expert's FFN on its contiguous slice (one call
per matmul), weighted scatter back, as one autograd node.

Shape legend: T tokens, M dispatched slots (sorted by expert), D model dim, F expert hidden
width, H = F_in first-projection width (2F for SwiGLU, gate first), E experts. ``offs`` [E]
int32 is the running end of each expert's slice (cumsum of the counts), the layout
``torch.nn.functional.grouped_mm`` takes. ``token_ids`` [M] and ``weights`` [M] say which
token each slot came from and what its output is multiplied by (``dispatch.py``).

Weights are [out, in] per expert (``experts.py``): w_in [E, H, D], w_out [E, D, F].

Plan of ``grouped_moe`` (forward, then backward of the custom autograd.Function):
    1. x = x_TD[token_ids]                                  [M, D]
    2. h = x @ w_in[e]^T     per slice                      [M, H]   (gate and up in one matmul)
    3. a = act(h) * w        the routing weight, on the narrow side  [M, F]
    4. y = a @ w_out[e]^T    per slice                      [M, D]
    5. out_TD = index_add(token_ids, y)                     [T, D] fp32
    backward, given d_out [T, D]; saves only h (x_TD, token_ids, weights are small or live anyway):
    6. dy = d_out[token_ids]; du = dy @ w_out[e]            [M, D], [M, F]
    7. dw = rowsum(act(h) * du); dw_out[e] = dy_e^T @ a_e   (a recomputed from h, times w)
    8. dh = act'(h) * (du * w)                              (written over a)
    9. x = x_TD[token_ids] again; dx = dh @ w_in[e]; dw_in[e] = dh_e^T @ x_e
   10. dx_TD = index_add(token_ids, dx)
Why one node: autograd of the separate steps keeps the gathered x [M, D] alive until backward
(k copies of the input; re-gathering costs one memory pass), multiplies the routing weight on
the wide [M, D] output and again in backward, and scatters with ``index_put_``, which on CPU
is several times slower than ``index_add_``. Why custom matmul backward: autograd of
``grouped_mm`` itself is not usable on every build (on torch 2.13 CPU its backward fails on
expanded gradients), and autograd through a Python loop would save a and both halves of h.

Where ``grouped_mm`` is missing (older torch, or a dtype/device it does not take), the same
steps run as a loop over the slices; results are identical up to rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


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


def _aligned(*tensors: torch.Tensor) -> bool:
    """grouped_mm wants every stride but the unit one to be a multiple of 16 bytes."""
    return all(st * t.element_size() % 16 == 0 for t in tensors for st in t.stride() if st != 1)


def _fast_layout(w: torch.Tensor) -> torch.Tensor:
    """w [E, K, N] in a memory layout the CPU kernels run fast. fp32: as it comes (row- or
    column-major per expert both run at full speed; a copy would cost more than it saves).
    bf16: column-major per expert, the layout ``F.linear`` weights have and oneDNN's bf16
    GEMM wants (several times faster than row-major on AVX2 machines). The forward's operands
    (w.mT views of the [out, in] weights) already are; the backward's get a copy."""
    if w.dtype == torch.bfloat16 and w.device.type == "cpu":
        return w if w.stride(-2) == 1 else w.mT.contiguous().mT
    return w if w.stride(-1) == 1 or w.stride(-2) == 1 else w.contiguous()


def _mm(a: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, use_grouped: bool) -> torch.Tensor:
    """a [M, K] sorted by expert, w [E, K, N] -> [M, N]: slice e times w[e]."""
    if use_grouped:
        w = _fast_layout(w)
        if _aligned(a, w):
            return _GROUPED_MM(a, w, offs=offs)
    counts = torch.diff(offs, prepend=offs.new_zeros(1)).tolist()
    outs = [a_e @ w[e] for e, a_e in enumerate(torch.split(a, counts))]
    return torch.cat(outs) if outs else a.new_zeros(0, w.shape[-1])


def _wgrad(a: torch.Tensor, g: torch.Tensor, offs: torch.Tensor, use_grouped: bool) -> torch.Tensor:
    """a [M, K], g [M, N] sorted by expert -> [E, K, N]: slice_e(a)^T @ slice_e(g); an expert
    with an empty slice gets exact zeros."""
    if use_grouped and _aligned(a, g):
        return _GROUPED_MM(a.t(), g, offs=offs)
    counts = torch.diff(offs, prepend=offs.new_zeros(1)).tolist()
    return torch.stack([a_e.t() @ g_e for a_e, g_e in zip(torch.split(a, counts), torch.split(g, counts))])


def _into(buf: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """An uninitialized [rows, cols] tensor in the memory of ``buf`` (a dead buffer) when it
    fits, else a new one. On CPU, first touch of a fresh 32-64 MB tensor costs page faults
    worth about as much as the elementwise op that fills it (docs/benchmarks.md)."""
    if buf.is_contiguous() and buf.numel() >= rows * cols:
        return buf.view(-1)[: rows * cols].view(rows, cols)
    return buf.new_empty(rows, cols)


def _activate(h: torch.Tensor, activation: str, out: torch.Tensor) -> torch.Tensor:
    """act(h) written into ``out`` [M, F] (SwiGLU: silu(gate), then times up in place)."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return torch.ops.aten.silu.out(gate, out=out).mul_(up)
    if activation == "gelu":
        return torch.ops.aten.gelu.out(h, out=out)
    if activation == "relu":
        return torch.clamp_min(h, 0, out=out)
    raise ValueError(f"unknown activation {activation!r}")


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[M, F], [M, F] -> [M] fp32 row-wise dot products. einsum runs it as a batched matmul
    without an [M, F] temporary: 4 ms against 16 ms for (a * b).sum(-1) at [32768, 256]."""
    return torch.einsum("mf,mf->m", a, b).float()


def _weighted_activation(
    h: torch.Tensor, du: torch.Tensor, w_M1: torch.Tensor, dh: torch.Tensor, activation: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward, first half: recompute u = act(h) * w [M, F] inside dh's (not yet written)
    memory, and dL/dw = rowdot(act(h), du) [M] fp32. SwiGLU also leaves silu(gate) in the
    up half of dh, where ``_activation_grad`` finishes it."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        d_gate, d_up = dh.chunk(2, dim=-1)
        s = torch.ops.aten.silu.out(gate, out=d_up)
        a = torch.mul(s, up, out=d_gate)
    else:
        a = _activate(h, activation, out=dh)
    dw = _rowdot(a, du)
    return a.mul_(w_M1), dw


def _activation_grad(h: torch.Tensor, du_w: torch.Tensor, dh: torch.Tensor, activation: str) -> torch.Tensor:
    """Backward, second half: dh = act'(h) applied to du * w, written over u in dh."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        d_gate, d_up = dh.chunk(2, dim=-1)
        d_up.mul_(du_w)  # silu(gate) * du * w
        torch.mul(du_w, up, out=d_gate)
        torch.ops.aten.silu_backward.grad_input(d_gate, gate, grad_input=d_gate)  # * silu'(gate)
    elif activation == "gelu":
        torch.ops.aten.gelu_backward.grad_input(du_w, h, grad_input=dh)
    else:  # relu
        torch.mul(du_w, h > 0, out=dh)
    return dh


class _GroupedMoE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, token_ids, weights, w_in, w_out, offs, activation: str, use_grouped: bool):
        with torch.autocast(x_TD.device.type, enabled=False):
            return _GroupedMoE._forward(ctx, x_TD, token_ids, weights, w_in, w_out, offs, activation, use_grouped)

    @staticmethod
    def _forward(ctx, x_TD, token_ids, weights, w_in, w_out, offs, activation: str, use_grouped: bool):
        dtype = x_TD.dtype
        x = x_TD.index_select(0, token_ids)  # [M, D]; index_select beats x_TD[ids] on CPU
        h = _mm(x, w_in.to(dtype).mT, offs, use_grouped)  # [M, H]
        # x is dead now (the backward gathers it again rather than keep k copies of the input
        # alive): act(h) goes into its memory.
        a = _activate(h, activation, out=_into(x, h.shape[0], w_out.shape[-1]))  # [M, F]
        a.mul_(weights.to(dtype)[:, None])
        y = _mm(a, w_out.to(dtype).mT, offs, use_grouped)  # [M, D]
        # Accumulate a token's k contributions in fp32, so bf16 outputs do not round against each other.
        out_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
        out_TD.index_add_(0, token_ids, y.float())
        ctx.save_for_backward(x_TD, token_ids, weights, h, w_in, w_out, offs)
        ctx.activation, ctx.use_grouped = activation, use_grouped
        return out_TD

    @staticmethod
    def backward(ctx, d_out):
        with torch.autocast(d_out.device.type, enabled=False):
            return _GroupedMoE._backward(ctx, d_out)

    @staticmethod
    def _backward(ctx, d_out):
        x_TD, token_ids, weights, h, w_in, w_out, offs = ctx.saved_tensors
        g, dtype = ctx.use_grouped, x_TD.dtype
        need_x, need_w, need_in, need_out = (ctx.needs_input_grad[i] for i in (0, 2, 3, 4))
        dy = d_out.index_select(0, token_ids).to(dtype)  # [M, D]
        du = _mm(dy, w_out.to(dtype), offs, g)  # [M, F]
        w_M1, dh = weights.to(dtype)[:, None], torch.empty_like(h)
        u, dw = _weighted_activation(h, du, w_M1, dh, ctx.activation)  # u lives in dh's memory
        d_w_out = _wgrad(dy, u, offs, g).to(w_out.dtype) if need_out else None  # [E, D, F]
        dh = _activation_grad(h, du.mul_(w_M1), dh, ctx.activation)  # [M, H], over u
        dx_TD = d_w_in = None
        if need_x or need_in:
            # Gather x again, into dy's buffer: a fresh 64 MB buffer costs page faults on CPU.
            x = torch.index_select(x_TD, 0, token_ids, out=dy)  # [M, D]
            if need_in:
                d_w_in = _wgrad(dh, x, offs, g).to(w_in.dtype)  # [E, H, D]
            if need_x:
                dx = _mm(dh, w_in.to(dtype), offs, g)  # [M, D]
                dx_TD = torch.zeros_like(x_TD).index_add_(0, token_ids, dx)
        return dx_TD, None, dw.to(weights.dtype) if need_w else None, d_w_in, d_w_out, None, None, None


def grouped_moe(
    x_TD: torch.Tensor,
    token_ids: torch.Tensor,
    weights: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    counts: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """sum over slots m of token t: weights[m] * expert_e(m)(x_TD[t]), as [T, D] fp32.

    token_ids [M] and weights [M] are grouped by expert, counts [E] the slice lengths. Weights
    in another dtype than x (fp32 master weights, bf16 activations) are cast once per call;
    their gradients come back in the weights' dtype. Every expert gets a gradient, zeros when
    its slice is empty.
    """
    if torch.is_autocast_enabled(x_TD.device.type):
        # The Function runs with autocast off; take autocast's compute dtype here instead.
        x_TD = x_TD.to(torch.get_autocast_dtype(x_TD.device.type))
    offs = torch.cumsum(counts, 0).to(torch.int32)  # [E]
    return _GroupedMoE.apply(x_TD, token_ids, weights, w_in, w_out, offs, activation, grouped_mm_supported(x_TD))
