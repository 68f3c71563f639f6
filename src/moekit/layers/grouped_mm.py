"""Grouped expert computation: every expert's FFN on its contiguous slice, in one call per matmul.

Shape legend: M dispatched slots (sorted by expert), D model dim, F expert hidden width,
H = F_in first-projection width (2F for SwiGLU, gate first), E experts. ``offs`` [E] int32 is
the running end of each expert's slice (cumsum of the counts), the layout
``torch.nn.functional.grouped_mm`` takes.

Weights are [out, in] per expert (``experts.py``): w_in [E, H, D], w_out [E, D, F].

Plan of ``grouped_ffn`` (forward, then backward of the custom autograd.Function):
    1. h = x @ w_in[e]^T     per slice            [M, H]   (gate and up in one matmul)
    2. a = act(h)                                 [M, F]
    3. y = a @ w_out[e]^T    per slice            [M, D]
    backward, given dy [M, D]; saves only x and h (a is recomputed: one elementwise pass):
    4. da = dy @ w_out[e],   dw_out[e] = dy_e^T @ a_e
    5. dh = act'(h) * da
    6. dx = dh @ w_in[e],    dw_in[e] = dh_e^T @ x_e
Every matmul is a grouped one: autograd of ``grouped_mm`` itself is not usable on every build
(on torch 2.13 CPU its backward fails on expanded gradients), and autograd through a Python
loop would save a and both halves of h as separate tensors.

Where ``grouped_mm`` is missing (older torch, or a dtype/device it does not take), the same
steps run as a loop over the slices; results are identical up to rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moekit.layers.mlp import activate

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


def _activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    """act(h) with one fresh [M, F] buffer (SwiGLU: silu(gate), then times up in place)."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate).mul_(up)
    return activate(h, activation)


def _activation_backward(h: torch.Tensor, da: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(act(h), d act(h)/dh applied to da), both recomputed from h, in h's dtype.

    Fresh large buffers are what this costs on CPU (page faults on first touch), so SwiGLU
    writes both halves of dh in place and turns silu(gate) into act(h) in place.
    """
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        dh = torch.empty_like(h)
        d_gate, d_up = dh.chunk(2, dim=-1)
        a = F.silu(gate)
        torch.mul(da, a, out=d_up)  # d up = da * silu(gate)
        torch.mul(da, up, out=d_gate)
        torch.ops.aten.silu_backward.grad_input(d_gate, gate, grad_input=d_gate)  # * silu'(gate)
        return a.mul_(up), dh
    if activation == "gelu":
        return F.gelu(h), torch.ops.aten.gelu_backward(da, h)
    if activation == "relu":
        return F.relu(h), da * (h > 0)
    raise ValueError(f"unknown activation {activation!r}")


class _GroupedFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_in, w_out, offs, activation: str, use_grouped: bool):
        with torch.autocast(x.device.type, enabled=False):
            return _GroupedFFN._forward(ctx, x, w_in, w_out, offs, activation, use_grouped)

    @staticmethod
    def _forward(ctx, x, w_in, w_out, offs, activation: str, use_grouped: bool):
        w_in_c, w_out_c = w_in.to(x.dtype), w_out.to(x.dtype)
        h = _mm(x, w_in_c.mT, offs, use_grouped)  # [M, H]
        y = _mm(_activate(h, activation), w_out_c.mT, offs, use_grouped)  # [M, D]
        ctx.save_for_backward(x, h, w_in, w_out, offs)
        ctx.activation, ctx.use_grouped = activation, use_grouped
        return y

    @staticmethod
    def backward(ctx, dy):
        with torch.autocast(dy.device.type, enabled=False):
            return _GroupedFFN._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        x, h, w_in, w_out, offs = ctx.saved_tensors
        g = ctx.use_grouped
        dy = dy.contiguous()
        w_in_c, w_out_c = w_in.to(x.dtype), w_out.to(x.dtype)
        da = _mm(dy, w_out_c, offs, g)  # [M, F]
        a, dh = _activation_backward(h, da, ctx.activation)  # [M, F], [M, H]
        dw_out = _wgrad(dy, a, offs, g).to(w_out.dtype) if ctx.needs_input_grad[2] else None  # [E, D, F]
        dx = _mm(dh, w_in_c, offs, g) if ctx.needs_input_grad[0] else None
        dw_in = _wgrad(dh, x, offs, g).to(w_in.dtype) if ctx.needs_input_grad[1] else None  # [E, H, D]
        return dx, dw_in, dw_out, None, None, None


def grouped_ffn(
    x_MD: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, counts: torch.Tensor, activation: str
) -> torch.Tensor:
    """Expert e's FFN on slice e of x_MD: [M, D] sorted by expert, counts [E] -> [M, D] in x's dtype.

    Weights in another dtype (fp32 master weights, bf16 activations) are cast once per call;
    their gradients come back in the weights' dtype. Every expert gets a gradient, zeros when
    its slice is empty.
    """
    if torch.is_autocast_enabled(x_MD.device.type):
        # The Function runs with autocast off; take autocast's compute dtype here instead.
        x_MD = x_MD.to(torch.get_autocast_dtype(x_MD.device.type))
    offs = torch.cumsum(counts, 0).to(torch.int32)  # [E]
    return _GroupedFFN.apply(x_MD, w_in, w_out, offs, activation, grouped_mm_supported(x_MD))
