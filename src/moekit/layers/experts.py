"""Routed experts: E feed-forward networks stored as stacked 3-D weights.

Shape legend: D model dim, F expert hidden width, E experts, M dispatched slots (sorted by
expert). ``w_in`` is [E, D, F_in] with F_in = 2F for SwiGLU (gate and up fused, gate first)
and F otherwise; ``w_out`` is [E, F, D]. So expert e computes act(x @ w_in[e]) @ w_out[e].
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.layers.mlp import activate, first_proj_width


class Experts(nn.Module):
    def __init__(self, num_experts: int, d_model: int, d_expert: int, activation: str = "swiglu"):
        super().__init__()
        self.num_experts, self.d_model, self.d_expert = num_experts, d_model, d_expert
        self.activation = activation
        self.w_in = nn.Parameter(torch.empty(num_experts, d_model, first_proj_width(d_expert, activation)))
        self.w_out = nn.Parameter(torch.empty(num_experts, d_expert, d_model))

    def forward(self, x_MD: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x_MD [M, D] sorted by expert, counts [E] slice lengths -> [M, D].

        Each expert multiplies its contiguous slice. Every expert runs, an empty slice
        included, so each one's weight gradient is a tensor (zeros when it got no tokens),
        never missing: data-parallel gradient reductions would otherwise wait for it forever.
        """
        w_in, w_out = self.w_in.to(x_MD.dtype), self.w_out.to(x_MD.dtype)
        outs = []
        for e, x_e in enumerate(torch.split(x_MD, counts.tolist())):
            outs.append(activate(x_e @ w_in[e], self.activation) @ w_out[e])  # [M_e, D]
        return torch.cat(outs) if outs else x_MD.new_zeros(0, self.d_model)

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on any [.., D] input: the plain definition, used by references and tools."""
        return activate(x @ self.w_in[e].to(x.dtype), self.activation) @ self.w_out[e].to(x.dtype)

    def reset_parameters(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w_in, std=std)
        nn.init.normal_(self.w_out, std=out_std)
