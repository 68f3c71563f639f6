"""The grouped node's activations (``grouped_mm.py``), written into buffers the node owns,
with their backward by hand (the node is one autograd Function, so nothing here is traced).

Shape legend: M slots (a block's rows), H first-projection width, F = H / 2 for the gated
activations (h holds [gate | up], gate first) and F = H otherwise.

Each activation has three parts: ``activate`` (forward, act(h) into ``out`` [M, F]),
``weighted_activation`` (backward: act(h) recomputed and dL/dw for the routing weight) and
``activation_grad`` (backward: act'(h) applied to the incoming gradient). The clamped SwiGLUs
(``mlp.activate``) take ``act_args``: GPT-OSS's ``clamped_swiglu`` (limit, alpha) and
DeepSeek-V4's ``limited_swiglu`` (limit,); forwards evaluate in the order ``mlp.activate``
does, so both round alike. Their clamps pass the gradient where the value was kept, as
autograd's clamp does.
"""

from __future__ import annotations

import torch

ACTIVATIONS = ("swiglu", "clamped_swiglu", "limited_swiglu", "gelu", "relu")
ARG_COUNTS = {"clamped_swiglu": 2, "limited_swiglu": 1}  # len(act_args); 0 for the others


def _clamped_halves(h: torch.Tensor, limit: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The clamped SwiGLUs' inputs: min(gate, limit), clamp(up, -limit, limit), each [M, F], as
    the halves of one [M, 2F] tensor: strided views, so that sigmoid/silu round each row alike
    wherever it sits (``mlp._clamped`` says why)."""
    gate, up = h.chunk(2, dim=-1)
    c = torch.empty_like(h)
    c_gate, c_up = c.chunk(2, dim=-1)
    torch.clamp(gate, max=limit, out=c_gate)
    torch.clamp(up, -limit, limit, out=c_up)
    return c_gate, c_up


def activate(h: torch.Tensor, activation: str, out: torch.Tensor, act_args: tuple = ()) -> torch.Tensor:
    """act(h) written into ``out`` [M, F] (SwiGLU: silu(gate), then times up in place)."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return torch.ops.aten.silu.out(gate, out=out).mul_(up)
    if activation == "limited_swiglu":  # two [M, F] temporaries
        gate, up = _clamped_halves(h, *act_args)
        return torch.ops.aten.silu.out(gate, out=out).mul_(up)
    if activation == "clamped_swiglu":
        limit, alpha = act_args
        g, up = _clamped_halves(h, limit)
        torch.add(up, 1, out=out)  # up + 1; up's (strided) memory is free after this
        s = torch.sigmoid(torch.mul(g, alpha, out=up))  # a strided input: rows round alike (above)
        return out.mul_(s.mul_(g))  # (g s)(up + 1), the products mlp.activate takes
    if activation == "gelu":
        return torch.ops.aten.gelu.out(h, out=out)
    if activation == "relu":
        return torch.clamp_min(h, 0, out=out)
    raise ValueError(f"unknown activation {activation!r}")


def rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[M, F], [M, F] -> [M] fp32 row-wise dot products. Large fp32 (the grouped schedule):
    einsum, a batched matmul without an [M, F] temporary (4 ms against 16 ms for vecdot at
    [32768, 256]). Blocks, and bf16 at any size: vecdot (at [512, 256]: 17 us against 63 us
    in fp32, 40 us against 530 us in bf16, where einsum's batched matmul is slow)."""
    if a.dtype == torch.float32 and a.numel() > 2**22:
        return torch.einsum("mf,mf->m", a, b)
    return torch.linalg.vecdot(a, b).float()


def weighted_activation(h: torch.Tensor, du: torch.Tensor, w_M1: torch.Tensor, dh: torch.Tensor, activation: str,
                        act_args: tuple = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward, first half: recompute u = act(h) * w [M, F] inside dh's (not yet written)
    memory, and dL/dw = rowdot(act(h), du) [M] fp32. SwiGLU and limited_swiglu also leave
    silu(gate) in the up half of dh, where ``activation_grad`` finishes it."""
    if activation in ("swiglu", "limited_swiglu"):
        gate, up = h.chunk(2, dim=-1) if activation == "swiglu" else _clamped_halves(h, *act_args)
        d_gate, d_up = dh.chunk(2, dim=-1)
        s = torch.ops.aten.silu.out(gate, out=d_up)
        a = torch.mul(s, up, out=d_gate)
    elif activation == "clamped_swiglu":
        a = activate(h, activation, dh.chunk(2, dim=-1)[0], act_args)
    else:
        a = activate(h, activation, out=dh)
    dw = rowdot(a, du)
    return a.mul_(w_M1), dw


def activation_grad(h: torch.Tensor, du_w: torch.Tensor, dh: torch.Tensor, activation: str,
                    act_args: tuple = ()) -> torch.Tensor:
    """Backward, second half: dh = act'(h) applied to du * w, written over u in dh."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        d_gate, d_up = dh.chunk(2, dim=-1)
        d_up.mul_(du_w)  # silu(gate) * du * w
        torch.mul(du_w, up, out=d_gate)
        torch.ops.aten.silu_backward.grad_input(d_gate, gate, grad_input=d_gate)  # * silu'(gate)
    elif activation == "limited_swiglu":
        (limit,) = act_args
        gate, up = h.chunk(2, dim=-1)
        gate_c, up_c = _clamped_halves(h, limit)
        d_gate, d_up = dh.chunk(2, dim=-1)
        d_up.mul_(du_w).mul_((up >= -limit) & (up <= limit))  # silu(gate_c) * du * w, where kept
        torch.mul(du_w, up_c, out=d_gate)
        torch.ops.aten.silu_backward.grad_input(d_gate, gate_c, grad_input=d_gate)
        d_gate.mul_(gate <= limit)
    elif activation == "clamped_swiglu":
        _clamped_swiglu_grad(h, du_w, dh, *act_args)
    elif activation == "gelu":
        torch.ops.aten.gelu_backward.grad_input(du_w, h, grad_input=dh)
    else:  # relu
        torch.mul(du_w, h > 0, out=dh)
    return dh


def _clamped_swiglu_grad(h: torch.Tensor, du_w: torch.Tensor, dh: torch.Tensor, limit: float, alpha: float) -> None:
    """a = g * s * (u + 1) with g = min(gate, limit), u = clamp(up, -limit, limit),
    s = sigmoid(alpha * g): d_gate = du_w * (u + 1) * (s + alpha * g * s * (1 - s)) where
    gate <= limit, d_up = du_w * g * s where -limit <= up <= limit (clamp's own gradient rule)."""
    gate, up = h.chunk(2, dim=-1)
    d_gate, d_up = dh.chunk(2, dim=-1)
    g, up_c = _clamped_halves(h, limit)
    s = torch.sigmoid(alpha * g)
    gs = g * s
    torch.mul(du_w, gs, out=d_up).mul_((up >= -limit) & (up <= limit))
    slope = gs.mul_(1 - s).mul_(alpha).add_(s)  # s + alpha * g * s * (1 - s), in gs's memory
    torch.mul(du_w, up_c.add_(1), out=d_gate).mul_(slope).mul_(gate <= limit)


__all__ = ["ACTIVATIONS", "ARG_COUNTS", "activate", "activation_grad", "rowdot", "weighted_activation"]
