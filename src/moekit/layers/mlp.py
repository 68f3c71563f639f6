"""The dense feed-forward block: SwiGLU (Shazeer 2020) by default, GELU or ReLU FFN as options."""

import torch
import torch.nn.functional as F
from torch import nn

from moekit.config import first_proj_width


def activate(h: torch.Tensor, activation: str, limit: float = 7.0, alpha: float = 1.702) -> torch.Tensor:
    """Apply the FFN nonlinearity to the first projection's output.

    For swiglu, h holds [gate | up] along the last dim and the result is silu(gate) * up, half as wide.
    clamped_swiglu (gpt-oss; ``limit`` and ``alpha`` from ``MoEConfig``) clamps both halves first:
    min(gate, limit) * sigmoid(alpha * min(gate, limit)) * (clamp(up, -limit, limit) + 1).
    limited_swiglu (DeepSeek-V4) clamps the same way around a plain SwiGLU:
    silu(min(gate, limit)) * clamp(up, -limit, limit).
    """
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    if activation == "clamped_swiglu":
        c = _clamped(h, limit)
        gate, up = c.chunk(2, dim=-1)
        return gate * torch.sigmoid(c.mul(alpha).chunk(2, dim=-1)[0]) * (up + 1)
    if activation == "limited_swiglu":
        gate, up = _clamped(h, limit).chunk(2, dim=-1)
        return F.silu(gate) * up
    if activation == "gelu":
        return F.gelu(h)
    if activation == "relu":
        return F.relu(h)
    raise ValueError(f"unknown activation {activation!r}")



def _clamped(h: torch.Tensor, limit: float) -> torch.Tensor:
    """[min(gate, limit) | clamp(up, -limit, limit)], as wide as h. The clamped SwiGLUs take
    sigmoid/silu of the gate half as a strided view of this, never as a tensor of its own:
    PyTorch's CPU kernels run the last (numel mod 2 vector widths) elements of a contiguous
    tensor through a scalar path that rounds differently, so a row's bits would depend on
    where it sits (one expert's rows against a block of several: offload against memory);
    over a strided view every row is its own loop and rounds the same anywhere."""
    gate, up = h.chunk(2, dim=-1)
    return torch.cat([gate.clamp(max=limit), up.clamp(-limit, limit)], dim=-1)


class MLP(nn.Module):
    """x -> down(act(up(x))). For swiglu the gate and up projections are one fused weight."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "swiglu", act_args: tuple = ()):
        super().__init__()
        self.activation, self.act_args = activation, tuple(act_args)  # act_args: see ``activate``
        self.w_in = nn.Linear(d_model, first_proj_width(d_ff, activation), bias=False)
        self.w_out = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Compute in the input's dtype, as the routed experts do, so a bf16 activation meets
        # fp32 master weights without autocast (a no-op when the dtypes already agree).
        h = F.linear(x, self.w_in.weight.to(x.dtype))
        return F.linear(activate(h, self.activation, *self.act_args), self.w_out.weight.to(x.dtype))
